"""Training objectives: Pyro ELBO estimators selectable by name.

Every entry builds a :class:`pyro.infer.ELBO` whose ``__call__(model, guide)`` gives a
:class:`torch.nn.Module` returning the loss (the negative ELBO, in nats, summed over the
data points of the batch).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.infer

OBJECTIVES: dict[str, Callable[..., pyro.infer.ELBO]] = {
    "trace_elbo": pyro.infer.Trace_ELBO,
    "trace_meanfield_elbo": pyro.infer.TraceMeanField_ELBO,
}
"""``trace_elbo``: Monte Carlo KL. ``trace_meanfield_elbo``: analytic KL where available."""

ANALYTIC_KL_OBJECTIVES = frozenset({"trace_meanfield_elbo"})


def make_objective(
    name: str, num_particles: int = 1, max_plate_nesting: int = 1
) -> pyro.infer.ELBO:
    """Build the named objective with vectorized particles.

    Parameters
    ----------
    name : str
        Key of :data:`OBJECTIVES`.
    num_particles : int
        Samples of the latent variables per data point, drawn in one vectorized pass.
    max_plate_nesting : int
        Number of nested plates in the model (1 for a plate over data points).
    """
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {name!r}; valid names: {', '.join(sorted(OBJECTIVES))}"
        )
    return OBJECTIVES[name](
        num_particles=num_particles,
        vectorize_particles=True,
        max_plate_nesting=max_plate_nesting,
    )
