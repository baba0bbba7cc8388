"""Random-number-generator state: capture and restore every stream training draws from
(torch's CPU and CUDA generators, NumPy's and Python's global generators, and the data-order
generator), as plain tensors and numbers that a weights-only checkpoint can hold.
"""

from __future__ import annotations

import numbers
import random

import numpy as np
import torch

SEED_LIMIT = 2**32
"""Seeds must lie in ``[0, SEED_LIMIT)``: the range NumPy's global generator accepts (torch's
and Python's accept more; a seed is checked before any of them is reseeded)."""


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as a Python ``int`` (NumPy integers accepted), or ``ValueError`` unless it is
    an integer in ``[0, 2**32 - 1]``. Call it before reseeding anything, so that a refused
    seed leaves every generator as it was."""
    if (
        isinstance(seed, (bool, np.bool_))
        or not isinstance(seed, numbers.Integral)
        or not 0 <= int(seed) < SEED_LIMIT
    ):
        raise ValueError(f"{name} must be a non-negative integer below 2**32, got {seed!r}")
    return int(seed)


def capture_rng_state(generator: torch.Generator | None = None) -> dict:
    """Snapshot of all RNG streams; ``generator`` is the data-order/binarization generator."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].to(generator.get_state().device))


def derived_seed(*keys: int) -> int:
    """A 32-bit seed (valid for torch, NumPy and :func:`pyro.set_rng_seed`) derived from
    non-negative integer ``keys`` (e.g. a run's seed and a process rank, or a data block),
    statistically independent of the seeds derived from other keys
    (:class:`numpy.random.SeedSequence`)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
