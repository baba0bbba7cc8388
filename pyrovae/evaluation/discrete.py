"""Posterior probabilities of an enumerated discrete site, per data point.

For a model whose discrete local site y is summed out by enumeration (a mixture component, a
class label: see :mod:`pyrovae.evaluation.traces`), the posterior over its values given the
data point is, with draws z_k ~ q(z | x_n),

    p(y = c | x_n) = sum_k w_k(c) / sum_k sum_c' w_k(c'),
    w_k(c) = p(x_n, y = c, z_k) / q(z_k | x_n),

a self-normalized importance-sampling estimate (consistent as K grows; exact for any K when
the guide is the exact posterior of z given x). Its argmax classifies a point by the fitted
generative model (Kingma et al.'s M2 classifies this way when it has no separate q(y | x)).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch

from pyrovae.evaluation.data_arguments import _batched_length, _slice_arguments, chunk_bounds
from pyrovae.evaluation.structure import check_structure
from pyrovae.evaluation.traces import (
    SequentialTraces,
    _site_log_prob,
    reduce_terms,
    run_traces,
)
from pyrovae.models.modes import evaluates


@evaluates("model", "guide")
def discrete_posterior(
    model: Callable,
    guide: Callable,
    *args,
    site: str,
    num_samples: int = 100,
    data_plate: str = "data",
    max_pairs: int = 2**16,
    seed: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """p(site = c | x_n) for every data point n and value c: shape (N, C), rows summing to 1.

    Parameters
    ----------
    model, guide : callable
        A Pyro model whose discrete site ``site`` is enumerated (the guide does not sample
        it), and its guide, called as ``model(*args, **kwargs)`` (positional tensors are the
        per-datapoint data).
    site : str
        The discrete site; for a site observed through ``obs_mask``, its name or the name of
        its ``_unobserved`` twin (points where it is observed get the uniform distribution:
        there it is not a latent variable).
    num_samples : int
        K, draws of the guide per data point.
    max_pairs : int
        Most (draw, data point) pairs per pass.
    seed : int, optional
        Seed Pyro's random streams first.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    structure = check_structure(model, guide, *args, data_plate=data_plate, probe_rows=1, **kwargs)
    name = _enumerated_name(site, structure.discrete_sites)
    length = _batched_length(args, kwargs)
    rows = []
    with torch.no_grad():
        for start, stop in chunk_bounds(length, max(1, max_pairs // num_samples)):
            part_args, part_kwargs = _slice_arguments(args, kwargs, length, slice(start, stop))
            traces = run_traces(
                model,
                guide,
                part_args,
                part_kwargs,
                num_samples,
                data_plate,
                structure.max_plate_nesting,
                vectorized=structure.vectorized,
            )
            rows.append(_posterior(traces, name))
    return torch.cat(rows, 0)


def _enumerated_name(site: str, enumerated: list[str]) -> str:
    for name in (site, f"{site}_unobserved"):
        if name in enumerated:
            return name
    raise ValueError(
        f"{site!r} is not a discrete site summed out by enumeration here (enumerated sites: "
        f"{', '.join(map(repr, enumerated)) or 'none'})"
    )


def _posterior(traces, name: str) -> torch.Tensor:
    """(N, C) posterior of the enumerated site ``name`` from one pass of K draws."""
    parts = traces.parts if isinstance(traces, SequentialTraces) else [traces]
    log_weights = torch.cat([_log_weights_by_value(part, name) for part in parts], 1)  # (C,K,N)
    log_marginal = torch.logsumexp(log_weights, 1)  # (C, N)
    return torch.softmax(log_marginal, 0).T


def _log_weights_by_value(traces, name: str) -> torch.Tensor:
    """log w_k(c) for each value c of the enumerated site: shape (C, K, N)."""
    terms = {}
    for site_name, site in traces.model_sites.items():
        role = "observed model" if site["is_observed"] else "latent model"
        terms[site_name] = traces.per_datapoint(
            _site_log_prob(site), site, role, keep_enumeration=True
        )
    members = [
        n
        for n, t in terms.items()
        if n in traces.enumerated or any(size > 1 for size in t.shape[:-2])
    ]
    total = sum(terms[n] for n in members)
    axis = traces.enum_dims + traces.max_plate_nesting + 1 + _enumerate_dim(traces, name)
    others = [d for d in range(traces.enum_dims) if d != axis]
    by_value = torch.logsumexp(total, others, keepdim=True) if others else total
    by_value = by_value.reshape(by_value.shape[axis], *by_value.shape[-2:])
    group = torch.logsumexp(total.reshape(-1, *total.shape[-2:]), 0) if members else 0.0
    rest = reduce_terms(traces, with_kl=False).log_weights - group  # log w without the group
    return by_value + rest


def _enumerate_dim(traces, name: str) -> int:
    return traces.model_sites[name]["infer"]["_enumerate_dim"]
