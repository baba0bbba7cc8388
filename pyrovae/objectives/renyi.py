"""Variational Rényi bound (Li & Turner, 2016), computed per data point."""

from __future__ import annotations

import math

import torch

from pyrovae.objectives.base import ParticleObjective


class RenyiBound(ParticleObjective):
    """L_alpha = 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha) per data point.

    alpha = 0 gives IWAE_K; alpha -> 1 tends to the ELBO (use ``trace_elbo`` for alpha = 1);
    for 0 <= alpha < 1 the bound lies between the ELBO and log p(x) in expectation (K
    finite). Pyro's ``RenyiELBO`` sums the whole plate before its log-sum-exp, which is
    only right with one data point or no subsampling; here the log-sum-exp is per data point.

    Parameters
    ----------
    alpha : float
        Rényi order, ``alpha >= 0`` and ``alpha != 1``.
    num_particles : int
        K, draws per data point (vectorized).
    max_plate_nesting, max_iarange_nesting, vectorize_particles, strict_enumeration_warning
        As Pyro's ``RenyiELBO`` (same order); see :class:`ParticleObjective`.
    data_plate : str
        Name of the plate over data points.
    **options
        Pyro's other ELBO arguments (see :class:`ParticleObjective`).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        num_particles: int = 2,
        max_plate_nesting: int | float | None = float("inf"),
        max_iarange_nesting: int | None = None,
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
        *,
        data_plate: str = "data",
        **options,
    ):
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or alpha < 0
            or alpha == 1
        ):
            raise ValueError(
                f"alpha must be >= 0 and != 1 (alpha = 1 is trace_elbo), got {alpha!r}"
            )
        super().__init__(
            num_particles,
            max_plate_nesting,
            max_iarange_nesting,
            vectorize_particles,
            strict_enumeration_warning,
            data_plate=data_plate,
            **options,
        )
        self.alpha = float(alpha)

    def surrogate(self, traces) -> torch.Tensor:
        log_weights = self.log_weights(traces) * (1.0 - self.alpha)
        log_mean = torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0])
        return log_mean / (1.0 - self.alpha)
