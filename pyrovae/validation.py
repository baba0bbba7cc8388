"""Checks on user input, run before any parameter, file or optimizer state changes."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import pyro
import torch
from pyro import poutine
from torch.distributions import constraints

from pyrovae.likelihoods import Likelihood

# --------------------------------------------------------------------------- plain values


def plain(value):
    """A NumPy scalar (or a 0-d array) as the Python value it holds; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


def is_integer(value) -> bool:
    """An integer (Python or NumPy), not a boolean."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number (Python or NumPy, integer or floating), not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def positive_int(value, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (NumPy integers accepted), else
    ``ValueError`` naming ``name``."""
    if not is_integer(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def integer_tuple(values, name: str) -> tuple:
    """A sequence (list, tuple, 1-D NumPy array or tensor) as a tuple, NumPy and tensor
    integers turned into ``int``; ``None``, a scalar, a string, a dict or a set (which has
    no order) is refused with ``ValueError``."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(
                f"{name} must be a sequence of integers, got an array of shape {values.shape}"
            )
        values = values.tolist()
    if isinstance(values, (str, bytes, dict, set, frozenset)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of integers (a tuple or list), got {values!r}")
    return tuple(plain(value) for value in values)


def normalize_config(config) -> None:
    """Turn NumPy scalars and arrays in a frozen config dataclass into plain Python values
    (``int``, ``float``, ``bool``, ``str``, tuples of ``int``), so that ``np.int64(10)``
    epochs or ``np.array([256, 256])`` hidden sizes are accepted and saved as plain data;
    then refuse non-numbers and NaN or infinite values in ``float`` fields (unless the
    field's default is itself non-finite).

    Raises
    ------
    ValueError
        A ``float`` field holding something other than a finite real number.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        annotation = str(field.type).replace(" ", "")
        kinds = set(annotation.split("|"))
        optional = "None" in kinds
        if value is None and optional:
            continue
        if annotation.startswith("tuple["):
            value = integer_tuple(value, field.name)  # refuses None, a number, a string
        else:
            value = plain(value)
        if kinds - {"None"} == {"str"} and not isinstance(value, str):
            raise ValueError(f"{field.name} must be a string, got {value!r}")
        if kinds - {"None"} == {"bool"} and not isinstance(value, bool):
            raise ValueError(f"{field.name} must be True or False, got {value!r}")
        if "float" in kinds:
            default = field.default
            may_be_infinite = isinstance(default, float) and not math.isfinite(default)
            if not is_real(value) or not (math.isfinite(value) or may_be_infinite):
                raise ValueError(f"{field.name} must be a finite number, got {value!r}")
            value = float(value)
        object.__setattr__(config, field.name, value)


# --------------------------------------------------------------------------- data


def as_data_tensor(x, name: str = "data", keep_dtype: bool = False) -> torch.Tensor:
    """Convert array-like data to a floating tensor without copying floating tensors; with
    ``keep_dtype``, integer and boolean data keep their dtype (labels, counts, masks).

    Raises ``TypeError`` for non-numeric input (strings, objects; booleans are accepted as
    0/1 when converted).
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
    if not tensor.is_floating_point() and not keep_dtype:
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def check_dense(tensor: torch.Tensor, name: str = "data") -> torch.Tensor:
    """``tensor``, or ``TypeError`` if it has no ordinary values to compute with: a sparse
    (or other non-strided) tensor, a nested tensor, or a tensor on the ``meta`` device,
    which has a shape but no values."""
    if tensor.is_nested or tensor.layout != torch.strided:
        layout = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise TypeError(f"{name} is a {layout} tensor; pass a dense one (x.to_dense())")
    if tensor.device.type == "meta":
        raise TypeError(f"{name} is a tensor on the 'meta' device, which holds no values")
    return tensor


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _where(index: tuple[int, ...]) -> str:
    if len(index) == 2:
        return f"row {index[0]}, column {index[1]}"
    return f"index {index}"


def check_finite(tensor: torch.Tensor, name: str = "data") -> torch.Tensor:
    """``tensor``, or ``ValueError`` naming the count and the first NaN or infinite entry."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        index = _first(~finite)
        raise ValueError(
            f"{name} contains NaN or infinite values ({int((~finite).sum())} entries, first "
            f"at {_where(index)}: {float(tensor[index])})"
        )
    return tensor


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype | None, name: str = "data"):
    """``tensor`` (finite) in ``dtype``; ``ValueError`` if a value overflows it (float64 data
    beyond float32's range would otherwise turn into infinities after the checks)."""
    if dtype is None or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if cast.is_floating_point():
        overflow = ~torch.isfinite(cast)
        if bool(overflow.any()):
            index = _first(overflow)
            raise ValueError(
                f"{name} has values beyond the range of {str(dtype).removeprefix('torch.')}, "
                f"the model's dtype ({int(overflow.sum())} entries, first at {_where(index)}: "
                f"{float(tensor[index])!r}; largest finite value {torch.finfo(dtype).max:.4g}). "
                "Rescale the data"
            )
    return cast


def check_data(
    x,
    num_features: int,
    likelihood: Likelihood | None = None,
    name: str = "data",
    dtype: torch.dtype | None = None,
):
    """Validate a data matrix of shape (N, D) and return it as a floating tensor.

    Checks, in order: numeric dtype, a dense tensor with values (not sparse, not on the
    ``meta`` device), two dimensions, at least one row, D features, finite values, values
    within the range of ``dtype`` (when given: the result is in that dtype), and the
    likelihood's support.

    Raises
    ------
    TypeError
        Non-numeric data, or a sparse or meta tensor.
    ValueError
        Any other failed check; the message names the check and the offending value.
    """
    tensor = check_dense(as_data_tensor(x, name), name)
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
    check_finite(tensor, name)
    tensor = cast_checked(tensor, dtype, name)
    if likelihood is not None:
        likelihood.check_support(tensor)
    return tensor


def finite_inputs(tensors: tuple, dtype: torch.dtype, device, name: str = "data") -> tuple:
    """Model inputs on ``device``, each dense (not sparse, not on the ``meta`` device):
    floating ones finite, within the range of ``dtype`` and in that dtype; integer and
    boolean ones unchanged (argument ``i`` is named ``"{name} argument {i}"`` in errors)."""
    checked = []
    for i, tensor in enumerate(tensors):
        label = f"{name} argument {i}"
        tensor = check_dense(tensor, label)
        if tensor.is_floating_point():
            tensor = cast_checked(check_finite(tensor, label), dtype, label)
        checked.append(tensor.to(device))
    return tuple(checked)


def check_data_tensors(tensors, name: str = "data") -> None:
    """Refuse per-datapoint tensors that no model can be evaluated on: sparse or meta
    tensors (``TypeError``), no data points, or NaN or infinite values (``ValueError``,
    naming the tensor, the count and the first entry)."""
    for i, tensor in enumerate(tensors):
        label = f"{name} argument {i}"
        check_dense(tensor, label)
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            shape = tuple(tensor.shape)
            raise ValueError(f"{label} is empty: it has no data points (shape {shape})")
        if tensor.is_floating_point() or tensor.is_complex():
            check_finite(tensor, label)


def sampling_options(options: dict) -> dict:
    """Evaluation options with NumPy values accepted and checked before anything draws:
    ``num_samples`` and ``max_pairs`` positive integers, ``seed`` an integer in
    [0, 2**32 - 1] or ``None``, ``ks`` a sequence (list, tuple, array) of integers."""
    from pyrovae.randomness import check_seed

    options = dict(options)
    if "num_samples" in options:
        options["num_samples"] = positive_int(options["num_samples"], "num_samples (K)")
    if "max_pairs" in options:
        options["max_pairs"] = positive_int(options["max_pairs"], "max_pairs")
    if options.get("seed") is not None:
        options["seed"] = check_seed(options["seed"])
    if "ks" in options:
        options["ks"] = integer_tuple(options["ks"], "ks")
    return options


# --------------------------------------------------------------------------- users' models

SUPPORT_CHECK_ROWS = 1024
"""Data points per model call when :func:`check_observed_support` traces a model."""


def check_observed_support(
    model,
    inputs: tuple,
    data_plate: str = "data",
    name: str = "data",
    chunk_size: int = SUPPORT_CHECK_ROWS,
) -> None:
    """Run ``model(*inputs)`` once over all data points, ``chunk_size`` at a time, and check
    the value of every observed site against its distribution's ``support``.

    Pyro checks supports only while validation is on, which training enables for its first
    step only, so values outside the support in any later minibatch would otherwise train
    silently (a Poisson log-density of -1.5 is a finite number). Every random stream is left
    as it was, and so is Pyro's parameter store when the check fails (when it passes, the
    parameters a first call of the model creates stay, as the first training step would
    create them); sites whose support cannot be checked (``constraints.dependent``) are
    skipped.

    Raises
    ------
    ValueError
        Naming the site, the distribution, its support, the number of entries outside it and
        the first one (its data point and value); or, for data of a shape the model cannot
        take (too many dimensions, the wrong number of features), the shapes: a value that
        does not fit its distribution's shape, or the model's own error on the data.
    """
    size = inputs[0].shape[0]
    devices = sorted({t.device.index or 0 for t in inputs if t.device.type == "cuda"})
    store = pyro.get_param_store()
    names_before = set(store.keys())
    found: dict[str, list] = {}  # site -> [entries outside the support, first description]
    passed = False
    with torch.random.fork_rng(devices=devices):
        state = pyro.util.get_rng_state()
        try:
            with torch.no_grad(), pyro.validation_enabled(False):
                for start in range(0, size, chunk_size):
                    part = tuple(t[start : start + chunk_size] for t in inputs)
                    trace = _trace_on_data(model, part, inputs, name)
                    for site in trace.nodes.values():
                        if site["type"] == "sample" and site["is_observed"]:
                            _check_value_shape(site, inputs, name)
                            violation = _support_violation(site, start, data_plate)
                            if violation is not None:
                                entry = found.setdefault(site["name"], [0, violation[1]])
                                entry[0] += violation[0]
            passed = not found
        finally:
            pyro.util.set_rng_state(state)
            if not passed:  # a refused call leaves no parameter a first call created
                for created in set(store.keys()) - names_before:
                    del store[created]
    if found:
        site, (count, (family, first)) = next(iter(found.items()))
        others = ", ".join(map(repr, list(found)[1:]))
        raise ValueError(
            f"{name}: the value of the model's observed site {site!r} lies outside the "
            f"support of its {family}: {count} entries, first {first}"
            + (f" (also in site(s) {others})" if others else "")
        )


def _trace_on_data(model, part: tuple, inputs: tuple, name: str):
    """The trace of ``model(*part)``; a shape or value error of the model's code on the data
    becomes one line naming the data's shapes."""
    from pyrovae.checkpoint import CheckpointError

    try:
        return poutine.trace(model).get_trace(*part)
    except CheckpointError:  # the code does not match a loaded file: its own message
        raise
    except (RuntimeError, ValueError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(
            f"{name}: the model fails on data of shape {_shapes(inputs)} ({reason}); check that "
            "the data have the dimensions and number of features the model expects"
        ) from None


def _shapes(tensors: tuple) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def _check_value_shape(site: dict, inputs: tuple, name: str) -> None:
    """Refuse an observed value whose shape does not fit its distribution: the right-most
    dimensions must equal the event shape and the rest broadcast with the batch shape (what
    Pyro's validation checks, and what computing the log-density needs)."""
    fn, value = site["fn"], site["value"]
    try:
        event, batch = tuple(fn.event_shape), tuple(fn.batch_shape)
    except (AttributeError, NotImplementedError):
        return
    if not isinstance(value, torch.Tensor):
        return
    shape = tuple(value.shape)
    expected = batch + event
    fits = len(shape) >= len(event) and shape[len(shape) - len(event) :] == event
    fits = fits and all(
        i == j or 1 in (i, j) for i, j in zip(reversed(shape), reversed(expected), strict=False)
    )
    if not fits:
        data = "" if _shapes(inputs) == str(shape) else f" (data of shape {_shapes(inputs)})"
        family = fn
        while isinstance(family, torch.distributions.Independent):
            family = family.base_dist
        raise ValueError(
            f"{name}: the model's observed site {site['name']!r} has a "
            f"{type(family).__name__} distribution of batch shape {batch} and event shape "
            f"{event}, which its value of shape {shape} does not fit{data}: check the "
            "data's dimensions and number of features"
        )


def _support_violation(
    site: dict, start: int, data_plate: str
) -> tuple[int, tuple[str, str]] | None:
    """(entries outside the support, description of the first) of an observed site whose
    data points are ``start, start + 1, ...``; ``None`` when all lie inside (or the support
    cannot be checked)."""
    fn, value = site["fn"], site["value"]
    if not isinstance(value, torch.Tensor) or site.get("mask") is False:
        return None
    try:
        base = fn.support
    except NotImplementedError:
        return None
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if isinstance(base, constraints._Dependent):
        return None
    try:
        ok = torch.as_tensor(base.check(value), device=value.device).bool()
    except NotImplementedError:
        return None
    extra = ok.dim() - (value.dim() - getattr(fn, "event_dim", 0))  # event dims checked
    mask = site.get("mask")
    if isinstance(mask, torch.Tensor):
        ok = ok | ~mask.reshape(mask.shape + (1,) * extra).bool()
    if bool(ok.all()):
        return None
    bad = ~ok
    index = _first(bad)
    where = list(index)
    for frame in site["cond_indep_stack"]:
        axis = bad.dim() - extra + frame.dim
        if frame.name == data_plate and 0 <= axis < bad.dim():
            where[axis] += start  # the data point's index in all the data, not the chunk
    where = where[0] if len(where) == 1 else tuple(where)
    try:
        shown = value.expand(bad.shape + value.shape[ok.dim() :])[index]
        shown = float(shown) if shown.numel() == 1 else shown.tolist()
    except (RuntimeError, IndexError):  # a value broadcast against the distribution
        shown = "?"
    family = fn
    while isinstance(family, torch.distributions.Independent):
        family = family.base_dist
    description = (
        f"{type(family).__name__} distribution ({base})",
        f"at index {where} with value {shown!r}",
    )
    return int(bad.sum()), description
