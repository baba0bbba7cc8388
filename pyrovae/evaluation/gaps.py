"""Inference-gap decomposition (Cremer, Li and Duvenaud, 2018), per data point.

For an amortized guide q_phi(z | x), the inference gap log p(x) - ELBO(q_phi) splits into

* the **approximation gap** log p(x) - ELBO(q*_x) = KL(q*_x || p(z | x)): what the best
  member q*_x of the guide's family, chosen for this x alone, still misses;
* the **amortization gap** ELBO(q*_x) - ELBO(q_phi) = KL(q_phi || p(z|x)) - KL(q*_x || p(z|x)):
  what the encoder loses by predicting the parameters instead of optimizing them per point.

q*_x is found by giving every data point its own free parameters (location and log-scale of a
diagonal Normal, initialised at the encoder's output) and maximizing its ELBO with Adam
(:class:`LocalNormalGuide` replaces the guide; the model is unchanged). log p(x) is an
importance-sampled estimate with the amortized guide, or a better one the caller passes (e.g.
AIS). All quantities are in nats per data point; both gaps are >= 0 up to Monte Carlo and
optimization error.

Supported: guides with one latent site whose per-point distribution is a diagonal Normal
(``Normal`` or ``Independent(Normal)``): the built-in VAE's ``diagonal`` guide, the
linear-Gaussian reference guide, :class:`~pyrovae.models.autoguide.AmortizedGuide` with a
single Normal site. Refused, with a message: full-covariance, low-rank and flow guides, and
guides with several latent sites (the two-layer VAE's q(z1 | x) q(z2 | z1)).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import Independent, Normal

from pyrovae.evaluation.importance import (
    data_fingerprint,
    evaluate,
    per_point_tensors,
    summary_rows,
)
from pyrovae.evaluation.traces import (
    _batched_length,
    _sample_sites,
    _slice_arguments,
    guess_max_plate_nesting,
    particle_terms,
    reduce_terms,
    run_traces,
)
from pyrovae.models.modes import evaluates

SUPPORTED_FAMILIES = (
    "guides with one latent site whose distribution per data point is a diagonal Normal "
    "(Normal or Independent(Normal)): the VAE's 'diagonal' guide, LinearGaussianGuide, an "
    "AmortizedGuide with one Normal site"
)

QUANTITIES = (
    "log_px",
    "elbo_amortized",
    "elbo_optimal",
    "inference_gap",
    "approximation_gap",
    "amortization_gap",
)


# --------------------------------------------------------------------------- local guide


@dataclass
class LocalNormalGuide:
    """A guide with free per-point parameters: z_n ~ Normal(loc_n, exp(log_scale_n)).

    Parameters are stored as offsets from the encoder's output, in units of its scale
    (``loc = init_loc + init_scale * shift``, ``log_scale = log(init_scale) + stretch``), so
    that one Adam step moves every point by a similar share of its posterior width.

    Attributes
    ----------
    site : str
        Name of the latent site.
    frames : tuple
        The plates (``CondIndepStackFrame``) the site lives in, the data plate among them.
    init_loc, init_scale : torch.Tensor
        The encoder's parameters, shape (N, ...) with the data plate first.
    event_dim : int
        Event dimensions of the site's distribution.
    shift, stretch : torch.Tensor
        The free parameters (zeros at the start), same shape as ``init_loc``.
    """

    site: str
    frames: tuple
    init_loc: torch.Tensor
    init_scale: torch.Tensor
    event_dim: int
    shift: torch.Tensor = None
    stretch: torch.Tensor = None

    def __post_init__(self):
        if self.shift is None:
            self.shift = torch.zeros_like(self.init_loc, requires_grad=True)
        if self.stretch is None:
            self.stretch = torch.zeros_like(self.init_loc, requires_grad=True)

    @property
    def loc(self) -> torch.Tensor:
        return self.init_loc + self.init_scale * self.shift

    @property
    def scale(self) -> torch.Tensor:
        return self.init_scale * self.stretch.exp()

    def distribution(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(self.event_dim)

    def subset(self, index: slice) -> LocalNormalGuide:
        """The guide of the points ``index`` (the same tensors, sliced)."""
        frames = tuple(_resized(frame, index, len(self.init_loc)) for frame in self.frames)
        sliced = [t[index] for t in (self.init_loc, self.init_scale, self.shift, self.stretch)]
        loc, scale, shift, stretch = sliced
        return LocalNormalGuide(self.site, frames, loc, scale, self.event_dim, shift, stretch)

    def __call__(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for frame in self.frames:
                stack.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
            return pyro.sample(self.site, self.distribution())


def _resized(frame, index: slice, length: int):
    size = len(range(*index.indices(length))) if frame.size == length else frame.size
    return frame._replace(size=size)


def _normal_parts(fn) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(loc, scale, event_dim) of a Normal or Independent(Normal) distribution, else None."""
    event_dim = 0
    while isinstance(fn, Independent):
        event_dim += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if type(fn) not in (Normal, dist.Normal):
        return None
    return fn.loc, fn.scale, event_dim


def _family_name(fn) -> str:
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    return type(base).__name__


def local_guide(guide, *args, data_plate: str = "data", **kwargs) -> LocalNormalGuide:
    """A :class:`LocalNormalGuide` initialised at the amortized guide's output on the data.

    Raises
    ------
    ValueError
        When the guide is not of a supported family (see :data:`SUPPORTED_FAMILIES`).
    """
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    sites = _sample_sites(trace)
    if len(sites) != 1:
        raise ValueError(
            f"the gap decomposition supports {SUPPORTED_FAMILIES}; this guide has "
            f"{len(sites)} latent sites ({', '.join(map(repr, sites))}), e.g. the two-layer "
            "VAE's q(z1 | x) q(z2 | z1), whose per-point family is not a set of free parameters"
        )
    ((name, site),) = sites.items()
    parts = _normal_parts(site["fn"])
    if parts is None:
        raise ValueError(
            f"the gap decomposition supports {SUPPORTED_FAMILIES}; site {name!r} of this guide "
            f"is a {_family_name(site['fn'])} (full-covariance, low-rank and flow guides are "
            "not supported)"
        )
    loc, scale, event_dim = parts
    frames = tuple(f for f in site["cond_indep_stack"] if f.vectorized)
    if data_plate not in {f.name for f in frames}:
        raise ValueError(f"site {name!r} of the guide is not inside the data plate {data_plate!r}")
    shape = site["fn"].batch_shape + site["fn"].event_shape
    loc, scale = (t.detach().expand(shape).clone() for t in (loc, scale))
    return LocalNormalGuide(name, frames, loc, scale, event_dim)


# --------------------------------------------------------------------------- optimization


@dataclass
class Convergence:
    """How far the per-point optimization got, averaged over data points (nats per point).

    Attributes
    ----------
    steps, draws : int
        Adam steps, and draws z per point and step of the ELBO estimate.
    learning_rate : float
        Initial Adam step size (in units of the encoder's posterior scale; cosine decay to
        1/100 of it).
    initial_elbo, final_elbo : float
        The optimized objective (Monte Carlo ELBO, analytic KL where available) averaged over
        the first and over the last 10% of the steps.
    last_gain, last_gain_se : float
        Mean objective over the last 10% of the steps minus that over the 10% before, and its
        standard error from the step-to-step noise.
    tolerance : float
        ``converged`` is ``last_gain <= tolerance + 2 * last_gain_se``.
    """

    steps: int
    draws: int
    learning_rate: float
    initial_elbo: float
    final_elbo: float
    last_gain: float
    last_gain_se: float
    tolerance: float

    @property
    def converged(self) -> bool:
        return self.last_gain <= self.tolerance + 2 * self.last_gain_se

    def describe(self) -> str:
        verdict = "converged" if self.converged else "NOT converged (raise steps)"
        return (
            f"per-point optimization: {self.steps} Adam steps, {self.draws} draws per step, "
            f"learning rate {self.learning_rate:g}; objective {self.initial_elbo:.3f} -> "
            f"{self.final_elbo:.3f}; gain over the last 10% of the steps {self.last_gain:.4f} "
            f"+- {self.last_gain_se:.4f} nats (tolerance {self.tolerance:g}): {verdict}"
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "converged": self.converged}


def _step_objective(model, local, args, kwargs, draws, data_plate, nesting) -> torch.Tensor:
    """Per-point ELBO estimate (n,) with ``draws`` draws, analytic KL where available."""
    traces = run_traces(model, local, args, kwargs, draws, data_plate, nesting)
    terms = reduce_terms(traces)
    return (terms.log_p_obs - terms.kl).mean(0)


def optimize_local(
    model, local, args, kwargs, *, steps, draws, learning_rate, data_plate, nesting
) -> np.ndarray:
    """Maximize each point's ELBO over its free parameters in place; returns the objective
    summed over the points at every step, shape (steps,)."""
    parameters = [local.shift, local.stretch]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=steps, eta_min=learning_rate / 100
    )
    trace = np.empty(steps)
    for step in range(steps):
        objective = _step_objective(model, local, args, kwargs, draws, data_plate, nesting)
        loss = -objective.sum()
        gradients = torch.autograd.grad(loss, parameters)
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient
        optimizer.step()
        schedule.step()
        trace[step] = float(objective.detach().sum())
    return trace


def _convergence(totals: np.ndarray, count: int, options: dict, tolerance: float) -> Convergence:
    per_point = totals / count
    window = max(1, len(per_point) // 10)
    last, before = per_point[-window:], per_point[-2 * window : -window]
    if len(before) == 0:
        before = per_point[:1]
    noise = math.sqrt(_variance(last) / len(last) + _variance(before) / len(before))
    return Convergence(
        steps=options["steps"],
        draws=options["draws"],
        learning_rate=options["learning_rate"],
        initial_elbo=float(per_point[:window].mean()),
        final_elbo=float(last.mean()),
        last_gain=float(last.mean() - before.mean()),
        last_gain_se=noise,
        tolerance=tolerance,
    )


def _variance(values: np.ndarray) -> float:
    return float(values.var(ddof=1)) if len(values) > 1 else 0.0


@torch.no_grad()
def local_elbo(model, local, args, kwargs, num_samples, data_plate, nesting, max_pairs):
    """ELBO of the local guide per point (N,), float64, with ``num_samples`` draws
    (analytic KL where available), at most ``max_pairs`` (draw, point) pairs per pass."""
    length = len(local.init_loc)
    chunk = max(1, max_pairs // num_samples)
    parts = []
    for start in range(0, length, chunk):
        index = slice(start, min(start + chunk, length))
        chunk_args, chunk_kwargs = _slice_arguments(args, kwargs, length, index)
        terms = particle_terms(
            model,
            local.subset(index),
            *chunk_args,
            num_particles=num_samples,
            data_plate=data_plate,
            max_pairs=max_pairs,
            max_plate_nesting=nesting,
            **chunk_kwargs,
        )
        parts.append((terms.log_p_obs - terms.kl).double().mean(0))
    return torch.cat(parts).cpu().numpy()


# --------------------------------------------------------------------------- result


@dataclass
class GapResult:
    """Per-datapoint gap decomposition, in nats per data point.

    Attributes
    ----------
    per_datapoint : dict of str to numpy.ndarray
        Columns of length N: ``log_px`` (the log p(x) estimate used), ``elbo_amortized``
        (ELBO of the amortized guide), ``elbo_optimal`` (ELBO of q*_x), ``inference_gap`` =
        log_px - elbo_amortized, ``approximation_gap`` = log_px - elbo_optimal and
        ``amortization_gap`` = elbo_optimal - elbo_amortized (so the two gaps add up to the
        inference gap exactly). Higher ELBOs are better; gaps are >= 0 up to noise.
    num_samples : int
        Draws per point of each ELBO estimate.
    log_px_source : str
        Where log_px comes from.
    convergence : Convergence
        Report of the per-point optimization.
    data_fingerprint : str or None
        :func:`pyrovae.evaluation.importance.data_fingerprint` of the data.
    optimal_loc, optimal_scale : numpy.ndarray or None
        Parameters of q*_x per point, shape (N, ...) like the latent site (units of z).
    """

    per_datapoint: dict[str, np.ndarray]
    num_samples: int
    log_px_source: str
    convergence: Convergence
    data_fingerprint: str | None = None
    settings: dict = field(default_factory=dict)
    optimal_loc: np.ndarray | None = None
    optimal_scale: np.ndarray | None = None

    @property
    def num_points(self) -> int:
        return len(self.per_datapoint["log_px"])

    def summary(self) -> list[dict]:
        """Rows (quantity, mean, standard error of the mean over data points)."""
        return summary_rows(self.per_datapoint, QUANTITIES)

    def table(self) -> str:
        lines = [
            f"{'quantity':<20}{'mean':>12}{'se':>10}   (nats per data point, N={self.num_points}, "
            f"ELBOs with {self.num_samples} draws)"
        ]
        lines += [f"{r['quantity']:<20}{r['mean']:>12.3f}{r['se']:>10.3f}" for r in self.summary()]
        lines.append(f"log_px: {self.log_px_source}")
        lines.append(self.convergence.describe())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "log_px_source": self.log_px_source,
            "convergence": self.convergence.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "settings": dict(self.settings),
            "per_datapoint": {name: values.tolist() for name, values in self.per_datapoint.items()},
            "summary": self.summary(),
        }


# --------------------------------------------------------------------------- driver


def _given_log_px(log_px, length: int, fingerprint: str) -> np.ndarray:
    """log p(x) per point from an array or a result object (``per_datapoint["log_px"]``)."""
    other = getattr(log_px, "data_fingerprint", None)
    if other is not None and other != fingerprint:
        raise ValueError(
            f"the log_px given was computed on other data (fingerprint {other}, these data "
            f"{fingerprint})"
        )
    values = getattr(log_px, "per_datapoint", {"log_px": log_px})["log_px"]
    values = np.asarray(torch.as_tensor(values).detach().cpu().double(), dtype=np.float64)
    if values.shape != (length,):
        raise ValueError(
            f"log_px must have one value per data point, shape ({length},), got {values.shape}"
        )
    if not np.isfinite(values).all():
        raise ValueError("log_px must be finite")
    return values


@evaluates("model", "guide")
def gap_decomposition(
    model,
    guide,
    *args,
    log_px=None,
    num_samples: int = 1000,
    steps: int = 500,
    draws: int = 8,
    learning_rate: float = 0.05,
    tolerance: float = 0.01,
    data_plate: str = "data",
    max_pairs: int = 2**14,
    seed: int | None = None,
    **kwargs,
) -> GapResult:
    """Split log p(x) - ELBO(amortized q) into approximation and amortization gaps.

    Parameters
    ----------
    model, guide : callable
        Pyro model and amortized guide (see :data:`SUPPORTED_FAMILIES`), called as
        ``model(*args, **kwargs)``; tensor arguments whose first axis has the data size are
        the data.
    log_px : array-like of shape (N,) or result object, optional
        A log p(x) estimate per point (nats), e.g. ``ais(...)`` (anything with
        ``per_datapoint["log_px"]``) or an exact value; by default importance sampling with
        the amortized guide and ``num_samples`` draws.
    num_samples : int
        Draws per point for log p(x) and for each ELBO.
    steps, draws, learning_rate : int, int, float
        Adam steps per point, draws per step, initial step size in units of the encoder's
        posterior scale (cosine decay to 1/100).
    tolerance : float
        Nats per point: the optimization counts as converged when the objective gained at
        most this (plus two standard errors) over the last 10% of the steps.
    max_pairs : int
        Most (draw, data point) pairs per pass; the optimization takes ``max_pairs // (4
        draws)`` points at a time (gradients need about 3 times the forward memory).
    seed : int, optional
        Seed of all draws.

    Returns
    -------
    GapResult
    """
    _check_options(num_samples, steps, draws, learning_rate, max_pairs)
    if seed is not None:
        pyro.set_rng_seed(seed)
    length = _batched_length(args, kwargs)
    fingerprint = data_fingerprint(*per_point_tensors(args, kwargs, length))
    amortized = evaluate(
        model,
        guide,
        *args,
        num_samples=num_samples,
        ks=(1,),
        data_plate=data_plate,
        max_pairs=max_pairs,
        seed=seed,
        latent_diagnostics=False,
        **kwargs,
    )
    if log_px is None:
        log_px = amortized.per_datapoint["log_px"]
        source = (
            f"importance sampling with the amortized guide, K={num_samples} (a lower bound in "
            "expectation: the approximation gap is understated by its bias)"
        )
    else:
        log_px, source = _given_log_px(log_px, length, fingerprint), "given by the caller"
    options = {"steps": steps, "draws": draws, "learning_rate": learning_rate}
    optimal, totals, parameters = _optimal_elbo(
        model, guide, args, kwargs, num_samples, data_plate, max_pairs, options
    )
    elbo = amortized.per_datapoint["elbo_analytic"]
    columns = {
        "log_px": log_px,
        "elbo_amortized": elbo,
        "elbo_optimal": optimal,
        "inference_gap": log_px - elbo,
        "approximation_gap": log_px - optimal,
        "amortization_gap": optimal - elbo,
    }
    convergence = _convergence(totals, length, options, tolerance)
    settings = {**options, "max_pairs": max_pairs, "seed": seed}
    return GapResult(columns, num_samples, source, convergence, fingerprint, settings, *parameters)


def _optimal_elbo(model, guide, args, kwargs, num_samples, data_plate, max_pairs, options):
    """ELBO(q*_x) per point, the optimization objective summed over points per step, and
    the optimal (loc, scale) per point."""
    length = _batched_length(args, kwargs)
    probe_args, probe_kwargs = _slice_arguments(args, kwargs, length, slice(0, 1))
    nesting = guess_max_plate_nesting(model, guide, *probe_args, **probe_kwargs)
    chunk = max(1, max_pairs // (4 * options["draws"]))
    totals, optimal, locs, scales = np.zeros(options["steps"]), [], [], []
    for start in range(0, length, chunk):
        index = slice(start, min(start + chunk, length))
        chunk_args, chunk_kwargs = _slice_arguments(args, kwargs, length, index)
        local = local_guide(guide, *chunk_args, data_plate=data_plate, **chunk_kwargs)
        totals += optimize_local(
            model,
            local,
            chunk_args,
            chunk_kwargs,
            data_plate=data_plate,
            nesting=nesting,
            **options,
        )
        optimal.append(
            local_elbo(
                model, local, chunk_args, chunk_kwargs, num_samples, data_plate, nesting, max_pairs
            )
        )
        with torch.no_grad():
            locs.append(local.loc.double().cpu().numpy())
            scales.append(local.scale.double().cpu().numpy())
    parameters = (np.concatenate(locs), np.concatenate(scales))
    return np.concatenate(optimal), totals, parameters


def _check_options(num_samples, steps, draws, learning_rate, max_pairs) -> None:
    for name, value in (
        ("num_samples", num_samples),
        ("steps", steps),
        ("draws", draws),
        ("max_pairs", max_pairs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")


@evaluates("fitted")
def decompose_gaps(fitted, *data, **options) -> GapResult:
    """:func:`gap_decomposition` of a fitted :class:`~pyrovae.models.latent_variable.
    LatentVariableModel` (e.g. a :class:`~pyrovae.VAE`) on its data (validated as its
    ``inputs``), with its model, guide and data plate."""
    inputs = fitted.inputs(*data)
    return gap_decomposition(
        fitted.model, fitted.guide, *inputs, data_plate=fitted.data_plate, **options
    )
