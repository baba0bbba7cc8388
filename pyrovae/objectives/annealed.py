"""Analytic-KL ELBO with KL weighting (beta), linear KL annealing and free bits."""

from __future__ import annotations

import torch

from pyrovae.evaluation.latents import per_dimension_kl
from pyrovae.evaluation.traces import SequentialTraces, reduce_terms
from pyrovae.objectives.base import ParticleObjective


class AnnealedMeanFieldELBO(ParticleObjective):
    """E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)), per data point, with the KL in closed form.

    Parameters
    ----------
    beta : float
        Final weight of the KL term (1 gives the ELBO; the objective is a bound only then).
    warmup_epochs : int
        Linear KL annealing: the weight is ``beta * min(1, epoch / warmup_epochs)`` during
        epoch ``epoch`` (1-based); 0 disables annealing. Training calls :meth:`start_epoch`.
    free_bits : float
        Free bits lambda (Kingma et al., 2016), in nats per latent dimension: the KL term is
        sum_d max(lambda, mean over the minibatch of KL_d), so dimensions whose average KL is
        below lambda are not pushed further towards the prior. 0 disables it. The term is
        the same for every data point of the minibatch, so with beta = 1 the objective is
        a bound for the minibatch average, not for each point.
    data_plate : str
        Name of the plate over data points.
    **options
        Pyro's ELBO arguments (``max_plate_nesting``, ``vectorize_particles``, ...), see
        :class:`ParticleObjective`.

    With ``beta=1``, no warm-up and no free bits its value and gradient equal Pyro's
    ``TraceMeanField_ELBO`` on the same draws, scales included (each KL takes its guide
    site's scale and mask, as Pyro's does); it is linear in the site terms, so
    site-specific scales are allowed.
    """

    linear = True

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        warmup_epochs: int = 0,
        free_bits: float = 0.0,
        *,
        data_plate: str = "data",
        **options,
    ):
        if not beta >= 0:
            raise ValueError(f"beta must be non-negative, got {beta!r}")
        if (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, int)
            or warmup_epochs < 0
        ):
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        if not free_bits >= 0:
            raise ValueError(f"free_bits must be non-negative, got {free_bits!r}")
        super().__init__(num_particles, data_plate=data_plate, **options)
        self.beta, self.warmup_epochs, self.free_bits = float(beta), warmup_epochs, float(free_bits)
        self.kl_weight = self.beta if warmup_epochs == 0 else 0.0

    def start_epoch(self, epoch: int) -> None:
        """Set the KL weight for a 1-based epoch number."""
        ramp = 1.0 if self.warmup_epochs == 0 else min(1.0, epoch / self.warmup_epochs)
        self.kl_weight = self.beta * ramp

    def surrogate(self, traces) -> torch.Tensor:
        terms = reduce_terms(traces)
        kl = terms.kl.mean(0) if self.free_bits == 0 else self._free_bits_kl(traces, terms)
        return terms.log_p_obs.mean(0) - self.kl_weight * kl

    def _free_bits_kl(self, traces, terms) -> torch.Tensor:
        if isinstance(traces, SequentialTraces):
            raise ValueError(
                "free bits average the KL over the particles of one vectorized pass; this model "
                "runs one draw per pass (it does not broadcast over a particle dimension): use "
                "free_bits=0, or write the model to broadcast over leading dimensions"
            )
        total = 0.0
        for name in traces.latent_names:
            per_dim = per_dimension_kl(
                traces.guide_sites[name]["fn"], traces.model_sites[name]["fn"]
            )
            if per_dim is None:
                raise ValueError(
                    f"free bits need a closed-form KL per latent dimension; site {name!r} has none"
                )
            batch_mean = per_dim.reshape(traces.num_particles, -1, per_dim.shape[-1]).mean((0, 1))
            total = total + batch_mean.clamp_min(self.free_bits).sum()
        return torch.as_tensor(total).expand(terms.kl.shape[1])
