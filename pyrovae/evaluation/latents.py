"""How the latent variables are used: KL per latent dimension, active units, and the mutual
information between x and z under q, for each latent site of any Pyro model and guide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pyro import poutine
from torch.distributions import Independent, kl_divergence

from pyrovae.evaluation.traces import (
    _batched_length,
    _check_site_names,
    _sample_sites,
    _slice_arguments,
    trace_pair,
)

ACTIVE_UNIT_THRESHOLD = 0.01
"""A dimension d is active when Cov_x(E_q[z_d | x]) exceeds this (Burda et al., 2016)."""


@dataclass
class LatentUse:
    """Latent-use diagnostics of one latent site (vector-valued sites: one entry per dimension).

    Attributes
    ----------
    kl_per_dim : numpy.ndarray or None
        Mean over data points of KL(q(z_d | x) || p(z_d)) in nats, per dimension; ``None``
        when the pair has no closed form per dimension, or when the model has discrete
        sites it sums out (enumerates): the prior of z may then depend on them.
    mean_variance : numpy.ndarray
        Cov_x(E_q[z_d | x]): variance over data points of the posterior mean, per dimension.
    active_units : int
        Number of dimensions with ``mean_variance > 0.01``.
    mutual_information : float
        Estimate of I_q(x; z) in nats, with x uniform over the evaluated data points:
        mean_n [log q(z_n | x_n) - log (1/M) sum_m q(z_n | x_m)], z_n ~ q(. | x_n). It is at
        most log M.
    """

    kl_per_dim: np.ndarray | None
    mean_variance: np.ndarray
    active_units: int
    mutual_information: float


def per_dimension_kl(guide_fn, prior_fn) -> torch.Tensor | None:
    """KL(q(z_d|x) || p(z_d)) per latent dimension, shape (..., L), when both are
    ``Independent`` over the last dimension with a closed-form KL between their base
    distributions; ``None`` otherwise."""
    if not (isinstance(guide_fn, Independent) and isinstance(prior_fn, Independent)):
        return None
    try:
        kl = kl_divergence(guide_fn.base_dist, prior_fn.base_dist)
    except NotImplementedError:
        return None
    return kl.reshape(-1, kl.shape[-1]) if kl.dim() > 1 else None


def _mutual_information(pieces: list, max_pairs: int) -> float:
    """I_q(x; z) with x uniform over the points of all ``pieces`` (guide distributions of
    consecutive chunks of points), one draw z_n ~ q(. | x_n) each; the (z_n, x_m) pairs are
    scored in blocks of at most ``max_pairs``."""
    draws = [fn.sample() for fn in pieces]  # (n_i, ...) one draw per data point
    log_q_own = torch.cat([fn.log_prob(z).double() for fn, z in zip(pieces, draws, strict=True)])
    draws = torch.cat(draws)
    total, widest = draws.shape[0], max(fn.batch_shape[0] for fn in pieces)
    rows = max(1, max_pairs // widest)
    log_aggregate = torch.cat(
        [_log_aggregate(draws[start : start + rows], pieces) for start in range(0, total, rows)]
    )
    return float((log_q_own - log_aggregate + math.log(total)).mean())


def _log_aggregate(draws: torch.Tensor, pieces: list) -> torch.Tensor:
    """log sum_m q(z_r | x_m) over every point m of every piece, for draws z_r: (rows,)."""
    parts = []
    for fn in pieces:
        size = fn.batch_shape[0]
        expanded = draws.unsqueeze(1).expand(-1, size, *draws.shape[1:])  # flows need it
        parts.append(torch.logsumexp(fn.log_prob(expanded).double(), dim=1))
    return torch.logsumexp(torch.stack(parts), dim=0)


@torch.no_grad()
def latent_use(
    model,
    guide,
    *args,
    max_points: int = 2000,
    seed: int = 0,
    max_pairs: int = 2**16,
    data_kwargs: Sequence[str] = (),
    **kwargs,
):
    """Latent-use diagnostics for each latent site, from one pass of guide and model.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide taking ``*args, **kwargs`` (the data's first axis is the plate).
    max_points : int
        Evaluate on at most this many data points (a random subset, fixed by ``seed``); the
        mutual-information estimate costs O(max_points^2) time.
    seed : int
        Seeds the subset and the draws of the mutual-information estimate.
    max_pairs : int
        Memory bound, as in :func:`pyrovae.evaluation.importance.evaluate`: model and guide
        run on at most this many points at once (one draw each), the mutual information
        scores at most this many (draw, data point) pairs at once, and Monte Carlo moments
        (flows) take at most this many draws at once.
    data_kwargs : sequence of str
        Keyword arguments holding per-datapoint data, subset with the positional data (see
        :mod:`pyrovae.evaluation.traces`); other keyword arguments are passed whole.

    Returns
    -------
    dict of str to LatentUse
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    data_kwargs = tuple(data_kwargs)
    length = _batched_length(args, kwargs, data_kwargs)
    count = min(length, max_points)
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(length, generator=generator)[:count].sort().values
    args, kwargs = _slice_arguments(args, kwargs, length, subset, data_kwargs)
    devices = [t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # seeded draws; the caller's RNG is untouched
        torch.manual_seed(seed)
        pieces = [
            _site_distributions(
                model, guide, *_slice_arguments(args, kwargs, count, index, data_kwargs)
            )
            for index in _chunks(count, max_pairs)
        ]
        results = {
            name: _site_use([piece[name] for piece in pieces], max_pairs) for name in pieces[0]
        }  # empty where every latent site is discrete
    return results


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _site_distributions(model, guide, args: tuple, kwargs: dict) -> dict[str, tuple]:
    """(guide distribution, prior distribution or None) of each continuous latent site the
    guide samples, for one chunk. Discrete sites are not diagnosed (neither those the model
    sums out nor those the guide samples); where the model sums some out, the prior of a
    continuous site may depend on them, so its prior is None (no KL per dimension)."""
    with poutine.block():
        model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    enumerated = [
        name
        for name, site in model_sites.items()
        if not site["is_observed"] and name not in guide_sites and _discrete(site["fn"])
    ]
    _check_site_names(model_sites, guide_sites, enumerated)
    return {
        name: (site["fn"], None if enumerated else model_sites[name]["fn"])
        for name, site in guide_sites.items()
        if not _discrete(site["fn"])
    }


def _discrete(fn) -> bool:
    return bool(getattr(fn, "has_enumerate_support", False))


def _bounded_means(guide_fn, max_pairs: int, num_draws: int = 256) -> torch.Tensor:
    """Posterior means (n, ...); Monte Carlo over ``num_draws`` draws, taken at most
    ``max_pairs`` (draw, point) pairs at a time, when they have no closed form (flows)."""
    try:
        return guide_fn.mean
    except NotImplementedError:
        size = guide_fn.batch_shape[0]
        step = max(1, max_pairs // size)
        total = sum(
            guide_fn.sample((min(step, num_draws - start),)).double().sum(0)
            for start in range(0, num_draws, step)
        )
        return total / num_draws


def _site_use(pieces: list[tuple], max_pairs: int) -> LatentUse:
    guides = [guide_fn for guide_fn, _ in pieces]
    means = torch.cat(
        [_bounded_means(fn, max_pairs).double().reshape(fn.batch_shape[0], -1) for fn in guides]
    )
    count = means.shape[0]
    variance = means.var(0) if count > 1 else torch.zeros(means.shape[1], dtype=torch.float64)
    kls = [
        None if prior_fn is None else per_dimension_kl(guide_fn, prior_fn)
        for guide_fn, prior_fn in pieces
    ]
    kl = None if any(k is None for k in kls) else torch.cat(kls).double().mean(0)
    return LatentUse(
        kl_per_dim=None if kl is None else kl.cpu().numpy(),
        mean_variance=variance.cpu().numpy(),
        active_units=int((variance > ACTIVE_UNIT_THRESHOLD).sum()),
        mutual_information=_mutual_information(guides, max_pairs),
    )
