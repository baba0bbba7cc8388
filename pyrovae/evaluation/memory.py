"""Memory of importance-sampled evaluation: how many (draw, data point) pairs one pass may
trace, from the bytes one pair allocates (counted on a traced pass of the model and guide)
and a per-device budget (at most half of the memory available)."""

from __future__ import annotations

import math

import torch

from pyrovae.evaluation.data_arguments import _batched_length, _cuda_devices, _slice_arguments

DEFAULT_MEMORY_BUDGET = {"cpu": 512 * 2**20, "cuda": 4 * 2**30}
"""Bytes one evaluation pass may allocate, per device type (then at most half of the
memory available)."""

REDUCTION_BYTES_PER_PAIR = 512
"""Bytes per (draw, data point) pair of the float64 reductions and the PSIS fit."""


def _available_memory(device: torch.device) -> int | None:
    """Bytes available on ``device`` (free CUDA memory; MemAvailable on Linux), or None."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """Bytes one evaluation pass may allocate by default: :data:`DEFAULT_MEMORY_BUDGET` for
    the device type (512 MiB on CPUs, 4 GiB on GPUs), at most half the memory available."""
    device = torch.device(device)
    budget = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    available = _available_memory(device)
    return budget if available is None else max(1, min(budget, available // 2))


ALLOCATION_SAFETY = 2
"""Factor on the counted bytes per pair: temporaries inside torch's kernels are not seen."""

FALLBACK_BYTES_PER_PAIR = 64 * 1024
"""Bytes per pair assumed when the allocations cannot be counted."""


def _storages(values) -> set[int]:
    from torch.utils._pytree import tree_leaves

    return {
        leaf.untyped_storage().data_ptr()
        for leaf in tree_leaves(values)
        if isinstance(leaf, torch.Tensor)
    }


def _allocation_counter():
    """A ``TorchFunctionMode`` summing the bytes of the new tensors torch functions return
    (views and results written into an input excluded), in its attribute ``bytes``."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    class Counter(TorchFunctionMode):
        bytes = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = None
            for leaf in tree_leaves(out):
                if not isinstance(leaf, torch.Tensor) or leaf._base is not None:
                    continue
                inputs = _storages((args, kwargs)) if inputs is None else inputs
                if leaf.untyped_storage().data_ptr() not in inputs:
                    self.bytes += leaf.untyped_storage().nbytes()
            return out

    return Counter()


def bytes_per_pair(
    model,
    guide,
    *args,
    data_plate: str = "data",
    max_plate_nesting: int = 1,
    draws: int = 32,
    **kwargs,
) -> int:
    """Bytes allocated per (draw, data point) pair by one traced pass of model and guide.

    Runs the model and guide once on the first data point with ``draws`` draws, sums the
    bytes of every new tensor the torch functions they call return (views excluded; freed
    temporaries counted too), divides by ``draws`` and multiplies by
    :data:`ALLOCATION_SAFETY` (temporaries inside torch's kernels are not seen). For the
    784-200-200-50 Bernoulli VAE in float32 the count is 10.5 KB per pair, as counted by
    hand in the reliability page. Random state is left as it was;
    :data:`FALLBACK_BYTES_PER_PAIR` if the counting mode fails.

    Returns
    -------
    int
        Bytes per pair (the encoder's per-point cost shared out over ``draws``).
    """
    from pyrovae.evaluation.traces import trace_terms

    length = _batched_length(args, kwargs)
    args, kwargs = _slice_arguments(args, kwargs, length, slice(0, 1))
    with torch.random.fork_rng(devices=_cuda_devices(args, kwargs)), torch.no_grad():
        try:
            with _allocation_counter() as counter:
                trace_terms(model, guide, args, kwargs, draws, data_plate, max_plate_nesting)
        except Exception:  # noqa: BLE001 - an estimate must not stop the evaluation
            return FALLBACK_BYTES_PER_PAIR
    return max(1, math.ceil(ALLOCATION_SAFETY * counter.bytes / draws))


def evaluation_pairs(
    model, guide, probe_args, probe_kwargs, nesting, data_plate, max_pairs, memory_budget
) -> int:
    """(draw, data point) pairs per pass: ``max_pairs``, or fewer so that the pass's bytes
    (:func:`bytes_per_pair` plus :data:`REDUCTION_BYTES_PER_PAIR`) fit ``memory_budget``."""
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    if memory_budget is None:
        memory_budget = default_memory_budget(_device_of(probe_args, probe_kwargs))
    elif not memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    per_pair = REDUCTION_BYTES_PER_PAIR + bytes_per_pair(
        model, guide, *probe_args, data_plate=data_plate, max_plate_nesting=nesting, **probe_kwargs
    )
    return max(1, min(max_pairs, int(memory_budget // per_pair)))


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
