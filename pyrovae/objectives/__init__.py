"""Training objectives, selectable by name.

Every entry builds a :class:`pyro.infer.ELBO` whose ``__call__(model, guide)`` gives a
:class:`torch.nn.Module` returning the loss (minus the bound, in nats, summed over the data
points of the batch):

============================  ================================================================
``trace_elbo``                Pyro ``Trace_ELBO``: ELBO, Monte Carlo KL
``trace_meanfield_elbo``      Pyro ``TraceMeanField_ELBO``: ELBO, analytic KL where available
``traceenum_elbo``            Pyro ``TraceEnum_ELBO``: ELBO summing enumerated discrete sites
                              of the guide (``AmortizedGuide(discrete="amortize")``)
``annealed_meanfield_elbo``   analytic-KL ELBO with KL weight beta, linear warm-up, free bits
``iwae``                      IWAE_K bound (K = ``num_particles``)
``renyi``                     variational Rényi bound of order ``renyi_alpha``
``stl``                       ELBO with the 'sticking the landing' gradient
``dreg``                      IWAE_K with the doubly reparameterized gradient
============================  ================================================================
"""

from __future__ import annotations

import pyro.infer

from pyrovae.objectives.annealed import AnnealedMeanFieldELBO
from pyrovae.objectives.base import ParticleObjective
from pyrovae.objectives.dreg import DReGIWAE
from pyrovae.objectives.elbo import MonteCarloELBO
from pyrovae.objectives.iwae import IWAE
from pyrovae.objectives.renyi import RenyiBound
from pyrovae.objectives.stl import STLELBO

OBJECTIVES: dict[str, type[pyro.infer.ELBO]] = {
    "trace_elbo": pyro.infer.Trace_ELBO,
    "trace_meanfield_elbo": pyro.infer.TraceMeanField_ELBO,
    "traceenum_elbo": pyro.infer.TraceEnum_ELBO,
    "annealed_meanfield_elbo": AnnealedMeanFieldELBO,
    "iwae": IWAE,
    "renyi": RenyiBound,
    "stl": STLELBO,
    "dreg": DReGIWAE,
}

OBJECTIVE_OPTIONS: dict[str, dict[str, str]] = {
    "annealed_meanfield_elbo": {
        "beta": "beta",
        "kl_warmup_epochs": "warmup_epochs",
        "free_bits": "free_bits",
    },
    "renyi": {"renyi_alpha": "alpha"},
}
"""Options each objective takes beyond ``num_particles``: option name -> constructor argument."""

TRACEABLE_EQUIVALENTS: dict[str, type[ParticleObjective]] = {
    "trace_elbo": MonteCarloELBO,
    "trace_meanfield_elbo": AnnealedMeanFieldELBO,
}
"""Pyro ELBOs and the pyrovae objectives with the same value and gradient (reparameterized
guides; ``poutine.scale`` and subsampled plates included) that compiled training steps use in
their place (Pyro's read host values per step)."""

ANALYTIC_KL_OBJECTIVES = frozenset({"trace_meanfield_elbo", "annealed_meanfield_elbo"})

__all__ = [
    "ANALYTIC_KL_OBJECTIVES",
    "OBJECTIVES",
    "OBJECTIVE_OPTIONS",
    "AnnealedMeanFieldELBO",
    "DReGIWAE",
    "IWAE",
    "ParticleObjective",
    "RenyiBound",
    "STLELBO",
    "make_objective",
]


def make_objective(
    name: str,
    num_particles: int = 1,
    max_plate_nesting: int | float | None = 1,
    traceable: bool = False,
    data_plate: str = "data",
    vectorize_particles: bool | None = None,
    **options,
) -> pyro.infer.ELBO:
    """Build the named objective with vectorized particles.

    Parameters
    ----------
    name : str
        Key of :data:`OBJECTIVES`.
    num_particles : int
        Samples of the latent variables per data point, drawn in one vectorized pass
        (K of IWAE_K).
    max_plate_nesting : int, float or None
        Number of nested plates in the model (1 for a plate over data points); ``None`` or
        ``float('inf')`` guesses it from a first run of model and guide (Pyro's ELBOs draw
        from the guide for that guess; pyrovae's objectives do not).
    traceable : bool
        Replace Pyro's ELBOs by their equivalents in :data:`TRACEABLE_EQUIVALENTS`.
    data_plate : str
        Name of the model's plate over data points (pyrovae's objectives take their
        per-datapoint bounds in it; Pyro's ELBOs sum over all sites and do not need it).
    vectorize_particles : bool, optional
        Draw the K particles in one vectorized pass (``True``), one per pass (``False``), or
        decide by checking the model on the first call (``None``; see
        :class:`~pyrovae.objectives.base.ParticleObjective`). Pyro's ELBOs vectorize only
        when this is not ``False`` and K > 1, so that code written for one draw runs them.
    **options
        Objective-specific settings, see :data:`OBJECTIVE_OPTIONS`.
    """
    if name not in OBJECTIVES:
        valid = ", ".join(sorted(OBJECTIVES))
        raise ValueError(f"unknown objective {name!r}; valid names: {valid}")
    accepted = OBJECTIVE_OPTIONS.get(name, {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"objective {name!r} does not take option(s) {', '.join(unknown)}; it takes: "
            f"{', '.join(accepted) or 'none'}"
        )
    arguments = {accepted[option]: value for option, value in options.items()}
    cls = TRACEABLE_EQUIVALENTS.get(name, OBJECTIVES[name]) if traceable else OBJECTIVES[name]
    if max_plate_nesting is None:
        max_plate_nesting = float("inf")
    if issubclass(cls, ParticleObjective):
        return cls(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            data_plate=data_plate,
            **arguments,
        )
    return cls(
        num_particles=num_particles,
        vectorize_particles=vectorize_particles is not False and num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )
