"""Per-datapoint log densities from any Pyro model and guide, by tracing them.

For draws z_k ~ q(z | x_n), k = 1..K, the functions here return (K, N) matrices of

* ``log_p_obs[k, n]``    = log p(x_n | z_k), summed over observed sites;
* ``log_p_latent[k, n]`` = log p(z_k), summed over latent sites;
* ``log_q[k, n]``        = log q(z_k | x_n), summed over the guide's sites;
* ``kl[k, n]``           = KL(q(.|x_n) || p(.)) per latent site in closed form where
  :func:`torch.distributions.kl_divergence` knows the pair, else the single-draw Monte Carlo
  term log q - log p; ``all_analytic`` tells whether every site was closed-form.

The log importance weight is ``log_p_obs + log_p_latent - log_q`` (nats). Only *local*
latent variables, sampled inside the data plate, have per-datapoint weights; a latent site
outside that plate is refused with an error naming it.

Scales. Pyro gives every site a ``scale``: the product of ``poutine.scale`` factors and of
the subsampling scales (size / subsample size) of the plates around it. The scales of the
plates *other than* the data plate multiply a site's log density inside the data point's
sum (they make it an estimate of the sum over the full inner plate). The rest -- the data
plate's subsampling scale and ``poutine.scale`` -- must be one common factor of every site;
it is :attr:`ParticleTraces.outer_scale`, which multiplies the per-datapoint bound *after*
any log-sum-exp over draws (a loss is ``-outer_scale * sum_n bound_n``), and evaluation
leaves it out (the bounds are per data point). Objectives linear in the site terms (the
ELBO family) also take site-specific scales, multiplied in site by site as Pyro's
``Trace_ELBO`` does.

Data convention for evaluating in chunks: see :mod:`pyrovae.evaluation.data_arguments`.
Discrete latent sites that the guide does not sample are enumerated in parallel and summed
out exactly inside each weight (:func:`reduce_terms`); programs written for one draw run one
draw per pass (:class:`SequentialTraces`; :mod:`pyrovae.evaluation.structure` decides).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from pyrovae.evaluation.data_arguments import (  # also re-exported from here
    _batched_length,
    _names,
    _slice_arguments,
    check_data_kwargs,
    chunk_bounds,
)

PARTICLE_PLATE = "_pyrovae_particles"


@dataclass
class ParticleTerms:
    """Per-particle, per-datapoint log densities, each of shape (K, N), in nats."""

    log_p_obs: torch.Tensor
    log_p_latent: torch.Tensor
    log_q: torch.Tensor
    kl: torch.Tensor
    all_analytic: bool

    @property
    def log_weights(self) -> torch.Tensor:
        """log p(x_n, z_k) - log q(z_k | x_n), shape (K, N)."""
        return self.log_p_obs + self.log_p_latent - self.log_q

    @classmethod
    def concatenate(cls, parts: list[ParticleTerms], dim: int) -> ParticleTerms:
        return cls(
            *(torch.cat([getattr(p, name) for p in parts], dim) for name in _TERM_NAMES),
            all_analytic=all(p.all_analytic for p in parts),
        )


_TERM_NAMES = ("log_p_obs", "log_p_latent", "log_q", "kl")


def _sample_sites(trace) -> dict:
    """Sample sites with a log density (``pyro.deterministic`` sites, whose log density is
    identically zero, left out)."""
    return {
        name: site
        for name, site in prune_subsample_sites(trace).nodes.items()
        if site["type"] == "sample" and not site["infer"].get("_deterministic")
    }


def _data_frame(site: dict, data_plate: str, role: str):
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame
    raise ValueError(
        f"{role} site {site['name']!r} is not inside the data plate {data_plate!r}: "
        "per-datapoint weights exist only for local variables sampled in that plate "
        "(global latent variables would couple the data points)"
    )


def _data_plate_size(trace, data_plate: str) -> int:
    """Full size of the data plate (not its subsample size), checking that it exists."""
    plates = {}
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            plates[frame.name] = frame.size
    if data_plate not in plates:
        found = ", ".join(sorted(p for p in plates if p != PARTICLE_PLATE)) or "none"
        raise ValueError(
            f"the model has no plate named {data_plate!r} (plates found: {found}); "
            "wrap the data points in `with pyro.plate(data_plate, N):` or pass data_plate="
        )
    subsample = trace.nodes.get(data_plate, {}).get("fn")  # the plate's own site
    return int(getattr(subsample, "size", plates[data_plate]))


def _per_datapoint(
    log_prob: torch.Tensor,
    site: dict,
    data_dim: int,
    num_particles: int,
    nesting: int,
    weight=1.0,
    enum_dims: int = 0,
) -> torch.Tensor:
    """Reduce a site's log density, times ``weight`` (a number or a broadcastable tensor), to
    shape (K, N) by summing every plate dim but the data one; with ``enum_dims`` E > 0 the E
    enumeration dims left of the particle dim are kept: shape ``(*enumeration, K, N)``.

    Masked entries count 0, except at an enumerated site, where they count -log C (C its
    number of values): a masked discrete variable (an observed label's ``_unobserved``
    twin, say) is then summed out as a uniform choice that nothing depends on, exactly 0."""
    if not (isinstance(weight, numbers.Number) and weight == 1.0):
        log_prob = log_prob * weight
    absent = 0.0
    if site["infer"].get("_enumerate_dim") is not None:
        absent = -math.log(site["fn"].enumerate_support(expand=False).shape[0])
    if site["mask"] is not None and not isinstance(site["mask"], bool):
        log_prob = log_prob.masked_fill(~site["mask"], absent)
    elif site["mask"] is False:
        log_prob = torch.full_like(log_prob, absent)
    full_dims = nesting + 1 + enum_dims
    log_prob = log_prob.reshape((1,) * (full_dims - log_prob.dim()) + log_prob.shape)
    data_axis = full_dims + data_dim
    other_axes = [a for a in range(enum_dims + 1, full_dims) if a != data_axis]
    if other_axes:
        log_prob = log_prob.sum(other_axes, keepdim=True)
    leading = log_prob.shape[: enum_dims + 1]
    log_prob = log_prob.reshape(*leading, log_prob.shape[data_axis])
    return log_prob.expand(*leading[:-1], num_particles, log_prob.shape[-1])


def _site_log_prob(site: dict) -> torch.Tensor:
    return site["fn"].log_prob(site["value"])


def _closed_form_kl(guide_site: dict, model_site: dict) -> torch.Tensor | None:
    try:
        kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except (NotImplementedError, IndexError, RuntimeError):  # no closed form for these shapes
        return None
    return None if is_identically_zero(kl) else kl


def _frame_scale(frame) -> float:
    """Subsampling scale of one plate: full size / subsample size (1 without subsampling)."""
    if frame.full_size is None or frame.full_size == frame.size:
        return 1.0
    return frame.full_size / frame.size


def inner_plate_scale(site: dict, data_plate: str) -> float:
    """Product of the subsampling scales of the plates around ``site`` other than the data
    plate: the factor of the site's log density inside a data point's sum."""
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.name != data_plate:
            factor = factor * _frame_scale(frame)
    return factor


def _same_scale(first, other) -> bool:
    if isinstance(first, numbers.Number) and isinstance(other, numbers.Number):
        return math.isclose(first, other, rel_tol=1e-12, abs_tol=0.0)
    return float(first) == float(other)


def common_outer_scale(sites: Sequence[dict], data_plate: str):
    """The factor that every site's scale has beyond its inner plates' subsampling scales
    (``poutine.scale`` times the data plate's subsampling scale), or ``None`` when the sites
    differ (site-specific ``poutine.scale``) or a scale is a tensor with several entries."""
    outers = []
    for site in sites:
        scale = site["scale"]
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return None
        outers.append(scale / inner_plate_scale(site, data_plate))
    if not outers:
        return 1.0
    first = outers[0]
    return first if all(_same_scale(first, other) for other in outers[1:]) else None


def _scale_description(sites: dict[str, dict]) -> str:
    parts = []
    for name, site in sites.items():
        scale = site["scale"]
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            parts.append(f"{name}: tensor of shape {tuple(scale.shape)}")
        else:
            parts.append(f"{name}: {float(scale):g}")
    return ", ".join(parts)


def _aliased(trace):
    """A copy of ``trace`` whose sampled values are fresh autograd aliases (``view_as``) of
    the originals: a model replayed on it sees the same numbers through distinct tensors,
    so gradient hooks on them act only on the model's uses of the draws."""
    copied = trace.copy()
    for name, site in trace.nodes.items():
        value = site.get("value")
        if site["type"] == "sample" and isinstance(value, torch.Tensor) and value.requires_grad:
            copied.nodes[name] = {**site, "value": value.view_as(value)}
    return copied


def _detached(trace):
    """A copy of ``trace`` whose sampled values are detached from autograd."""
    copied = trace.copy()
    for name, site in trace.nodes.items():
        value = site.get("value")
        if site["type"] == "sample" and isinstance(value, torch.Tensor):
            copied.nodes[name] = {**site, "value": value.detach()}
    return copied


def trace_pair(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    alias_latents: bool = False,
    first_enum_dim: int | None = None,
):
    """Trace the guide, then the model replayed on the guide's draws: (model, guide) traces.

    With ``alias_latents`` the model sees autograd aliases of the draws (see
    :func:`_aliased`) rather than the guide's tensors themselves. With ``first_enum_dim``
    the model's discrete latent sites that the guide does not sample (and any the model
    marks ``infer={"enumerate": "parallel"}``) are enumerated in parallel, from that dim
    leftwards, so that the estimators sum them out exactly (:func:`reduce_terms`).
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = _aliased(guide_trace) if alias_latents else guide_trace
    program = poutine.replay(model, trace=replayed)
    if first_enum_dim is not None:
        program = enumerated_program(program, first_enum_dim, guide_trace.nodes)
    model_trace = poutine.trace(program).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def enumerated_program(program: Callable, first_enum_dim: int, given=()) -> Callable:
    """``program`` with its discrete latent sites enumerated in parallel from
    ``first_enum_dim`` leftwards: those it marks ``infer={"enumerate": "parallel"}`` and every
    other one with a finite support whose name is not in ``given`` (the sites a guide
    samples, or values supplied)."""

    def config(msg: dict) -> dict:
        fn = msg["fn"]
        if (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and msg["name"] not in given
            and getattr(fn, "has_enumerate_support", False)
            and "enumerate" not in msg["infer"]
        ):
            return {"enumerate": "parallel"}
        return {}

    marked = poutine.infer_config(program, config)
    return _ReplayAwareEnumerate(first_available_dim=first_enum_dim)(marked)


class _ReplayAwareEnumerate(EnumMessenger):
    """Pyro's parallel enumeration, for a model replayed on a guide's draws inside
    ``pyro.markov``: the ``pyro.markov`` scope of a later site (a deep Markov model's x_t)
    names the replayed draws (z_t), which Pyro's messenger skips and so never records; here
    they count as out of scope, which is what they are for enumeration (their values carry
    no enumeration dims)."""

    def __enter__(self):
        entered = super().__enter__()
        self._markov_depths = _UnrecordedOutOfScope(self._markov_depths)
        return entered


class _UnrecordedOutOfScope(dict):
    def __missing__(self, name: str) -> None:
        return None  # never equal to a Markov depth


def resolve_plate_nesting(value) -> int | None:
    """A validated ``max_plate_nesting``: a non-negative integer, or ``None`` for 'guess it'
    (``None`` or ``float('inf')``, Pyro's default)."""
    if value is None or (isinstance(value, float) and value == math.inf):
        return None
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not integral or value < 0:
        raise ValueError(
            "max_plate_nesting must be a non-negative integer, or None / float('inf') to guess "
            f"it by running model and guide once; got {value!r}"
        )
    return int(value)


def guess_max_plate_nesting(model: Callable, guide: Callable, *args, **kwargs) -> int:
    """Number of nested plates in the model and guide, found by running them once (on a
    private copy of the RNG streams, so seeded draws that follow are unchanged)."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    with torch.random.fork_rng(devices=cuda), poutine.block(), torch.no_grad():
        model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
    depth = 0
    for trace in (model_trace, guide_trace):
        for site in _sample_sites(trace).values():
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
            depth = max([depth] + dims)
    return depth


@dataclass
class ParticleTraces:
    """Model and guide traces of one vectorized pass with K draws per data point, and the
    bookkeeping that reduces any site's log density to shape (K, N).

    ``site_scales`` allows site-specific scales (objectives linear in the site terms): when
    the sites have no common outer scale, every site's whole scale multiplies its log density
    and :attr:`outer_scale` is 1. Without it such scales are refused. ``guide``, ``args`` and
    ``kwargs`` (the guide and its arguments) are needed by :meth:`guide_score_density` only.
    """

    model_trace: object
    guide_trace: object
    num_particles: int
    data_plate: str
    max_plate_nesting: int
    data_size: int
    site_scales: bool = False
    guide: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    vectorized: bool = True

    def __post_init__(self):
        self.model_sites = _sample_sites(self.model_trace)
        self.guide_sites = _sample_sites(self.guide_trace)
        self.enumerated, self.enum_dims = enumeration_dims(self.model_sites, self.max_plate_nesting)
        _check_site_names(self.model_sites, self.guide_sites, self.enumerated)
        self.outer_scale, self.scales_inside = self._resolve_scales()

    def _resolve_scales(self):
        """(outer scale, whether each site's whole scale goes inside the data point's sum)."""
        sites = {f"model {n}": s for n, s in self.model_sites.items()}
        sites.update({f"guide {n}": s for n, s in self.guide_sites.items()})
        outer = common_outer_scale(list(sites.values()), self.data_plate)
        if outer is not None:
            return outer, False
        if self.site_scales:
            return 1.0, True
        raise ValueError(
            "the sites' scales (poutine.scale times plate subsampling scales) share no common "
            "factor beyond their inner plates' subsampling scales (site scales: "
            f"{_scale_description(sites)}); a bound with "
            "a log-sum-exp over draws (IWAE, Rényi, DReG, log p(x) estimates) needs one common "
            "scale per data point (poutine.scale around the whole model and guide); the ELBO "
            "objectives (trace_elbo, stl, trace_meanfield_elbo) take site-specific scales"
        )

    def site_weight(self, site: dict):
        """Factor of the site's log density inside the data point's sum (see module doc)."""
        if self.scales_inside:
            return site["scale"]
        return inner_plate_scale(site, self.data_plate)

    @property
    def latent_names(self) -> list[str]:
        """The model's latent sites that the guide samples (enumerated ones left out)."""
        return [
            name
            for name, site in self.model_sites.items()
            if not site["is_observed"] and name not in self.enumerated
        ]

    def per_datapoint(
        self, log_prob: torch.Tensor, site: dict, role: str, keep_enumeration: bool = False
    ) -> torch.Tensor:
        """``log_prob`` times the site's weight (:meth:`site_weight`), summed over every plate
        dim but the draw and data dims: shape (K, N), nats; with ``keep_enumeration``,
        ``(*enumeration, K, N)`` (a model site's density given enumerated discrete sites)."""
        frame = _data_frame(site, self.data_plate, role)
        return _per_datapoint(
            log_prob,
            site,
            frame.dim,
            self.num_particles,
            self.max_plate_nesting,
            self.site_weight(site),
            self.enum_dims if keep_enumeration else 0,
        )

    def enumerated_group(self) -> tuple[torch.Tensor | None, set[str]]:
        """(log sum over the enumerated values of the joint density of every model site that
        depends on an enumerated discrete site, shape (K, N); the names of those sites), or
        ``(None, set())`` without enumerated sites. Exact: the sum runs over every
        combination of the enumerated sites' values (one variable per data point each)."""
        if not self.enumerated:
            return None, set()
        terms = {}
        for name, site in self.model_sites.items():
            role = "observed model" if site["is_observed"] else "latent model"
            terms[name] = self.per_datapoint(
                _site_log_prob(site), site, role, keep_enumeration=True
            )
        return log_sum_enumerated(terms, self.enumerated, self.enum_dims)

    def data_axis(self, site: dict) -> int:
        """Axis of the data plate in ``site["value"]`` (the draw axis is 0)."""
        frame = _data_frame(site, self.data_plate, "guide")
        return self.max_plate_nesting + 1 + frame.dim

    def guide_score_density(self) -> torch.Tensor | None:
        """log q_phi(z_k | x_n) with every draw held fixed, shape (K, N); ``None`` without
        latent sites.

        The guide is replayed on detached copies of its draws, so each site's distribution is
        rebuilt from detached upstream draws (q(z2 | z1) from a constant z1): the gradient is
        the score term d/dphi log q_phi(z) at fixed z alone, and subtracting it from log q
        leaves exactly the path terms, those through q(z2 | z1)'s dependence on z1 included.
        With several latent sites this runs the guide once more (it must be deterministic
        given its draws); with one, whose distribution depends on no other draw, the traced
        distribution is evaluated at the detached draw instead (the same number, no rerun).
        """
        if not self.latent_names:
            return None
        if len(self.latent_names) == 1:
            site = self.guide_sites[self.latent_names[0]]
            return self.per_datapoint(site["fn"].log_prob(site["value"].detach()), site, "guide")
        if self.guide is None:
            raise ValueError("guide_score_density needs the guide: build the traces by run_traces")
        particle_dim = -(self.max_plate_nesting + 1)
        replayed_guide = poutine.replay(self.guide, trace=_detached(self.guide_trace))
        particles = (
            pyro.plate(PARTICLE_PLATE, self.num_particles, dim=particle_dim)
            if self.vectorized
            else contextlib.nullcontext()
        )
        with poutine.block(), particles:
            trace = poutine.trace(replayed_guide).get_trace(*self.args, **self.kwargs)
        sites = _sample_sites(trace)
        total = 0.0
        for name in self.latent_names:
            site = sites[name]
            total = total + self.per_datapoint(_site_log_prob(site), site, "guide")
        return total


def run_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    data_plate: str,
    max_plate_nesting: int,
    block: bool = True,
    alias_latents: bool = False,
    site_scales: bool = False,
    vectorized: bool = True,
) -> ParticleTraces | SequentialTraces:
    """Trace the guide and then the model replayed on its draws, K draws per data point,
    vectorized with an extra plate left of the model's plates. Keeps autograd history.

    ``block=False`` lets outer handlers see the sites (e.g. SVI collecting ``pyro.param``
    sites); ``alias_latents`` replays the model on autograd aliases of the draws (see
    :func:`trace_pair`); ``site_scales`` see :class:`ParticleTraces`. ``vectorized=False``
    (a program written for one draw, see :mod:`pyrovae.evaluation.structure`) runs the K
    draws one per pass, without a particle plate: :class:`SequentialTraces`.
    """
    if not vectorized:
        options = dict(block=block, alias_latents=alias_latents, site_scales=site_scales)
        parts = [
            _single_pass(model, guide, args, kwargs, data_plate, max_plate_nesting, **options)
            for _ in range(num_particles)
        ]
        return SequentialTraces(parts)
    particle_dim = -(max_plate_nesting + 1)
    blocker = poutine.block() if block else contextlib.nullcontext()
    with blocker, pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        model_trace, guide_trace = trace_pair(
            model, guide, args, kwargs, alias_latents, -(max_plate_nesting + 2)
        )
    size = _data_plate_size(model_trace, data_plate)
    return ParticleTraces(
        model_trace,
        guide_trace,
        num_particles,
        data_plate,
        max_plate_nesting,
        size,
        site_scales=site_scales,
        guide=guide,
        args=args,
        kwargs=kwargs,
    )


def enumeration_dims(sites: dict, max_plate_nesting: int) -> tuple[list[str], int]:
    """(the enumerated sites among ``sites``, the number of enumeration dims left of the
    particle dim)."""
    names = [n for n, s in sites.items() if s["infer"].get("_enumerate_dim") is not None]
    deepest = max((-sites[n]["infer"]["_enumerate_dim"] for n in names), default=0)
    return names, max(0, deepest - (max_plate_nesting + 1))


def log_sum_enumerated(
    terms: dict[str, torch.Tensor], enumerated, enum_dims: int
) -> tuple[torch.Tensor | None, set[str]]:
    """Sum out the enumerated discrete sites: given per-site terms of shape
    ``(*enumeration, K, N)``, the log of the sum over every combination of enumerated values of
    the product of the densities that depend on them (shape (K, N)), and the names of those
    sites; ``(None, set())`` when nothing is enumerated."""
    total, members = 0.0, set()
    for name, log_p in terms.items():
        if name in enumerated or any(size > 1 for size in log_p.shape[:-2]):
            total, members = total + log_p, members | {name}
    if not members:
        return None, members
    dims = list(range(enum_dims))
    return (torch.logsumexp(total, dim=dims) if dims else total), members


def _single_pass(
    model, guide, args, kwargs, data_plate, max_plate_nesting, block, alias_latents, site_scales
) -> ParticleTraces:
    """One draw per data point, without a particle plate (K = 1)."""
    blocker = poutine.block() if block else contextlib.nullcontext()
    with blocker:
        model_trace, guide_trace = trace_pair(
            model, guide, args, kwargs, alias_latents, -(max_plate_nesting + 2)
        )
    return ParticleTraces(
        model_trace,
        guide_trace,
        1,
        data_plate,
        max_plate_nesting,
        _data_plate_size(model_trace, data_plate),
        site_scales=site_scales,
        guide=guide,
        args=args,
        kwargs=kwargs,
        vectorized=False,
    )


class SequentialTraces:
    """K single-draw passes (:class:`ParticleTraces` with K = 1, no particle plate) standing
    in for one vectorized pass, for programs written for one draw; the per-datapoint terms
    are the passes' stacked along the draw axis, so every estimator gives the same numbers."""

    def __init__(self, parts: list[ParticleTraces]):
        self.parts = parts
        first = parts[0]
        self.model_sites, self.guide_sites = first.model_sites, first.guide_sites
        self.data_plate, self.data_size = first.data_plate, first.data_size
        self.max_plate_nesting, self.outer_scale = first.max_plate_nesting, first.outer_scale

    @property
    def num_particles(self) -> int:
        return len(self.parts)

    @property
    def latent_names(self) -> list[str]:
        return self.parts[0].latent_names

    def guide_score_density(self) -> torch.Tensor | None:
        """:meth:`ParticleTraces.guide_score_density` of each pass, stacked: (K, N)."""
        scores = [part.guide_score_density() for part in self.parts]
        return None if scores[0] is None else torch.cat(scores, 0)


def trace_terms(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    data_plate: str,
    max_plate_nesting: int,
    vectorized: bool = True,
    site_scales: bool = False,
) -> ParticleTerms:
    """Trace guide and model once, with ``num_particles`` draws per data point (in one
    vectorized pass, or one per pass with ``vectorized=False``)."""
    traces = run_traces(
        model,
        guide,
        args,
        kwargs,
        num_particles,
        data_plate,
        max_plate_nesting,
        vectorized=vectorized,
        site_scales=site_scales,
    )
    return reduce_terms(traces)


def reduce_terms(traces: ParticleTraces | SequentialTraces, with_kl: bool = True) -> ParticleTerms:
    """Per-datapoint log densities of every site; ``with_kl=False`` skips the KL terms (zeros)."""
    if isinstance(traces, SequentialTraces):
        parts = [reduce_terms(part, with_kl) for part in traces.parts]
        return ParticleTerms.concatenate(parts, dim=0)
    terms = {name: 0.0 for name in _TERM_NAMES}
    all_analytic = with_kl
    group, members = traces.enumerated_group()
    if group is not None:  # log sum_y p(x, y, ... | z): enters like an observed site
        terms["log_p_obs"] = group
    for name, site in traces.model_sites.items():
        if name in members and (site["is_observed"] or name in traces.enumerated):
            continue
        role = "observed" if site["is_observed"] else "latent"
        log_p = (
            None
            if name in members
            else traces.per_datapoint(_site_log_prob(site), site, f"{role} model")
        )
        if site["is_observed"]:
            terms["log_p_obs"] = terms["log_p_obs"] + log_p
            continue
        guide_site = traces.guide_sites[name]
        log_q = traces.per_datapoint(_site_log_prob(guide_site), guide_site, "guide")
        terms["log_q"] = terms["log_q"] + log_q
        if log_p is None:  # log p(z | y) is inside the enumerated sum: only -log q remains
            terms["kl"] = terms["kl"] + log_q
            all_analytic = False
            continue
        terms["log_p_latent"] = terms["log_p_latent"] + log_p
        if not with_kl:
            continue
        kl = _closed_form_kl(guide_site, site)
        if kl is None:
            all_analytic = False
            kl_term = log_q - log_p
        else:  # the guide site's scale and mask, as Pyro's TraceMeanField_ELBO
            kl_term = traces.per_datapoint(kl, guide_site, "guide")
        terms["kl"] = terms["kl"] + kl_term
    if not isinstance(terms["log_p_obs"], torch.Tensor):
        raise ValueError("the model has no observed site: pass the data as `obs=` of a sample site")
    reference = terms["log_p_obs"]
    terms = {
        name: torch.as_tensor(value).to(reference).expand_as(reference)
        for name, value in terms.items()
    }
    return ParticleTerms(**terms, all_analytic=all_analytic)


def _check_site_names(model_sites: dict, guide_sites: dict, enumerated=()) -> None:
    latent = {n for n, s in model_sites.items() if not s["is_observed"] and n not in enumerated}
    missing, extra = sorted(latent - set(guide_sites)), sorted(set(guide_sites) - latent)
    problems = []
    if missing:
        problems.append(f"the guide does not sample the model's latent site(s) {_names(missing)}")
    if extra:
        problems.append(
            f"the guide samples site(s) {_names(extra)} that are not latent sites of the model"
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + f" (model latent sites: {_names(sorted(latent)) or 'none'}; "
            f"guide sites: {_names(sorted(guide_sites)) or 'none'})"
        )


def particle_terms(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    data_plate: str = "data",
    max_pairs: int = 2**20,
    max_plate_nesting: int | None = None,
    progress: Callable[[int], None] | None = None,
    data_kwargs: Sequence[str] | None = None,
    vectorized: bool = True,
    site_scales: bool = False,
    **kwargs,
) -> ParticleTerms:
    """Per-datapoint log densities for ``num_particles`` draws, in chunks over particles and data.

    Parameters
    ----------
    model, guide : callable
        A Pyro model and guide with the same latent site names, taking ``*args, **kwargs``.
    num_particles : int
        K, the number of draws z_k ~ q(z | x_n) per data point.
    data_plate : str
        Name of the model's plate over data points.
    max_pairs : int
        Largest number of (particle, data point) pairs traced in one vectorized pass; bounds
        peak memory (roughly ``max_pairs`` times the memory of one data point's pass).
    max_plate_nesting : int, optional
        Plate depth of the model; found by running it once when omitted (or ``inf``).
    progress : callable, optional
        Called with the number of data points finished after each data chunk.
    data_kwargs : sequence of str, optional
        Keyword arguments that hold per-datapoint data (sliced with the positional data when
        chunking). Omitted: a keyword tensor with one row per data point is refused as
        ambiguous; ``()`` passes every keyword argument whole. See the module docstring.
    vectorized : bool
        Draw the particles in one vectorized pass (``False``: one draw per pass, for programs
        written for one draw; see :mod:`pyrovae.evaluation.structure`).
    site_scales : bool
        Accept site-specific scales (a tensor ``poutine.scale``, e.g. a weight per data
        point), each multiplying its site's terms, as the ELBO does; for terms averaged over
        draws only (see :class:`ParticleTraces`).

    Returns
    -------
    ParticleTerms
        (K, N) tensors on the model's device, in its dtype, without autograd history.
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles (K) must be a positive integer, got {num_particles!r}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    data_kwargs = check_data_kwargs(args, kwargs, data_kwargs)
    length = _batched_length(args, kwargs, data_kwargs)
    max_plate_nesting = resolve_plate_nesting(max_plate_nesting)
    if max_plate_nesting is None:
        probe_args, probe_kwargs = _slice_arguments(args, kwargs, length, slice(0, 1), data_kwargs)
        max_plate_nesting = guess_max_plate_nesting(model, guide, *probe_args, **probe_kwargs)
    data_chunk = max(1, min(length, max_pairs // num_particles))
    particle_chunk = max(1, min(num_particles, max_pairs // data_chunk))
    rows = []
    with torch.no_grad():
        for start, stop in chunk_bounds(length, data_chunk):
            chunk_args, chunk_kwargs = _slice_arguments(
                args, kwargs, length, slice(start, stop), data_kwargs
            )
            parts = [
                trace_terms(
                    model,
                    guide,
                    chunk_args,
                    chunk_kwargs,
                    k_stop - k_start,
                    data_plate,
                    max_plate_nesting,
                    vectorized,
                    site_scales,
                )
                for k_start, k_stop in chunk_bounds(num_particles, particle_chunk)
            ]
            rows.append(ParticleTerms.concatenate(parts, dim=0))
            if progress is not None:
                progress(stop - start)
    return ParticleTerms.concatenate(rows, dim=1)
