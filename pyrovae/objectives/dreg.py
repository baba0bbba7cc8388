"""Doubly reparameterized gradient estimator for IWAE (Tucker, Lawson, Gu & Maddison, 2019)."""

from __future__ import annotations

import math

import torch

from pyrovae.evaluation.traces import SequentialTraces, reduce_terms
from pyrovae.objectives.base import ParticleObjective


class DReGIWAE(ParticleObjective):
    """The IWAE_K bound with the doubly reparameterized gradient for the guide.

    With normalized weights w~_k = w_k / sum_j w_j:

    * model parameters theta: sum_k w~_k d/dtheta log w_k (the ordinary IWAE gradient);
    * guide parameters phi: sum_k w~_k^2 times the path derivative of
      log w_k = log p(x, z_k) - log q_phi(z_k): its derivative through the draws z_k only
      (phi held fixed in log q; through q(z2 | z1)'s dependence on z1 too); unbiased for
      the IWAE gradient. Empirically (Tucker et al.; ``experiments/gradient_snr.py``) its
      signal-to-noise ratio does not fall with K as the IWAE guide gradient's does; that is
      not a derived property.

    One backward pass gives both, each draw's weight applied once: the surrogate is
    sum_k sg(w~_k) log p(x, z'_k) - sum_k sg(w~_k^2) [log q(z_k), path terms only], where the
    model is replayed on aliases z'_k of the draws whose gradient hooks multiply what reaches
    them by sg(w~_k) (sg: stop-gradient). The model's parameters see w~_k, the draws (and
    through them the guide) w~_k^2 from the model's side; the log q side carries w~_k^2
    itself. The value is the IWAE_K bound. Takes :class:`ParticleObjective`'s (Pyro's)
    arguments.
    """

    alias_latents = True

    def surrogate(self, traces) -> torch.Tensor:
        terms = reduce_terms(traces, with_kl=False)
        log_weights = terms.log_weights
        normalized = torch.softmax(log_weights.detach(), dim=0)
        self._scale_model_draw_gradients(traces, normalized)
        log_q = terms.log_q
        score = traces.guide_score_density()
        if score is not None:
            log_q = log_q - score + score.detach()  # path terms of log q only
        surrogate = (normalized * (terms.log_p_obs + terms.log_p_latent)).sum(0)
        surrogate = surrogate - (normalized.square() * log_q).sum(0)
        bound = torch.logsumexp(log_weights.detach(), 0) - math.log(log_weights.shape[0])
        return surrogate - surrogate.detach() + bound

    @classmethod
    def _scale_model_draw_gradients(cls, traces, normalized: torch.Tensor) -> None:
        """Multiply the gradient reaching the model's alias of each draw z_k by sg(w~_k)."""
        if isinstance(traces, SequentialTraces):  # one pass per draw, no particle axis
            for k, part in enumerate(traces.parts):
                cls._scale_single_draw(part, normalized[k])
            return
        for name in traces.latent_names:
            site = traces.model_sites[name]
            value = site["value"]
            if not value.requires_grad:
                continue
            shape = [1] * value.dim()
            shape[0], shape[traces.data_axis(traces.guide_sites[name])] = normalized.shape
            factor = normalized.reshape(shape)
            value.register_hook(lambda grad, factor=factor: grad * factor)

    @staticmethod
    def _scale_single_draw(part, weights: torch.Tensor) -> None:
        """The same for one pass without a particle axis; ``weights`` has shape (N,)."""
        for name in part.latent_names:
            value = part.model_sites[name]["value"]
            if not value.requires_grad:
                continue
            site = part.guide_sites[name]
            axis = value.dim() - len(site["fn"].event_shape) + _data_dim(site, part.data_plate)
            shape = [1] * value.dim()
            shape[axis] = weights.shape[0]
            factor = weights.reshape(shape)
            value.register_hook(lambda grad, factor=factor: grad * factor)


def _data_dim(site: dict, data_plate: str) -> int:
    return next(f.dim for f in site["cond_indep_stack"] if f.name == data_plate)
