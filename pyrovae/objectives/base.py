"""Base class of the objectives built from per-datapoint log importance weights."""

from __future__ import annotations

import pyro.infer
import torch

from pyrovae.evaluation.traces import (
    ParticleTraces,
    _batched_length,
    _slice_arguments,
    guess_max_plate_nesting,
    reduce_terms,
    run_traces,
)


class ParticleObjective(pyro.infer.ELBO):
    """A variational objective computed from K vectorized draws z_k ~ q(z | x_n) per data point.

    Subclasses implement :meth:`surrogate`, returning for each data point a tensor whose
    *value* is the bound (nats, higher is better) and whose *gradient* is the estimator's
    gradient. The loss is minus the sum over the batch, scaled by (plate size) / (batch
    size) when the data plate is subsampled, as for Pyro's own ELBOs; so
    ``objective(model, guide)`` is a :class:`torch.nn.Module` (Pyro's ``ELBOModule``) and the
    objective also works with :class:`pyro.infer.SVI`.

    Unlike ``pyro.infer.RenyiELBO``, which applies the subsampling scale *before* the
    log-sum-exp over draws and so is wrong for a subsampled plate, every log-sum-exp here is
    taken per data point, inside the plate.

    Parameters
    ----------
    num_particles : int
        K, draws per data point (vectorized).
    data_plate : str
        Name of the model's plate over data points; every latent site must be inside it.
    max_plate_nesting : int, optional
        Plate depth of the model; found by running model and guide once when omitted.
    """

    needs_reparameterization = True

    def __init__(
        self, num_particles: int = 1, data_plate: str = "data", max_plate_nesting: int | None = None
    ):
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, int)
            or num_particles < 1
        ):
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting if max_plate_nesting is not None else float("inf"),
            vectorize_particles=True,
        )
        self.data_plate = data_plate
        self._nesting = max_plate_nesting

    # -- what subclasses implement -------------------------------------------------------
    def surrogate(self, traces: ParticleTraces) -> torch.Tensor:
        """Per-datapoint bound, shape (N,), carrying the estimator's gradient."""
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} traces through run_traces")

    # -- shared machinery ----------------------------------------------------------------
    def traces(self, model, guide, args, kwargs) -> ParticleTraces:
        if self._nesting is None:
            length = _batched_length(args, kwargs)
            probe_args, probe_kwargs = _slice_arguments(args, kwargs, length, slice(0, 1))
            self._nesting = guess_max_plate_nesting(model, guide, *probe_args, **probe_kwargs)
        traces = run_traces(
            model,
            guide,
            args,
            kwargs,
            self.num_particles,
            self.data_plate,
            self._nesting,
            block=False,
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
        """log p(x_n, z_k) - log q(z_k | x_n), shape (K, N), differentiable."""
        return reduce_terms(traces, with_kl=False).log_weights

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the bound summed over the data points (scaled for subsampling), in nats."""
        traces = self.traces(model, guide, args, kwargs)
        bound = self.surrogate(traces)
        return -bound.sum() * (traces.data_size / bound.shape[0])

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def score_free(log_weights: torch.Tensor, traces: ParticleTraces) -> torch.Tensor:
    """``log_weights`` with the same value but without the score-function term
    -d/dphi log q(z; phi)|_z of its gradient (Roeder et al., 2017): only the path through the
    reparameterized draws z remains."""
    score = traces.guide_log_density(detach_values=True)
    return log_weights + score - score.detach()
