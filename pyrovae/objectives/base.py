"""Base class of the objectives built from per-datapoint log importance weights."""

from __future__ import annotations

import warnings

import pyro.infer
import torch
from pyro.util import warn_if_nan

from pyrovae.evaluation.traces import (
    ParticleTraces,
    guess_max_plate_nesting,
    reduce_terms,
    resolve_plate_nesting,
    run_traces,
)


class ParticleObjective(pyro.infer.ELBO):
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
    vectorize_particles : bool
        The K draws are always taken in one vectorized pass (a plate left of the model's);
        the bounds need them together for the per-datapoint log-sum-exp. ``False`` is
        accepted with one particle (the same computation) and refused with several.
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
        vectorize_particles: bool = True,
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
        _check_vectorized(vectorize_particles, num_particles)
        if tail_adaptive_beta != -1.0:
            raise ValueError(
                f"tail_adaptive_beta={tail_adaptive_beta!r} applies to Pyro's "
                f"TraceTailAdaptive_ELBO only; {type(self).__name__} takes the default -1.0"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf") if nesting is None else nesting,
            vectorize_particles=bool(vectorize_particles),
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

    # -- what subclasses implement -------------------------------------------------------
    def surrogate(self, traces: ParticleTraces) -> torch.Tensor:
        """Per-datapoint bound, shape (N,), carrying the estimator's gradient."""
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} traces through run_traces")

    # -- shared machinery ----------------------------------------------------------------
    def plate_nesting(self, model, guide, args: tuple, kwargs: dict) -> int:
        """The model's plate depth: ``max_plate_nesting``, or guessed once from a run of model
        and guide on the full arguments (any arguments: tensors, numbers or none)."""
        if self._nesting is None:
            self._nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
        return self._nesting

    def traces(self, model, guide, args, kwargs) -> ParticleTraces:
        traces = run_traces(
            model,
            guide,
            args,
            kwargs,
            self.num_particles,
            self.data_plate,
            self.plate_nesting(model, guide, args, kwargs),
            block=False,
            alias_latents=self.alias_latents,
            site_scales=self.linear,
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


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1.0


def _check_num_particles(num_particles) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")


def _check_vectorized(vectorize_particles, num_particles: int) -> None:
    if not vectorize_particles and num_particles > 1:
        raise ValueError(
            f"vectorize_particles=False with num_particles={num_particles} is not supported: "
            "the bounds take a log-sum-exp over the draws of one vectorized pass; use "
            "vectorize_particles=True (the default here)"
        )


def score_free(log_weights: torch.Tensor, traces: ParticleTraces) -> torch.Tensor:
    """``log_weights`` with the same value but without the score-function term
    -d/dphi log q_phi(z)|_z of its gradient (Roeder et al., 2017): only the path terms
    through the reparameterized draws z remain, including those through a guide site's
    dependence on upstream draws (see :meth:`ParticleTraces.guide_score_density`)."""
    score = traces.guide_score_density()
    if score is None:  # no latent sites: nothing to remove
        return log_weights
    return log_weights + score - score.detach()
