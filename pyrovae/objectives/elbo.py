"""The ELBO with Monte Carlo KL, from per-datapoint log weights."""

from __future__ import annotations

import torch

from pyrovae.objectives.base import ParticleObjective


class MonteCarloELBO(ParticleObjective):
    """ELBO = mean over K draws of log p(x, z_k) - log q(z_k | x), per data point.

    For reparameterized guides its value and gradient equal Pyro's ``Trace_ELBO`` on the same
    draws, with ``poutine.scale`` and subsampled plates (site-specific scales included: the
    ELBO is linear in the site terms); unlike ``Trace_ELBO`` it never moves a number to the
    host (``.item()``) during the loss, so it can be traced into a graph (see
    :mod:`pyrovae.compiled`). Takes :class:`ParticleObjective`'s (Pyro's) arguments.
    """

    linear = True

    def surrogate(self, traces) -> torch.Tensor:
        return self.log_weights(traces).mean(0)
