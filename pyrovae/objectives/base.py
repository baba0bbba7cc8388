"""Base class of the objectives built from per-datapoint log importance weights."""

from __future__ import annotations

import warnings

import pyro.infer
import torch
from pyro.util import warn_if_nan

from pyrovae.evaluation.structure import ModelStructure, check_structure
from pyrovae.evaluation.traces import (
    ParticleTraces,
    SequentialTraces,
    reduce_terms,
    resolve_plate_nesting,
    run_traces,
)


class DifferentiableLossELBO(pyro.infer.ELBO):
    """A Pyro ELBO whose :meth:`loss` and :meth:`loss_and_grads` come from its
    ``differentiable_loss`` (minus the bound, nats), as :class:`pyro.infer.SVI` calls them."""

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float (nats), without gradients; warns on NaN as Pyro's ELBOs do."""
        with torch.no_grad():
            value = float(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(value, "loss")
        return value

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float (nats), after accumulating its gradients into ``.grad``.

        As Pyro's ELBOs, with nothing trainable (a loss without autograd history) no
        backward pass runs and the loss is returned; a NaN loss warns."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        value = float(loss.detach())
        warn_if_nan(value, "loss")
        return value


class ParticleObjective(DifferentiableLossELBO):
    """A variational objective computed from K vectorized draws z_k ~ q(z | x_n) per data point.

    Subclasses implement :meth:`surrogate`, returning for each data point a tensor whose
    *value* is the bound (nats, higher is better) and whose *gradient* is the estimator's
    gradient. The loss is minus the sum over the batch times the common scale of the sites
    (``poutine.scale`` times the data plate's subsampling scale, (plate size) / (batch
    size)), as for Pyro's own ELBOs; so ``objective(model, guide)`` is a
    :class:`torch.nn.Module` (Pyro's ``ELBOModule``) and the objective also works with
    :class:`pyro.infer.SVI`.

    Scales (see :mod:`pyrovae.evaluation.traces`): the subsampling scales of plates other
    than the data plate multiply the log densities inside each data point's log weight;
    ``poutine.scale`` and the data plate's subsampling scale multiply the per-datapoint bound
    after the log-sum-exp over draws. Unlike ``pyro.infer.RenyiELBO``, which applies the
    subsampling scale *before* the log-sum-exp and so is wrong for a subsampled plate, every
    log-sum-exp here is taken per data point, inside the plate. Objectives linear in the
    site terms (:attr:`linear`) also take site-specific ``poutine.scale`` factors, site by
    site as Pyro's ``Trace_ELBO``; the others refuse them.

    Parameters
    ----------
    num_particles : int
        K, draws per data point (vectorized).
    max_plate_nesting : int or float, optional
        Plate depth of the model, without the particle plate. ``float('inf')`` (Pyro's
        default) or ``None``: guessed by running model and guide once, on a private copy of
        the RNG (seeded draws that follow are unchanged), then cached.
    max_iarange_nesting : int, optional
        Deprecated alias of ``max_plate_nesting`` (a ``DeprecationWarning``, as in Pyro).
    vectorize_particles : bool, optional
        ``True``: the K draws are taken in one vectorized pass (a plate left of the
        model's); ``False``: one draw per pass (Pyro's meaning), for programs written for
        one draw; ``None`` (default): vectorized when the model and guide broadcast over a
        leading particle dimension, which the first call checks (see
        :mod:`pyrovae.evaluation.structure`), else one per pass with one warning. Either
        way the bound is the same per-datapoint function of the K draws.
    strict_enumeration_warning : bool
        Stored for compatibility; these objectives never enumerate discrete sites (they need
        reparameterized guide sites), so there is nothing to warn about.
    ignore_jit_warnings, jit_options
        Stored for compatibility; no PyTorch JIT is used (:mod:`pyrovae.compiled` traces the
        loss and gradients instead), exactly as for Pyro's non-JIT ``Trace_ELBO``.
    retain_graph : bool, optional
        Passed to ``backward`` in :meth:`loss_and_grads`.
    tail_adaptive_beta : float
        Pyro's ``TraceTailAdaptive_ELBO`` setting; only its default -1 is accepted.
    data_plate : str
        Name of the model's plate over data points; every latent site must be inside it.
    """

    needs_reparameterization = True
    linear = False
    """Whether the bound is linear in the sites' log densities (the ELBO family), so that
    site-specific scales can be multiplied in site by site."""
    alias_latents = False
    """Whether the model is replayed on autograd aliases of the guide's draws (DReG's hooks)."""

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int | float | None = float("inf"),
        max_iarange_nesting: int | None = None,
        vectorize_particles: bool | None = None,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
        retain_graph: bool | None = None,
        tail_adaptive_beta: float = -1.0,
        *,
        data_plate: str = "data",
    ):
        _check_num_particles(num_particles)
        if max_iarange_nesting is not None:
            warnings.warn(
                "max_iarange_nesting is deprecated; use max_plate_nesting instead",
                DeprecationWarning,
                stacklevel=2,
            )
            max_plate_nesting = max_iarange_nesting
        nesting = resolve_plate_nesting(max_plate_nesting)
        if vectorize_particles not in (None, True, False):
            raise ValueError(
                f"vectorize_particles must be True, False or None, got {vectorize_particles!r}"
            )
        if tail_adaptive_beta != -1.0:
            raise ValueError(
                f"tail_adaptive_beta={tail_adaptive_beta!r} applies to Pyro's "
                f"TraceTailAdaptive_ELBO only; {type(self).__name__} takes the default -1.0"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf") if nesting is None else nesting,
            vectorize_particles=vectorize_particles is not False,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )
        # Pyro adds the particle plate to max_plate_nesting; here it is the model's own depth.
        self.max_plate_nesting = float("inf") if nesting is None else nesting
        self.data_plate = data_plate
        self._nesting = nesting
        self._vectorize = vectorize_particles
        self._structures: dict[tuple[int, int], ModelStructure] = {}

    # -- what subclasses implement -------------------------------------------------------
    def surrogate(self, traces: ParticleTraces) -> torch.Tensor:
        """Per-datapoint bound, shape (N,), carrying the estimator's gradient."""
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} traces through run_traces")

    # -- shared machinery ----------------------------------------------------------------
    def prepare(self, model, guide, *args, **kwargs) -> ModelStructure:
        """Check ``model`` and ``guide`` once, on private random streams, before their first
        step (:func:`~pyrovae.evaluation.structure.check_structure`): the refusals come
        before any parameter changes. Returns the structure (cached per model and guide)."""
        key = (id(model), id(guide))
        if key not in self._structures:
            structure = check_structure(
                model,
                guide,
                *args,
                data_plate=self.data_plate,
                max_plate_nesting=self._nesting,
                probe_rows=None,  # any arguments: run on the call's own
                **kwargs,
            )
            if self._nesting is None:
                self._nesting = structure.max_plate_nesting
            if not self.linear:
                structure.require_common_scale(f"the {type(self).__name__} objective")
            self._check_particles(structure)
            self._structures[key] = structure
        return self._structures[key]

    def _check_particles(self, structure: ModelStructure) -> None:
        if structure.vectorized or self._vectorize is False:
            return
        if self._vectorize:
            raise ValueError(
                "vectorize_particles=True: the model and guide do not broadcast over a leading "
                f"particle dimension ({structure.why_sequential}); pass "
                "vectorize_particles=None or False to draw the particles one per pass"
            )
        structure.warn_if_sequential(self.num_particles, stacklevel=5)

    def plate_nesting(self, model, guide, args: tuple, kwargs: dict) -> int:
        """The model's plate depth: ``max_plate_nesting``, or found by the first check."""
        return self.prepare(model, guide, *args, **kwargs).max_plate_nesting

    def traces(self, model, guide, args, kwargs) -> ParticleTraces | SequentialTraces:
        structure = self.prepare(model, guide, *args, **kwargs)
        vectorized = structure.vectorized if self._vectorize is None else self._vectorize
        traces = run_traces(
            model,
            guide,
            args,
            kwargs,
            self.num_particles,
            self.data_plate,
            structure.max_plate_nesting,
            block=False,
            alias_latents=self.alias_latents,
            site_scales=self.linear,
            vectorized=vectorized,
        )
        if self.needs_reparameterization:
            self._check_reparameterized(traces)
        return traces

    def _check_reparameterized(self, traces: ParticleTraces) -> None:
        for name in traces.latent_names:
            if not traces.guide_sites[name]["fn"].has_rsample:
                raise ValueError(
                    f"{type(self).__name__} needs reparameterized guide sites, but site {name!r} "
                    f"has a {type(traces.guide_sites[name]['fn']).__name__} distribution without "
                    "rsample; use Pyro's TraceGraph_ELBO for non-reparameterized guides"
                )

    @staticmethod
    def log_weights(traces: ParticleTraces) -> torch.Tensor:
        """log p(x_n, z_k) - log q(z_k | x_n), shape (K, N), differentiable; each site's log
        density times its inner-plate subsampling scale (see :class:`ParticleTraces`)."""
        return reduce_terms(traces, with_kl=False).log_weights

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the per-datapoint bound summed over the batch, times the common outer scale
        (poutine.scale x data-plate subsampling scale), in nats."""
        traces = self.traces(model, guide, args, kwargs)
        total = self.surrogate(traces).sum()
        outer = traces.outer_scale
        return -total if _is_one(outer) else -(total * outer)


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1.0


def _check_num_particles(num_particles) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")


def score_free(log_weights: torch.Tensor, traces: ParticleTraces) -> torch.Tensor:
    """``log_weights`` with the same value but without the score-function term
    -d/dphi log q_phi(z)|_z of its gradient (Roeder et al., 2017): only the path terms
    through the reparameterized draws z remain, including those through a guide site's
    dependence on upstream draws (see :meth:`ParticleTraces.guide_score_density`)."""
    score = traces.guide_score_density()
    if score is None:  # no latent sites: nothing to remove
        return log_weights
    return log_weights + score - score.detach()
