"""Per-datapoint estimators of log p(x) from a (K, N) matrix of log importance weights.

``log_weights[k, n] = log p(x_n, z_k) - log q(z_k | x_n)`` with z_k ~ q(. | x_n). All
results are in nats per data point, computed in float64 (log-sum-exp with the maximum
subtracted, so a spread of thousands of nats between weights stays finite).
"""

from __future__ import annotations

import math

import torch


def _float64(log_weights: torch.Tensor) -> torch.Tensor:
    if log_weights.dim() != 2 or log_weights.shape[0] < 1:
        raise ValueError(
            f"log_weights must have shape (K, N) with K >= 1, got {tuple(log_weights.shape)}"
        )
    log_weights = log_weights.to(torch.float64)
    if bool(torch.isnan(log_weights).any()):
        column = int(torch.isnan(log_weights).any(0).nonzero()[0])
        raise ValueError(f"NaN log importance weight for data point {column}")
    return log_weights


def log_mean_exp(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log( (1/K) sum_k exp(w_k) ) along ``dim``, in float64."""
    log_weights = log_weights.to(torch.float64)
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.shape[dim])


def importance_estimate(log_weights: torch.Tensor):
    """Importance-sampled log-likelihood with its standard error and effective sample size.

    Returns
    -------
    log_px : torch.Tensor of shape (N,)
        log p_hat(x) = logsumexp_k(w_k) - log K. A lower bound on log p(x) in expectation
        (Jensen), equal to IWAE_K; its bias shrinks as K grows.
    standard_error : torch.Tensor of shape (N,)
        Delta-method Monte Carlo standard error of log p_hat(x):
        sqrt(Var(exp w) / K) / mean(exp w) = sqrt((K / ESS - 1) / (K - 1)), with the unbiased
        variance; computed from weights scaled by their maximum (exactly 0 for equal weights).
    ess : torch.Tensor of shape (N,)
        Kish effective sample size (sum_k exp w_k)^2 / sum_k exp(2 w_k), between 1 and K.
    """
    log_weights = _float64(log_weights)
    count = log_weights.shape[0]
    log_sum = torch.logsumexp(log_weights, 0)
    ess = torch.exp(2 * log_sum - torch.logsumexp(2 * log_weights, 0))
    scaled = torch.exp(log_weights - log_weights.max(0).values)  # in (0, 1], max exactly 1
    if count > 1:
        relative_variance = scaled.var(0) / (count * scaled.mean(0).square())
    else:
        relative_variance = torch.zeros_like(log_sum)
    return log_sum - math.log(count), relative_variance.sqrt(), ess


def iwae_bound(log_weights: torch.Tensor, k: int) -> torch.Tensor:
    """IWAE_k per data point: the mean over floor(K / k) disjoint groups of k draws of
    log( (1/k) sum_{j in group} exp(w_j) ). IWAE_1 is the ELBO; IWAE_K is log p_hat(x).
    """
    log_weights = _float64(log_weights)
    count = log_weights.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise ValueError(f"k must be an integer between 1 and K={count}, got {k!r}")
    groups = count // k
    grouped = log_weights[: groups * k].reshape(groups, k, -1)
    return log_mean_exp(grouped, dim=1).mean(0)


def elbo(log_weights: torch.Tensor) -> torch.Tensor:
    """Monte Carlo ELBO per data point: the mean of the log weights over the K draws."""
    return _float64(log_weights).mean(0)
