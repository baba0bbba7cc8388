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

Data convention: every tensor argument of the model and guide whose first axis has the
length N of the data plate is sliced along that axis when evaluating in chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

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
    return {
        name: site
        for name, site in prune_subsample_sites(trace).nodes.items()
        if site["type"] == "sample"
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
    log_prob: torch.Tensor, site: dict, data_dim: int, num_particles: int, nesting: int
) -> torch.Tensor:
    """Reduce a site's log density to shape (K, N) by summing every plate dim but the data one."""
    if site["mask"] is not None and not isinstance(site["mask"], bool):
        log_prob = log_prob.masked_fill(~site["mask"], 0.0)
    elif site["mask"] is False:
        log_prob = torch.zeros_like(log_prob)
    full_dims = nesting + 1
    log_prob = log_prob.reshape((1,) * (full_dims - log_prob.dim()) + log_prob.shape)
    data_axis = full_dims + data_dim
    other_axes = [a for a in range(1, full_dims) if a != data_axis]
    if other_axes:
        log_prob = log_prob.sum(other_axes, keepdim=True)
    log_prob = log_prob.reshape(log_prob.shape[0], log_prob.shape[data_axis])
    return log_prob.expand(num_particles, log_prob.shape[1])


def _site_log_prob(site: dict) -> torch.Tensor:
    return site["fn"].log_prob(site["value"])


def _closed_form_kl(guide_site: dict, model_site: dict) -> torch.Tensor | None:
    try:
        kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    return None if is_identically_zero(kl) else kl


def trace_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    """Trace the guide, then the model replayed on the guide's draws: (model, guide) traces."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


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
    bookkeeping that reduces any site's log density to shape (K, N)."""

    model_trace: object
    guide_trace: object
    num_particles: int
    data_plate: str
    max_plate_nesting: int
    data_size: int

    def __post_init__(self):
        self.model_sites = _sample_sites(self.model_trace)
        self.guide_sites = _sample_sites(self.guide_trace)
        _check_site_names(self.model_sites, self.guide_sites)

    @property
    def latent_names(self) -> list[str]:
        return [name for name, site in self.model_sites.items() if not site["is_observed"]]

    def per_datapoint(self, log_prob: torch.Tensor, site: dict, role: str) -> torch.Tensor:
        """Sum ``log_prob`` over every plate dim but the draw and data dims: shape (K, N)."""
        frame = _data_frame(site, self.data_plate, role)
        return _per_datapoint(log_prob, site, frame.dim, self.num_particles, self.max_plate_nesting)

    def data_axis(self, site: dict) -> int:
        """Axis of the data plate in ``site["value"]`` (the draw axis is 0)."""
        frame = _data_frame(site, self.data_plate, "guide")
        return self.max_plate_nesting + 1 + frame.dim

    def guide_log_density(self, detach_values: bool = False) -> torch.Tensor:
        """log q(z_k | x_n), shape (K, N); with ``detach_values`` the draws z are constants, so
        the gradient is the score term d/dphi log q(z; phi) alone."""
        total = 0.0
        for name in self.latent_names:
            site = self.guide_sites[name]
            value = site["value"].detach() if detach_values else site["value"]
            total = total + self.per_datapoint(site["fn"].log_prob(value), site, "guide")
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
) -> ParticleTraces:
    """Trace the guide and then the model replayed on its draws, K draws per data point,
    vectorized with an extra plate left of the model's plates. Keeps autograd history.

    ``block=False`` lets outer handlers see the sites (e.g. SVI collecting ``pyro.param`` sites).
    """
    particle_dim = -(max_plate_nesting + 1)
    blocker = poutine.block() if block else contextlib.nullcontext()
    with blocker, pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
    size = _data_plate_size(model_trace, data_plate)
    return ParticleTraces(
        model_trace, guide_trace, num_particles, data_plate, max_plate_nesting, size
    )


def trace_terms(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    data_plate: str,
    max_plate_nesting: int,
) -> ParticleTerms:
    """Trace guide and model once, with ``num_particles`` vectorized draws per data point."""
    traces = run_traces(model, guide, args, kwargs, num_particles, data_plate, max_plate_nesting)
    return reduce_terms(traces)


def reduce_terms(traces: ParticleTraces, with_kl: bool = True) -> ParticleTerms:
    """Per-datapoint log densities of every site; ``with_kl=False`` skips the KL terms (zeros)."""
    terms = {name: 0.0 for name in _TERM_NAMES}
    all_analytic = with_kl
    for name, site in traces.model_sites.items():
        role = "observed" if site["is_observed"] else "latent"
        log_p = traces.per_datapoint(_site_log_prob(site), site, f"{role} model")
        if site["is_observed"]:
            terms["log_p_obs"] = terms["log_p_obs"] + log_p
            continue
        guide_site = traces.guide_sites[name]
        terms["log_p_latent"] = terms["log_p_latent"] + log_p
        log_q = traces.per_datapoint(_site_log_prob(guide_site), guide_site, "guide")
        terms["log_q"] = terms["log_q"] + log_q
        if not with_kl:
            continue
        kl = _closed_form_kl(guide_site, site)
        if kl is None:
            all_analytic = False
            kl_term = log_q - log_p
        else:
            kl_term = traces.per_datapoint(kl, site, "latent model")
        terms["kl"] = terms["kl"] + kl_term
    if not isinstance(terms["log_p_obs"], torch.Tensor):
        raise ValueError("the model has no observed site: pass the data as `obs=` of a sample site")
    reference = terms["log_p_obs"]
    terms = {
        name: torch.as_tensor(value).to(reference).expand_as(reference)
        for name, value in terms.items()
    }
    return ParticleTerms(**terms, all_analytic=all_analytic)


def _check_site_names(model_sites: dict, guide_sites: dict) -> None:
    latent = {n for n, s in model_sites.items() if not s["is_observed"]}
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


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))


def _batched_length(args: tuple, kwargs: dict) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("no tensor argument found: pass the data tensor(s) to the model and guide")


def _slice_arguments(args: tuple, kwargs: dict, length: int, index: slice):
    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == length:
            return value[index]
        return value

    return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}


def chunk_bounds(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) pairs covering ``range(total)`` in steps of ``chunk``."""
    for start in range(0, total, chunk):
        yield start, min(start + chunk, total)


def particle_terms(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    data_plate: str = "data",
    max_pairs: int = 2**20,
    max_plate_nesting: int | None = None,
    progress: Callable[[int], None] | None = None,
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
        Plate depth of the model; found by running it once when omitted.
    progress : callable, optional
        Called with the number of data points finished after each data chunk.

    Returns
    -------
    ParticleTerms
        (K, N) tensors on the model's device, in its dtype, without autograd history.
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles (K) must be a positive integer, got {num_particles!r}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    length = _batched_length(args, kwargs)
    if max_plate_nesting is None:
        probe_args, probe_kwargs = _slice_arguments(args, kwargs, length, slice(0, 1))
        max_plate_nesting = guess_max_plate_nesting(model, guide, *probe_args, **probe_kwargs)
    data_chunk = max(1, min(length, max_pairs // num_particles))
    particle_chunk = max(1, min(num_particles, max_pairs // data_chunk))
    rows = []
    with torch.no_grad():
        for start, stop in chunk_bounds(length, data_chunk):
            chunk_args, chunk_kwargs = _slice_arguments(args, kwargs, length, slice(start, stop))
            parts = [
                trace_terms(
                    model,
                    guide,
                    chunk_args,
                    chunk_kwargs,
                    k_stop - k_start,
                    data_plate,
                    max_plate_nesting,
                )
                for k_start, k_stop in chunk_bounds(num_particles, particle_chunk)
            ]
            rows.append(ParticleTerms.concatenate(parts, dim=0))
            if progress is not None:
                progress(stop - start)
    return ParticleTerms.concatenate(rows, dim=1)
