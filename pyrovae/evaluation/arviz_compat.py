"""The only module that knows ArviZ's version: Pareto-smoothed importance sampling and
export of results to ArviZ's container, for ArviZ 0.x and 1.x alike.

* ArviZ 0.x (Python 3.11 here): ``arviz.psislw(log_weights)`` smooths log importance
  weights, samples on the last axis, and returns ``(smoothed, khat)``;
  results go into an ``arviz.InferenceData`` group.
* ArviZ 1.x (``arviz_stats``, Python >= 3.12): ``array_stats.psislw`` is written for
  PSIS-LOO and smooths the *negated* input (it expects log-likelihoods), so it is given
  ``-log_weights``; results go into an ``xarray.DataTree``.
"""

from __future__ import annotations

import warnings
from importlib import metadata

import numpy as np


def arviz_major_version() -> int:
    """Major version of the installed ArviZ (0 or 1)."""
    try:
        return int(metadata.version("arviz").split(".")[0])
    except metadata.PackageNotFoundError:  # ArviZ 1.x may be installed as its parts only
        return 1


def pareto_khat(log_weights: np.ndarray) -> np.ndarray:
    """Pareto k-hat of importance weights, one per row.

    Parameters
    ----------
    log_weights : numpy.ndarray of shape (N, K)
        Log importance weights log p(x, z_k) - log q(z_k | x), draws on the last axis.

    Returns
    -------
    numpy.ndarray of shape (N,)
        Estimated shape k of the generalized Pareto tail of the weights. Below 0.5 the
        weights have finite variance; above 0.5 they do not, and the standard error of a
        plain importance-sampling estimate is meaningless; above min(1 - 1/log10 K, 0.7)
        even the Pareto-smoothed estimate is unreliable (Vehtari et al., 2024).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim != 2:
        raise ValueError(f"log_weights must have shape (N, K), got {log_weights.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about high k-hat; callers report it
        if arviz_major_version() >= 1:
            from arviz_stats.base import array_stats

            _, khat = array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)
        else:
            import arviz

            _, khat = arviz.psislw(log_weights, reff=1.0)
    return np.asarray(khat, dtype=np.float64).reshape(log_weights.shape[0])


def to_arviz(dataset, group: str = "evaluation"):
    """Wrap an ``xarray.Dataset`` in ArviZ's container under ``group``.

    Returns an ``arviz.InferenceData`` with ArviZ 0.x and an ``xarray.DataTree`` with 1.x.
    """
    if arviz_major_version() >= 1:
        import xarray

        return xarray.DataTree.from_dict({group: dataset})
    import arviz

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.x warns that the group name is not a standard one
        return arviz.InferenceData(**{group: dataset})
