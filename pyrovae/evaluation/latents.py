"""How the latent variables are used: KL per latent dimension, active units, and the mutual
information between x and z under q, for each latent site of any Pyro model and guide.
"""

from __future__ import annotations

import math
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
from pyrovae.posteriors import posterior_moments

ACTIVE_UNIT_THRESHOLD = 0.01
"""A dimension d is active when Cov_x(E_q[z_d | x]) exceeds this (Burda et al., 2016)."""


@dataclass
class LatentUse:
    """Latent-use diagnostics of one latent site (vector-valued sites: one entry per dimension).

    Attributes
    ----------
    kl_per_dim : numpy.ndarray or None
        Mean over data points of KL(q(z_d | x) || p(z_d)) in nats, per dimension; ``None``
        when the pair has no closed form per dimension.
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


def _mutual_information(guide_fn, num_points: int) -> float:
    z = guide_fn.sample()  # (N, L): one draw per data point
    log_q_own = guide_fn.log_prob(z)  # (N,)
    rows = []
    for start in range(0, num_points, 256):  # (rows, N) log q(z_n | x_m) blocks
        draws = z[start : start + 256].unsqueeze(1)  # expanded: conditional flows need it
        block = guide_fn.log_prob(draws.expand(-1, num_points, -1))
        rows.append(torch.logsumexp(block.double(), dim=1) - math.log(num_points))
    log_aggregate = torch.cat(rows)
    return float((log_q_own.double() - log_aggregate).mean())


@torch.no_grad()
def latent_use(model, guide, *args, max_points: int = 2000, seed: int = 0, **kwargs):
    """Latent-use diagnostics for each latent site, from one pass of guide and model.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide taking ``*args, **kwargs`` (the data's first axis is the plate).
    max_points : int
        Evaluate on at most this many data points (a random subset, fixed by ``seed``); the
        mutual-information estimate costs O(max_points^2).
    seed : int
        Seeds the subset and the draws of the mutual-information estimate.

    Returns
    -------
    dict of str to LatentUse
    """
    length = _batched_length(args, kwargs)
    count = min(length, max_points)
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(length, generator=generator)[:count].sort().values
    args, kwargs = _slice_arguments(args, kwargs, length, subset)
    devices = [t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # seeded draws; the caller's RNG is untouched
        torch.manual_seed(seed)
        with poutine.block():
            model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
        results = _site_diagnostics(model_trace, guide_trace, count)
    return results


def _site_diagnostics(model_trace, guide_trace, count: int) -> dict[str, LatentUse]:
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    _check_site_names(model_sites, guide_sites)
    results = {}
    for name, guide_site in guide_sites.items():
        guide_fn = guide_site["fn"]
        means = posterior_moments(guide_fn)[0].reshape(count, -1).double()
        variance = means.var(0) if count > 1 else torch.zeros(means.shape[1])
        kl = per_dimension_kl(guide_fn, model_sites[name]["fn"])
        results[name] = LatentUse(
            kl_per_dim=None if kl is None else kl.double().mean(0).cpu().numpy(),
            mean_variance=variance.cpu().numpy(),
            active_units=int((variance > ACTIVE_UNIT_THRESHOLD).sum()),
            mutual_information=_mutual_information(guide_fn, count),
        )
    return results
