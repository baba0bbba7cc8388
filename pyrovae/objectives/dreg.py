"""Doubly reparameterized gradient estimator for IWAE (Tucker, Lawson, Gu & Maddison, 2019)."""

from __future__ import annotations

import math

import torch

from pyrovae.objectives.base import ParticleObjective, score_free


class DReGIWAE(ParticleObjective):
    """The IWAE_K bound with the doubly reparameterized gradient for the guide.

    With normalized weights w~_k = w_k / sum_j w_j:

    * model parameters theta: sum_k w~_k d/dtheta log w_k (the ordinary IWAE gradient);
    * guide parameters phi: sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d phi), the path term
      alone, weighted by the squared normalized weights; unbiased for the IWAE gradient.
      Empirically (Tucker et al.; ``experiments/gradient_snr.py``) its signal-to-noise ratio
      does not fall with K as the IWAE guide gradient's does; that is not a derived property.

    Both come from one backward pass: the surrogate is sum_k sg(w~_k) log w_k with the score
    term removed, and a gradient hook multiplies the gradient reaching each draw z_k by
    sg(w~_k) (sg: stop-gradient), so the guide sees w~_k^2 while the model sees w~_k.
    """

    def surrogate(self, traces) -> torch.Tensor:
        log_weights = self.log_weights(traces)
        normalized = torch.softmax(log_weights.detach(), dim=0)
        self._scale_draw_gradients(traces, normalized)
        path_only = score_free(log_weights, traces)
        bound = torch.logsumexp(log_weights.detach(), 0) - math.log(log_weights.shape[0])
        return (normalized * (path_only - path_only.detach())).sum(0) + bound

    @staticmethod
    def _scale_draw_gradients(traces, normalized: torch.Tensor) -> None:
        for name in traces.latent_names:
            site = traces.guide_sites[name]
            value = site["value"]
            if not value.requires_grad:
                continue
            shape = [1] * value.dim()
            shape[0], shape[traces.data_axis(site)] = normalized.shape
            factor = normalized.reshape(shape)
            value.register_hook(lambda grad, factor=factor: grad * factor)
