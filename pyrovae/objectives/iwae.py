"""Importance-weighted bound (Burda et al., 2016)."""

from __future__ import annotations

import math

import torch

from pyrovae.objectives.base import ParticleObjective


class IWAE(ParticleObjective):
    """IWAE_K = log (1/K) sum_k p(x, z_k) / q(z_k | x) per data point, with the ordinary
    reparameterized gradient: sum_k w~_k d/dtheta,phi log w_k, w~ the normalized weights.

    IWAE_1 is the ELBO; IWAE_K increases with K towards log p(x). Takes
    :class:`ParticleObjective`'s (Pyro's) arguments.
    """

    def surrogate(self, traces) -> torch.Tensor:
        log_weights = self.log_weights(traces)
        return torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0])
