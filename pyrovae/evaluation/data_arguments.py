"""The per-datapoint data arguments of a model and guide, and how they are cut into chunks.

Data convention for evaluating in chunks: the positional arguments of the model and guide
are the per-datapoint data -- each positional tensor has one row per data point and is
sliced along its first axis; keyword arguments are sliced only when named in
``data_kwargs``, and a keyword tensor with one row per data point whose role is not stated
is refused (it could be a parameter that happens to have N rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))


def _data_tensors(args: tuple, kwargs: dict, data_kwargs: Sequence[str]) -> dict[str, object]:
    """The data arguments, by description: positional tensors and the named keywords."""
    data = {
        f"positional argument {i}": value
        for i, value in enumerate(args)
        if isinstance(value, torch.Tensor)
    }
    for name in data_kwargs:
        if name not in kwargs:
            raise ValueError(
                f"data_kwargs names {name!r}, which is not a keyword argument of this call "
                f"(keyword arguments: {_names(sorted(kwargs)) or 'none'})"
            )
        data[f"keyword argument {name!r}"] = kwargs[name]
    return data


def _batched_length(args: tuple, kwargs: dict, data_kwargs: Sequence[str] = ()) -> int:
    """N, the number of data points: the rows of the data arguments (the positional tensors
    and the keywords named in ``data_kwargs``), which must all have that many rows."""
    data = _data_tensors(args, kwargs, data_kwargs)
    if not data:
        raise ValueError(
            "no data tensor found: pass the per-datapoint data as positional tensor "
            "argument(s) (or as keyword arguments named in data_kwargs)"
        )
    length = None
    for description, value in data.items():
        rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None
        if length is None and rows is not None:
            length = rows
        if rows is None or rows != length:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{description} has {rows if rows is not None else 'no'} rows (shape {shape}) "
                f"but the data has {length if length is not None else 'none'}: positional "
                "arguments (and keywords named in data_kwargs) are the per-datapoint data, one "
                "row per data point; pass other tensors as keyword arguments"
            )
    return length


def check_data_kwargs(
    args: tuple, kwargs: dict, data_kwargs: Sequence[str] | None
) -> tuple[str, ...]:
    """The keywords to slice with the data, refusing an ambiguous call.

    With ``data_kwargs=None`` (role not stated) a keyword tensor argument with one row per
    data point is refused: it may be data (name it in ``data_kwargs``) or a parameter that
    happens to have N rows (pass ``data_kwargs=()``), and slicing the wrong one would cut a
    parameter silently.
    """
    if data_kwargs is not None:
        names = (data_kwargs,) if isinstance(data_kwargs, str) else tuple(data_kwargs)
        _batched_length(args, kwargs, names)  # checks the names and their rows
        return names
    length = _batched_length(args, kwargs)
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == length:
            raise ValueError(
                f"keyword argument {name!r} has {length} rows, like the data: say whether it "
                f"holds one row per data point -- data_kwargs=({name!r},) slices it with the "
                "data when evaluating in chunks, data_kwargs=() passes it whole (e.g. a "
                "parameter that happens to have N rows)"
            )
    return ()


def _slice_arguments(
    args: tuple, kwargs: dict, length: int, index, data_kwargs: Sequence[str] = ()
):
    """``args`` and ``kwargs`` with the data (positional tensors, keywords named in
    ``data_kwargs``) indexed along their first axis by ``index`` (a slice or index tensor);
    every other argument unchanged."""

    def take(value, description):
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() == 0 or value.shape[0] != length:
            raise ValueError(f"{description} does not have the data's {length} rows")
        return value[index]

    sliced_args = tuple(take(a, f"positional argument {i}") for i, a in enumerate(args))
    sliced_kwargs = {
        k: take(v, f"keyword argument {k!r}") if k in data_kwargs else v for k, v in kwargs.items()
    }
    return sliced_args, sliced_kwargs


def chunk_bounds(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) pairs covering ``range(total)`` in steps of ``chunk``."""
    for start in range(0, total, chunk):
        yield start, min(start + chunk, total)


def _cuda_devices(args: tuple, kwargs: dict) -> list[int]:
    """Indices of the CUDA devices the tensor arguments live on (for ``fork_rng``)."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
