"""'Sticking the landing' gradient of the ELBO (Roeder, Wu & Duvenaud, 2017)."""

from __future__ import annotations

import torch

from pyrovae.objectives.base import ParticleObjective, score_free


class STLELBO(ParticleObjective):
    """The ELBO (mean over K draws of log w_k) with the score-function term dropped from
    the guide's gradient.

    The reparameterized ELBO gradient for guide parameters phi is a path term through z plus
    the score term -E_q[d/dphi log q(z; phi)], whose expectation is zero. Dropping it keeps
    the estimator unbiased and removes its variance; as q approaches the exact posterior the
    remaining variance goes to zero. Model-parameter gradients are unchanged.

    Only the score term is removed: for a guide whose sites depend on each other,
    q(z1 | x) q(z2 | z1), the path term through q(z2 | z1)'s dependence on z1 stays (log q is
    differentiated with the guide's parameters held fixed, the draws free), so at the exact
    posterior the guide gradient is zero draw by draw. Takes :class:`ParticleObjective`'s
    (Pyro's) arguments; site-specific scales are allowed, as for the ELBO.
    """

    linear = True

    def surrogate(self, traces) -> torch.Tensor:
        return score_free(self.log_weights(traces), traces).mean(0)
