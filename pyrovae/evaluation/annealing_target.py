"""The target of annealed importance sampling for one block of data points.

:class:`AnnealingTarget` holds what :mod:`pyrovae.evaluation.ais` anneals: the starting
density r(z) (the guide q(z|x), or the prior p(z)), the model's log p(x, z) with its discrete
sites summed out exactly (parallel enumeration, as in :mod:`pyrovae.evaluation.traces`), every
site's inner-plate subsampling scale, the block's subsample indices replayed in every trace,
and the flat unconstrained coordinates (with ``log |det dz/du|``) in which HMC moves: the
densities and gradients one transition needs, vectorized over chains and points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import biject_to

from pyrovae.evaluation.data_arguments import _cuda_devices
from pyrovae.evaluation.hmc import PathState
from pyrovae.evaluation.traces import (
    PARTICLE_PLATE,
    ParticleTraces,
    _data_frame,
    _per_datapoint,
    _sample_sites,
    enumerated_program,
    enumeration_dims,
    guess_max_plate_nesting,
    inner_plate_scale,
    log_sum_enumerated,
    run_traces,
)

STARTS = ("guide", "prior")
"""Starting densities r(z): the guide q(z | x), or the prior p(z)."""


@dataclass(frozen=True)
class SiteLayout:
    """Where one latent site lives in the flat unconstrained vector of a data point."""

    name: str
    transform: object
    value_shape: torch.Size
    """Per-chain shape of the site's value under the chain plate (constrained space)."""
    point_shape: torch.Size
    """Per-chain shape of the unconstrained value with the data axis first: (N, ...)."""
    data_axis: int
    """Axis of the data plate in the value, counting the chain axis 0."""
    frame_dim: int
    event_dim: int

    @property
    def width(self) -> int:
        """Unconstrained coordinates per data point."""
        return math.prod(self.point_shape[1:])


def _no_guide(*args, **kwargs) -> None:
    return None


def _is_observed(msg: dict) -> bool:
    return bool(msg.get("is_observed"))


def _is_observed_or_discrete(msg: dict) -> bool:
    return _is_observed(msg) or getattr(msg["fn"], "has_enumerate_support", False)


def _prior_program(model: Callable) -> Callable:
    """The model without its observed sites: the program of the prior p(z)."""
    return poutine.block(model, hide_fn=_is_observed)


def _subsamples(traces: ParticleTraces) -> dict[str, torch.Tensor]:
    """Indices of every subsampled plate (``subsample_size`` or ``subsample`` smaller than
    its size) in the guide's and the model's trace, by plate name."""
    found = {}
    for trace in (traces.guide_trace, traces.model_trace):
        for name, site in trace.nodes.items():
            fn = site.get("fn")
            if isinstance(fn, _Subsample) and len(site["value"]) < fn.size:
                found[name] = site["value"]
    if traces.data_plate in found:
        raise ValueError(
            f"the data plate {traces.data_plate!r} subsamples the data points inside the "
            "model: AIS estimates log p(x) of every data point it is given; pass those "
            "data points and a plate over all of them"
        )
    return found


def _check_scales(traces: ParticleTraces, data_plate: str) -> dict[str, float]:
    """Refuse latent sites in subsampled inner plates; return the observed sites' inner
    subsampling scales that differ from 1, by site name.

    (Scales without a common factor were refused by :class:`ParticleTraces` already.)
    """
    for role, sites in (("model", traces.model_sites), ("guide", traces.guide_sites)):
        for name in traces.latent_names:
            weight = inner_plate_scale(sites[name], data_plate)
            if weight != 1.0:
                raise ValueError(
                    f"latent site {name!r} is in a subsampled plate (its {role} log density "
                    f"is scaled by {weight:g}): AIS starts its chains from unscaled draws of "
                    "r(z), so it cannot anneal from a scaled density; sample latent sites in "
                    "plates without subsample_size"
                )
    scaled = {}
    for name, site in traces.model_sites.items():
        weight = inner_plate_scale(site, data_plate)
        if site["is_observed"] and weight != 1.0:
            scaled[name] = weight
    return scaled


def _layout(name: str, site: dict, data_plate: str, nesting: int) -> SiteLayout:
    frame = _data_frame(site, data_plate, "latent model")
    support = site["fn"].support
    if support.is_discrete:
        raise ValueError(
            f"latent site {name!r} is discrete: AIS with HMC needs continuous latent "
            "variables (enumerate or marginalise it)"
        )
    transform = biject_to(support)
    value = site["value"]
    data_axis = nesting + 1 + frame.dim
    unconstrained = transform.inv(value).movedim(data_axis, 1)
    return SiteLayout(
        name,
        transform,
        value.shape[1:],
        unconstrained.shape[1:],
        data_axis,
        frame.dim,
        site["fn"].event_dim,
    )


class AnnealingTarget:
    """The annealing path of one block of data points: starting draws, flat unconstrained
    coordinates and the densities and gradients HMC needs.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide (``guide`` may be ``None`` with ``start="prior"``), called as
        ``model(*args, **kwargs)``.
    args, kwargs :
        The block's inputs (N data points).
    start : {"guide", "prior"}
        The starting density r(z): q(z|x) or p(z).
    data_plate : str
        Name of the plate over data points.
    max_plate_nesting : int, optional
        Plate depth of the model; found by running it once when omitted.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable | None,
        args: tuple,
        kwargs: dict,
        start: str = "guide",
        data_plate: str = "data",
        max_plate_nesting: int | None = None,
    ):
        _check_start(start, guide)
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.start, self.data_plate = start, data_plate
        if max_plate_nesting is None:
            max_plate_nesting = guess_max_plate_nesting(model, guide or _no_guide, *args, **kwargs)
        self.nesting = max_plate_nesting
        devices = _cuda_devices(args, kwargs)
        with torch.no_grad():
            with torch.random.fork_rng(devices=devices):
                probe = self._probe()
            if _subsamples(probe):  # drawn from the live RNG stream: this block's subsample
                probe = self._probe()
            self.subsamples = _subsamples(probe)
            """Indices of the subsampled plates, by plate name, replayed in every trace."""
            with torch.random.fork_rng(devices=devices):
                sites = _sample_sites(self._trace(model, 1))
        self.enumerated = [
            n
            for n, s in sites.items()
            if not s["is_observed"] and getattr(s["fn"], "has_enumerate_support", False)
        ]
        """Discrete latent sites, summed out exactly in log p(x, z) (not annealed)."""
        if self.enumerated and start == "prior":
            raise ValueError(
                f"AIS from the prior with discrete site(s) {', '.join(map(repr, self.enumerated))}"
                " would need the prior of the continuous sites with the discrete ones summed "
                "out; start from the guide (start='guide')"
            )
        self.latent_names = [
            n for n, s in sites.items() if not s["is_observed"] and n not in self.enumerated
        ]
        if not self.latent_names:
            raise ValueError("the model has no latent sites: log p(x) needs no AIS")
        self.scaled_sites = _check_scales(probe, data_plate)
        """Observed sites in subsampled inner plates, with the factor of their log density."""
        self.layouts = [_layout(n, sites[n], data_plate, self.nesting) for n in self.latent_names]
        self.num_points = self.layouts[0].point_shape[0]

    def _probe(self) -> ParticleTraces:
        """One draw of r(z) per data point and the model replayed on it, traced as
        :func:`pyrovae.evaluation.importance.evaluate` traces them: the site names are
        checked and scales that evaluate refuses are refused with its message."""
        reference = self.guide if self.start == "guide" else _prior_program(self.model)
        return run_traces(
            self.model, reference, self.args, self.kwargs, 1, self.data_plate, self.nesting
        )

    @property
    def dim(self) -> int:
        """D, the unconstrained latent coordinates per data point."""
        return sum(layout.width for layout in self.layouts)

    def _trace(self, program: Callable, num_chains: int, values: dict | None = None):
        """Trace ``program`` under the chain plate, conditioned on ``values`` and on the
        block's subsample indices."""
        data = {**self.subsamples, **(values or {})}
        if data:
            program = poutine.condition(program, data=data)
        dim = -(self.nesting + 1)
        with poutine.block(), pyro.plate(PARTICLE_PLATE, num_chains, dim=dim):
            return poutine.trace(program).get_trace(*self.args, **self.kwargs)

    def sample_start(self, num_chains: int) -> dict[str, torch.Tensor]:
        """Draws z ~ r(z) of every latent site, each of shape (C, ...) under the chain plate."""
        program = self.guide if self.start == "guide" else self.model
        with torch.no_grad():
            trace = self._trace(program, num_chains)
        return {name: trace.nodes[name]["value"] for name in self.latent_names}

    def expand_sample(
        self, sample: dict[str, torch.Tensor], num_chains: int, start: int = 0
    ) -> dict[str, torch.Tensor]:
        """One draw per data point, laid out as the model's own trace gives it (data points
        ``start .. start + N`` of it), copied for ``num_chains`` chains: shapes (C, ...)."""
        values = {}
        for layout in self.layouts:
            value = torch.as_tensor(sample[layout.name])
            axis = value.dim() - layout.event_dim + layout.frame_dim
            value = value.narrow(axis, start, self.num_points)
            value = value.reshape((1,) + layout.value_shape)
            values[layout.name] = value.expand((num_chains,) + layout.value_shape)
        return values

    def flatten(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent values (constrained, shapes (C, ...)) to flat u of shape (C, N, D)."""
        parts = []
        for layout in self.layouts:
            value = values[layout.name]
            unconstrained = layout.transform.inv(value).movedim(layout.data_axis, 1)
            parts.append(unconstrained.reshape(value.shape[0], self.num_points, layout.width))
        return torch.cat(parts, -1)

    def unflatten(self, position: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Flat u of shape (C, N, D) to latent values and ``log |det dz/du|``, shape (C, N)."""
        num_chains = position.shape[0]
        values, log_det, offset = {}, 0.0, 0
        for layout in self.layouts:
            part = position[..., offset : offset + layout.width]
            offset += layout.width
            part = part.reshape((num_chains,) + layout.point_shape).movedim(1, layout.data_axis)
            value = layout.transform(part)
            jacobian = layout.transform.log_abs_det_jacobian(part, value)
            log_det = log_det + _per_datapoint(
                jacobian, {"mask": None, "infer": {}}, layout.frame_dim, num_chains, self.nesting
            )
            values[layout.name] = value
        return values, log_det

    def _site_terms(
        self, program: Callable, values: dict, role: str
    ) -> tuple[dict[str, torch.Tensor], list[str], int]:
        """Per-site log densities of ``program`` conditioned on ``values``, each times its
        inner plates' subsampling scale (as in ``evaluate``), shape (C, N), or
        ``(*enumeration, C, N)`` for the model with enumerated discrete sites; with the
        enumerated sites and the number of enumeration dims."""
        num_chains = next(iter(values.values())).shape[0]
        if role == "model" and self.enumerated:
            program = enumerated_program(program, -(self.nesting + 2), given=values)
        with pyro.validation_enabled(False):
            trace = self._trace(program, num_chains, values)
        sites = _sample_sites(trace)
        enumerated, enum_dims = enumeration_dims(sites, self.nesting)
        terms = {}
        for name, site in sites.items():
            frame = _data_frame(site, self.data_plate, role)
            log_prob = site["fn"].log_prob(site["value"])
            weight = inner_plate_scale(site, self.data_plate)
            terms[name] = _per_datapoint(
                log_prob, site, frame.dim, num_chains, self.nesting, weight, enum_dims
            )
        return terms, enumerated, enum_dims

    def log_densities(self, values: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x, z), log r(z)) in nats, each of shape (C, N), differentiable in z; the
        discrete sites of the model summed out exactly."""
        terms, enumerated, enum_dims = self._site_terms(self.model, values, "model")
        group, members = log_sum_enumerated(terms, enumerated, enum_dims)
        terms = {n: t.reshape(t.shape[-2:]) for n, t in terms.items() if n not in members}
        latent = sum(terms[name] for name in self.latent_names if name in terms)
        observed = [value for name, value in terms.items() if name not in self.latent_names]
        if not observed and group is None:
            raise ValueError("the model has no observed site: pass the data as `obs=`")
        log_joint = latent + sum(observed) + (0.0 if group is None else group)
        if self.start == "prior":
            return log_joint, latent
        return log_joint, sum(self._site_terms(self.guide, values, "guide")[0].values())

    def evaluate(self, position: torch.Tensor) -> PathState:
        """Densities and their gradients in u at positions of shape (C, N, D)."""
        with torch.enable_grad():
            u = position.detach().requires_grad_(True)
            values, log_det = self.unflatten(u)
            log_joint, log_ref = self.log_densities(values)
            grad_joint = _gradient(log_joint + log_det, u, retain=True)
            grad_ref = _gradient(log_ref + log_det, u, retain=False)
        return PathState(
            u.detach(),
            log_joint.detach(),
            log_ref.detach(),
            _detach(log_det, u),
            grad_joint,
            grad_ref,
        )


def _gradient(output: torch.Tensor, position: torch.Tensor, retain: bool) -> torch.Tensor:
    if not output.requires_grad:
        return torch.zeros_like(position)
    (grad,) = torch.autograd.grad(output.sum(), position, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(position) if grad is None else grad


def _detach(value, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value).to(like).detach()
    return value.expand(like.shape[:2])


def _check_start(start: str, guide) -> None:
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start == "guide" and guide is None:
        raise ValueError("start='guide' needs a guide; pass one or use start='prior'")
