"""Closed-form KL divergences that torch's registry lacks, registered on import.

KL(N(mu, Sigma) || N(m, diag s^2)) for a full-covariance or low-rank-plus-diagonal Gaussian
against a diagonal one (e.g. the standard Normal prior written as
``Normal(0, 1).expand([L]).to_event(1)``), in nats:

    1/2 [ tr(S^-1 Sigma) + (m - mu)^T S^-1 (m - mu) - L + log det S - log det Sigma ],
    S = diag(s^2).

This is what lets the analytic-KL objective use full-covariance guides, as in the lecture
notes' general Gaussian posterior.
"""

from __future__ import annotations

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)


def _diagonal_normal(distribution) -> Normal | None:
    if isinstance(distribution, Independent) and distribution.reinterpreted_batch_ndims == 1:
        base = distribution.base_dist
        if isinstance(base, Normal):
            return base
    return None


def gaussian_to_diagonal_kl(loc, covariance, log_det, prior_loc, prior_scale) -> torch.Tensor:
    """KL(N(loc, covariance) || N(prior_loc, diag prior_scale^2)), batched; ``log_det`` is
    log det covariance."""
    variance = prior_scale.square()
    trace = (covariance.diagonal(dim1=-2, dim2=-1) / variance).sum(-1)
    mahalanobis = ((prior_loc - loc).square() / variance).sum(-1)
    dimension = loc.shape[-1]
    return 0.5 * (trace + mahalanobis - dimension + variance.log().sum(-1) - log_det)


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal(p: MultivariateNormal, q: Independent):
    prior = _diagonal_normal(q)
    if prior is None:
        raise NotImplementedError
    log_det = 2 * p.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return gaussian_to_diagonal_kl(p.loc, p.covariance_matrix, log_det, prior.loc, prior.scale)


@register_kl(LowRankMultivariateNormal, Independent)
def _kl_lowrank_diagonal(p: LowRankMultivariateNormal, q: Independent):
    prior = _diagonal_normal(q)
    if prior is None:
        raise NotImplementedError
    log_det = 2 * p._capacitance_tril.diagonal(dim1=-2, dim2=-1).log().sum(
        -1
    ) + p.cov_diag.log().sum(-1)
    return gaussian_to_diagonal_kl(p.loc, p.covariance_matrix, log_det, prior.loc, prior.scale)


__all__ = ["gaussian_to_diagonal_kl", "kl_divergence"]
