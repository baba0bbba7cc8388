"""The ELBO of a model with global latent sites, per data point, weighted right under
minibatches.

For global sites theta (outside the data plate) and local sites z_n, with the guide
q(theta) prod_n q(z_n | x_n) of :class:`pyrovae.models.hybrid.HybridGuide`, the ELBO of the
whole data set X = (x_1..x_N) is

    ELBO = E_q(theta)[ log p(theta) - log q(theta) + sum_n ELBO_n(theta) ],
    ELBO_n(theta) = E_q(z_n | x_n)[ log p(x_n, z_n | theta) - log q(z_n | x_n) ].

:class:`GlobalLatentELBO` draws one theta ~ q(theta) per step (reparameterized), computes the
global term g = log p(theta) - log q(theta) once, runs any objective of the ELBO family
(``MonteCarloELBO``, ``AnnealedMeanFieldELBO``, ``STLELBO``) on the model conditioned on
theta for the local per-point bounds, and gives each data point the bound
ELBO_n(theta) + g / N, N the size of the *whole* data set (``num_data``). Summed over all N
points this is an unbiased estimate of the ELBO; the minibatch mean that
:func:`pyrovae.training.fit` minimises is, in expectation, ELBO / N: the global KL is counted
once per data set, the local terms by N / B per minibatch of B. (Counting g once per
minibatch, as an unscaled ``Trace_ELBO`` does, would weight the prior of theta N / B times.)

Objectives with a log-sum-exp over draws (IWAE, Rényi, DReG) are refused: one shared theta
makes the data points' weights dependent, so the per-point log-sum-exp of w_nk(theta) is no
bound on log p(x_n | X_-n), and a bound of the whole data set would need the product over
points inside the log-sum-exp over theta draws.
"""

from __future__ import annotations

import numbers

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.models.hybrid import ConditionedOnGlobals, is_hybrid
from pyrovae.objectives import OBJECTIVES
from pyrovae.objectives.base import DifferentiableLossELBO, ParticleObjective
from pyrovae.objectives.elbo import MonteCarloELBO


def refuse_nonlinear(objective_name: str, linear: bool) -> None:
    """Raise for an objective with a log-sum-exp over draws on a model with global sites."""
    if not linear:
        raise ValueError(
            f"objective {objective_name!r} takes a log-sum-exp over draws within each data "
            "point, but the model has global latent sites: one shared global draw couples "
            "the data points' weights, so the per-point log-sum-exp is no bound. Use an "
            "ELBO objective (trace_elbo, trace_meanfield_elbo, annealed_meanfield_elbo, stl)"
        )


def as_particle_objective(objective, data_plate: str = "data") -> ParticleObjective:
    """``objective`` as a pyrovae :class:`ParticleObjective`: Pyro's ``Trace_ELBO`` and
    ``TraceMeanField_ELBO`` become their equivalents (same value and gradient for
    reparameterized guides, :data:`pyrovae.objectives.TRACEABLE_EQUIVALENTS`) with the same
    number of particles."""
    from pyrovae.objectives import TRACEABLE_EQUIVALENTS

    if isinstance(objective, ParticleObjective):
        return objective
    for name, equivalent in TRACEABLE_EQUIVALENTS.items():
        if type(objective) is OBJECTIVES[name]:
            return equivalent(num_particles=objective.num_particles, data_plate=data_plate)
    raise ValueError(
        f"{type(objective).__name__} cannot take per-datapoint bounds with global latent "
        "sites; use one of pyrovae's ELBO-family objectives"
    )


class GlobalLatentELBO(DifferentiableLossELBO):
    """Per-datapoint ELBO with global latent sites: ELBO_n(theta) + (log p(theta) -
    log q(theta)) / N for one theta ~ q(theta) per step (module docstring).

    Parameters
    ----------
    local : ParticleObjective, optional
        The objective of the local sites given theta; an ELBO-family objective
        (``linear``), default :class:`~pyrovae.objectives.elbo.MonteCarloELBO` with one
        particle. Its ``num_particles`` local draws share the step's theta.
    num_data : int
        N, the number of data points of the whole training set.

    The guide must be a :class:`~pyrovae.models.hybrid.HybridGuide`. The loss (nats) is
    ``-(outer scale) * sum over the batch of the bounds``, the outer scale being the data
    plate's subsampling scale times ``poutine.scale`` (1 for ``fit``'s unscaled plates); a
    model whose data plate is scaled to the whole data set gets Pyro's ``Trace_ELBO`` loss.
    """

    def __init__(self, local: ParticleObjective | None = None, *, num_data: int):
        local = MonteCarloELBO() if local is None else local
        if not isinstance(local, ParticleObjective):
            raise TypeError(
                f"local must be a pyrovae ParticleObjective, got {type(local).__name__} (for "
                "Pyro's Trace_ELBO use pyrovae.objectives.MonteCarloELBO, its equivalent)"
            )
        refuse_nonlinear(type(local).__name__, local.linear)
        if isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral):
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        if num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        super().__init__(num_particles=local.num_particles)
        self.local = local
        self.num_data = int(num_data)
        self.data_plate = local.data_plate
        self._conditioned: dict[int, ConditionedOnGlobals] = {}

    def start_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the local objective (e.g. a KL warm-up)."""
        if hasattr(self.local, "start_epoch"):
            self.local.start_epoch(epoch)

    def conditioned(self, model, guide) -> ConditionedOnGlobals:
        """The one :class:`ConditionedOnGlobals` of ``model`` used at every step."""
        if not is_hybrid(guide):
            raise ValueError(
                "GlobalLatentELBO needs a HybridGuide (pyrovae.models.hybrid): a global guide "
                f"for the global sites beside a local one; got {type(guide).__name__}"
            )
        key = id(model)
        if key not in self._conditioned:
            self._conditioned[key] = guide.conditioned(model)
        return self._conditioned[key]

    def global_term(self, model, guide, args: tuple, kwargs: dict):
        """(theta, log p(theta) - log q(theta)): one draw from the global guide, in nats,
        differentiable; log q includes an autoguide's auxiliary site and its Jacobians."""
        guide_trace = guide.global_trace(*args, **kwargs)
        theta = {name: guide_trace.nodes[name]["value"] for name in guide.global_sites}
        return theta, global_log_prior(model, guide, guide_trace, args, kwargs) - guide_log_q(
            guide_trace
        )

    def plate_nesting(self, model, guide, args: tuple, kwargs: dict) -> int:
        """Check the conditioned model and local guide (on a draw of theta, without
        gradients) and return their plate depth; run before a compiled step is traced."""
        conditioned = self.conditioned(model, guide)
        with torch.no_grad():
            conditioned.values, _ = self.global_term(model, guide, args, kwargs)
        return self.local.plate_nesting(conditioned, guide.local_guide, args, kwargs)

    def per_datapoint(self, model, guide, args: tuple, kwargs: dict):
        """(bounds of shape (B,), outer scale): ELBO_n(theta) + g / N for one theta."""
        conditioned = self.conditioned(model, guide)
        conditioned.values, global_term = self.global_term(model, guide, args, kwargs)
        traces = self.local.traces(conditioned, guide.local_guide, args, kwargs)
        return self.local.surrogate(traces) + global_term / self.num_data, traces.outer_scale

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the bounds summed over the batch, times the outer scale (nats)."""
        bounds, outer = self.per_datapoint(model, guide, args, kwargs)
        total = bounds.sum()
        return -total if isinstance(outer, (int, float)) and outer == 1.0 else -(total * outer)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("GlobalLatentELBO traces through its local objective")


def guide_log_q(guide_trace) -> torch.Tensor:
    """log q of every sample site of a global guide's trace (nats; an autoguide's auxiliary
    site and the log-Jacobian terms of its ``Delta`` sites included)."""
    total = 0.0
    for site in prune_subsample_sites(guide_trace).nodes.values():
        if site["type"] == "sample":
            total = total + site["fn"].log_prob(site["value"]).sum()
    return torch.as_tensor(total)


def global_log_prior(model, guide, guide_trace, args: tuple, kwargs: dict) -> torch.Tensor:
    """log p(theta) of the global sites at the guide trace's values (nats): the model
    replayed on them, its other sites hidden. A global site under ``poutine.scale`` or a mask
    is refused: the weighting of the global term is this objective's (once per data set)."""
    blocked = poutine.block(
        poutine.replay(model, trace=guide_trace), expose=list(guide.global_sites)
    )
    trace = poutine.trace(blocked).get_trace(*args, **kwargs)
    total = 0.0
    for name in guide.global_sites:
        site = trace.nodes[name]
        scale = site["scale"]
        if not (isinstance(scale, numbers.Number) and scale == 1.0) or site["mask"] is not None:
            raise ValueError(
                f"global site {name!r} is scaled or masked in the model: the global term is "
                "counted once per data set here; scale (poutine.scale) only the local part"
            )
        total = total + site["fn"].log_prob(site["value"]).sum()
    return torch.as_tensor(total)


__all__ = [
    "GlobalLatentELBO",
    "as_particle_objective",
    "global_log_prior",
    "guide_log_q",
    "refuse_nonlinear",
]
