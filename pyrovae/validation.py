"""Checks on user input, run before any parameter, file or optimizer state changes."""

from __future__ import annotations

import numpy as np
import torch

from pyrovae.likelihoods import Likelihood


def as_data_tensor(x, name: str = "data") -> torch.Tensor:
    """Convert array-like data to a floating tensor without copying floating tensors.

    Raises ``TypeError`` for non-numeric input (strings, objects, booleans are accepted as 0/1).
    """
    if isinstance(x, torch.Tensor):
        tensor = x
    else:
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def check_data(x, num_features: int, likelihood: Likelihood | None = None, name: str = "data"):
    """Validate a data matrix of shape (N, D) and return it as a floating tensor.

    Checks, in order: numeric dtype, two dimensions, at least one row, D features, finite
    values, and the likelihood's support.

    Raises
    ------
    TypeError
        Non-numeric data.
    ValueError
        Any other failed check; the message names the check and the offending value.
    """
    tensor = as_data_tensor(x, name)
    if tensor.dim() != 2:
        raise ValueError(
            f"{name} must be a matrix of shape (num_points, {num_features}); "
            f"got shape {tuple(tensor.shape)} (flatten images to rows first)"
        )
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has no data points")
    if tensor.shape[1] != num_features:
        raise ValueError(
            f"{name} has {tensor.shape[1]} features but the model expects {num_features}"
        )
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        row, col = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(
            f"{name} contains NaN or infinite values ({int((~finite).sum())} entries, first "
            f"at row {row}, column {col}: {float(tensor[row, col])})"
        )
    if likelihood is not None:
        likelihood.check_support(tensor)
    return tensor
