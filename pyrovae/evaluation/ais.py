"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) for any Pyro model
and guide whose latent sites are continuous and local to the data plate.

AIS (Neal, 2001) moves C chains per data point from a starting density r(z) (the guide
q(z|x), or the prior p(z)) to the posterior p(z|x) through the geometric path

    pi_t(z) ∝ r(z)^(1 - beta_t) p(x, z)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,

with Hamiltonian Monte Carlo transitions (:mod:`pyrovae.evaluation.hmc`) leaving each pi_t
invariant. Each chain's log weight

    log w = sum_{t=1..T} (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log r(z_{t-1})]

has E[w] = p(x), so ``log_px = log mean_c w_c`` is a *stochastic lower bound* on log p(x):
E[log_px] <= log p(x) (Jensen). Its bias shrinks as C grows, and as T grows only when the
transitions mix: a mode of p(z|x) that the HMC kernel cannot reach from the starting draws
stays missed at every T (the weights then account for it no better than importance
sampling from r). Its Monte Carlo standard error over the chains is the delta-method one of
:func:`pyrovae.evaluation.bounds.importance_estimate`.

Reverse AIS, used by BDMC (Grosse et al., 2015; Wu et al., 2017), starts from an exact
posterior draw z* (available for data simulated from the model: z* ~ p(z), x ~ p(x|z*)),
runs the same transitions from beta = 1 down to 0, and its weights w' have E[w'] = 1/p(x),
so ``-log mean_c w'_c`` is a *stochastic upper bound*: E[upper] >= log p(x). The sandwich
bounds the error *in expectation*: E[upper] - E[lower] >= log p(x) - E[lower] >= 0, so the
expected width bounds the bias of forward AIS on such data (a single run's width does not
bound that run's error: either bound can cross log p(x) by Monte Carlo noise). Its mean
over many simulated points tells how many steps make AIS trustworthy for a given model.

All values are in nats per data point, float64; higher log-likelihoods are better.

Implementation. The chains live in the unconstrained space of each latent site
(``biject_to(support)``, with ``log |det dz/du|`` in both densities), all sites of a data point
flattened into one vector of D coordinates. Densities come from tracing the model and the
guide conditioned on the latent values under a vectorized plate over chains (the same
per-datapoint reduction as :mod:`pyrovae.evaluation.traces`), gradients from
:func:`torch.autograd.grad` over the whole (chains, points, D) batch. Data points are
processed in chunks of at most ``max_pairs`` (chain, data point) pairs, in one process
(unlike :func:`pyrovae.evaluation.importance.evaluate`, the blocks are not sharded under
:mod:`torch.distributed`).

Scales and subsampling, as in :func:`pyrovae.evaluation.importance.evaluate` (see
:mod:`pyrovae.evaluation.traces`). A scale common to every site (``poutine.scale`` around
the whole model and guide, the data plate's subsampling scale) is left out: the estimates
are per data point. Site-specific scales are refused with evaluate's message. An observed
site in a subsampled plate nested in the data plate (``subsample_size=2`` of 4) has its log
density multiplied by that plate's scale (4/2); the plate's subsample is drawn once per
block of data points and replayed in every density evaluation of that block (guide and
model alike), so AIS estimates log Z_S, the log normalizer of p(z) p(x_S | z)^scale for
that subsample S (what evaluate's log p_hat(x) estimates when its draws share one S, as
they do in one vectorized pass). Latent
sites in subsampled plates are refused (the chains start from unscaled draws of r(z)), and
:func:`bdmc` refuses every subsampled inner plate (z* is an exact posterior draw given all
the data, not a draw of the scaled target).

Step-size adaptation. The leapfrog step size of each data point (shared by its chains)
starts at ``step_size`` and is updated after every transition,
log eps <- log eps + adapt_rate * (a - target_accept), with a the mean Metropolis-Hastings
acceptance probability of that point's transition; the step size of transition t therefore
depends only on transitions < t, never on the current one. By default (``tuning_chains >
0``) a is taken from extra *tuning chains* whose weights are discarded: the kernels of the
estimating chains are then independent of those chains, so E[w] = p(x) holds exactly and the
bound is exact in expectation. With ``tuning_chains=0`` the chains adapt from their own
past acceptances (the practice of Wu et al., 2017); each kernel is still fixed before it is
applied, but since it depends on the chains' own history, E[w] = p(x) is no longer exact (a
small bias for slow adaptation). Reverse AIS reuses the step sizes recorded by the forward
run, which do not depend on the reverse chains, so its upper bound is exact in expectation.

References
----------
Neal, R. M. (2001). Annealed importance sampling. Statistics and Computing 11, 125-139.
Grosse, R. B., Ghahramani, Z. and Adams, R. P. (2015). Sandwiching the marginal likelihood
using bidirectional Monte Carlo. arXiv:1511.02543.
Wu, Y., Burda, Y., Salakhutdinov, R. and Grosse, R. (2017). On the quantitative analysis of
decoder-based generative models. ICLR.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyrovae.evaluation.annealing_target import (
    AnnealingTarget,
    _check_start,
    _cuda_devices,
    _is_observed_or_discrete,
)
from pyrovae.evaluation.bounds import importance_estimate
from pyrovae.evaluation.hmc import hmc_transition
from pyrovae.evaluation.importance import summary_rows, write_per_datapoint_csv
from pyrovae.evaluation.structure import check_structure
from pyrovae.evaluation.traces import (
    _batched_length,
    _sample_sites,
    _slice_arguments,
    chunk_bounds,
)
from pyrovae.models.modes import evaluates
from pyrovae.randomness import derived_seed

SCHEDULES = ("sigmoid", "linear")
STEP_SIZE_RANGE = (1e-6, 1e3)
"""Bounds of the adapted leapfrog step size (units of the unconstrained latent space)."""


# ------------------------------------------------------------------------------ schedules


def annealing_schedule(
    num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0
) -> torch.Tensor:
    """Inverse temperatures 0 = beta_0 < ... < beta_T = 1 of the geometric path.

    Parameters
    ----------
    num_steps : int
        T, the number of annealing steps (T - 1 intermediate distributions).
    kind : {"sigmoid", "linear"}
        ``"linear"``: beta_t = t / T. ``"sigmoid"`` (Grosse et al., 2015): beta_t =
        sigmoid(sharpness (2t/T - 1)), shifted and scaled to start at 0 and end at 1; it
        spends more steps near both ends, where the densities change fastest.
    sharpness : float
        delta of the sigmoid schedule.

    Returns
    -------
    torch.Tensor of shape (T + 1,), float64
    """
    _check_positive_int("num_steps", num_steps)
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if kind == "linear":
        return grid
    if kind != "sigmoid":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    curve = torch.sigmoid(sharpness * (2.0 * grid - 1.0))
    betas = (curve - curve[0]) / (curve[-1] - curve[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas


# ----------------------------------------------------------------------- the latent space


# --------------------------------------------------------------------------- annealing runs


@dataclass(frozen=True)
class HMCSettings:
    """Transition settings shared by every AIS run of a call (see :func:`ais`)."""

    num_leapfrog: int = 10
    step_size: float = 0.1
    target_accept: float = 0.65
    adapt_rate: float = 0.5
    tuning_chains: int = 2
    adapt: bool = True

    def __post_init__(self):
        _check_positive_int("num_leapfrog", self.num_leapfrog)
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size!r}")
        if not 0 < self.target_accept < 1:
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept!r}")
        if self.adapt_rate < 0:
            raise ValueError(f"adapt_rate must be >= 0, got {self.adapt_rate!r}")
        if isinstance(self.tuning_chains, bool) or not isinstance(self.tuning_chains, int):
            raise ValueError(f"tuning_chains must be an integer, got {self.tuning_chains!r}")
        if self.tuning_chains < 0:
            raise ValueError(f"tuning_chains must be >= 0, got {self.tuning_chains!r}")

    @property
    def extra_chains(self) -> int:
        """Tuning chains actually run (none without adaptation)."""
        return self.tuning_chains if self.adapt else 0

    def adapted(self, step_size: torch.Tensor, accept_prob: torch.Tensor) -> torch.Tensor:
        """Next step sizes (N,) from this transition's acceptance probabilities (C', N)."""
        if not self.adapt:
            return step_size
        rate = accept_prob.double().mean(0)
        step_size = step_size * torch.exp(self.adapt_rate * (rate - self.target_accept))
        return step_size.clamp(*STEP_SIZE_RANGE)


@dataclass
class ForwardRun:
    """Outputs of forward AIS on one block: log weights (C, N), mean acceptance (N,), the
    final step sizes (N,) and the step sizes of every transition (T - 1, N)."""

    log_weights: torch.Tensor
    acceptance: torch.Tensor
    final_step_size: torch.Tensor
    step_sizes: torch.Tensor


def anneal_forward(
    target: AnnealingTarget, betas: torch.Tensor, num_chains: int, hmc: HMCSettings
) -> ForwardRun:
    """Forward AIS from r(z) to p(z|x) on one block of data points (Neal, 2001).

    The transition at beta_T = 1 is skipped: it would not change any weight.
    """
    tuning = hmc.extra_chains
    state = target.evaluate(target.flatten(target.sample_start(tuning + num_chains)))
    log_weights = torch.zeros(state.log_joint.shape, dtype=torch.float64)
    step_size = torch.full((target.num_points,), float(hmc.step_size), dtype=torch.float64)
    accept_total, steps = torch.zeros_like(step_size), []
    num_steps = len(betas) - 1
    for t in range(1, num_steps + 1):
        log_weights += (betas[t] - betas[t - 1]) * state.log_ratio.double().cpu()
        if t == num_steps:
            break
        steps.append(step_size)
        state, prob = hmc_transition(
            state, target.evaluate, float(betas[t]), step_size, hmc.num_leapfrog
        )
        prob = prob.double().cpu()
        accept_total += prob[tuning:].mean(0)
        step_size = hmc.adapted(step_size, prob[:tuning] if tuning else prob)
    transitions = max(num_steps - 1, 1)
    acceptance = accept_total / transitions if num_steps > 1 else accept_total.fill_(math.nan)
    recorded = torch.stack(steps) if steps else step_size.new_zeros((0, target.num_points))
    return ForwardRun(log_weights[tuning:], acceptance, step_size, recorded)


def anneal_reverse(
    target: AnnealingTarget,
    betas: torch.Tensor,
    start: dict[str, torch.Tensor],
    step_sizes: torch.Tensor,
    num_leapfrog: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse AIS from exact posterior draws ``start`` (shapes (C, ...)) down to r(z).

    Runs the forward run's transitions in reverse order, with its recorded step sizes
    ``step_sizes`` (T - 1, N): transition t (at beta_t) uses ``step_sizes[t - 1]``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Reverse log weights (C, N) with E[exp] = 1/p(x) (float64), and the mean acceptance
        probability per data point (N,).
    """
    state = target.evaluate(target.flatten(start))
    log_weights = torch.zeros(state.log_joint.shape, dtype=torch.float64)
    accept_total = torch.zeros(target.num_points, dtype=torch.float64)
    num_steps = len(betas) - 1
    for t in range(num_steps, 0, -1):
        log_weights += (betas[t - 1] - betas[t]) * state.log_ratio.double().cpu()
        if t == 1:
            break
        state, prob = hmc_transition(
            state, target.evaluate, float(betas[t - 1]), step_sizes[t - 2], num_leapfrog
        )
        accept_total += prob.double().cpu().mean(0)
    acceptance = accept_total / (num_steps - 1) if num_steps > 1 else accept_total + math.nan
    return log_weights, acceptance


# ------------------------------------------------------------------------------- results


@dataclass
class _Result:
    per_datapoint: dict[str, np.ndarray]
    num_steps: int
    num_chains: int
    settings: dict = field(default_factory=dict)

    QUANTITIES = ()

    @property
    def num_points(self) -> int:
        return len(next(iter(self.per_datapoint.values())))

    def summary(self) -> list[dict]:
        """Rows (quantity, mean, standard error of the mean over data points)."""
        return summary_rows(self.per_datapoint, self.QUANTITIES)

    def _header(self) -> str:
        return (
            f"{'quantity':<16}{'mean':>12}{'se':>10}   (nats per data point, N={self.num_points}, "
            f"chains={self.num_chains}, steps={self.num_steps})"
        )

    def _rows(self) -> list[str]:
        return [f"{r['quantity']:<16}{r['mean']:>12.3f}{r['se']:>10.3f}" for r in self.summary()]

    def _settings_line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())

    def to_dict(self) -> dict:
        """Plain Python containers (lists and numbers), e.g. for JSON."""
        return {
            "num_steps": self.num_steps,
            "num_chains": self.num_chains,
            "settings": dict(self.settings),
            "per_datapoint": {name: values.tolist() for name, values in self.per_datapoint.items()},
            "summary": self.summary(),
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write the per-datapoint columns, one row per data point."""
        return write_per_datapoint_csv(self.per_datapoint, path)


@dataclass
class AISResult(_Result):
    """Per-datapoint AIS estimates of log p(x).

    Attributes
    ----------
    per_datapoint : dict of str to numpy.ndarray
        Columns of length N, float64: ``log_px`` (log mean_c w_c, nats; a stochastic lower
        bound on log p(x)), ``log_px_se`` (its delta-method Monte Carlo standard error over
        the chains, nats), ``ess`` (Kish effective sample size of the chains' weights),
        ``acceptance`` (mean HMC acceptance probability over transitions and chains) and
        ``step_size`` (final leapfrog step size).
    num_steps, num_chains : int
        T annealing steps; C estimating chains per data point.
    settings : dict
        Start, schedule and HMC settings.
    """

    QUANTITIES = ("log_px",)

    @property
    def log_px(self) -> np.ndarray:
        return self.per_datapoint["log_px"]

    @property
    def log_px_se(self) -> np.ndarray:
        return self.per_datapoint["log_px_se"]

    def table(self) -> str:
        """The summary as aligned text, with the diagnostics below it."""
        columns = self.per_datapoint
        target = self.settings.get("target_accept", math.nan)
        return "\n".join(
            [
                self._header(),
                *self._rows(),
                "AIS log_px is a stochastic lower bound: E[log_px] <= log p(x)",
                f"mean MC standard error of log_px: {columns['log_px_se'].mean():.4f}",
                f"median effective sample size: {np.median(columns['ess']):.1f} of "
                f"{self.num_chains}",
                f"mean acceptance rate: {np.nanmean(columns['acceptance']):.3f} "
                f"(target {target}); median final step size: "
                f"{np.median(columns['step_size']):.4g}",
                self._settings_line(),
            ]
        )


@dataclass
class BDMCResult(_Result):
    """Bidirectional Monte Carlo sandwich per simulated data point.

    Attributes
    ----------
    per_datapoint : dict of str to numpy.ndarray
        Columns of length N, float64, in nats: ``lower`` (forward AIS, E[lower] <= log p(x))
        and ``lower_se``; ``upper`` (reverse AIS from the exact posterior draw,
        E[upper] >= log p(x)) and ``upper_se`` (delta method over the reverse chains, which
        share their start z*, so it understates the spread over z*); ``width`` = upper -
        lower; ``acceptance_forward``, ``acceptance_reverse`` and ``step_size``.
    inputs : tuple
        The model inputs the sandwich was computed on (the simulated data).
    posterior_sample : dict of str to torch.Tensor
        The exact posterior draws z* (as the model's trace lays them out).
    """

    inputs: tuple = ()
    posterior_sample: dict = field(default_factory=dict)

    QUANTITIES = ("lower", "upper", "width")

    @property
    def mean_width(self) -> float:
        """Mean of upper - lower over data points, nats. Its expectation bounds the mean bias
        log p(x) - E[lower] of forward AIS with these settings on data from the model."""
        return float(self.per_datapoint["width"].mean())

    def table(self) -> str:
        columns = self.per_datapoint
        return "\n".join(
            [
                self._header(),
                *self._rows(),
                "E[lower] <= log p(x) <= E[upper] (forward and reverse AIS on simulated data)",
                f"mean width of the sandwich: {self.mean_width:.4f} nats",
                f"mean MC standard error: lower {columns['lower_se'].mean():.4f}, "
                f"upper {columns['upper_se'].mean():.4f}",
                f"mean acceptance rate: forward {np.nanmean(columns['acceptance_forward']):.3f},"
                f" reverse {np.nanmean(columns['acceptance_reverse']):.3f}",
                self._settings_line(),
            ]
        )


# ------------------------------------------------------------------------------- drivers


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _base_seed(seed: int | None) -> int:
    if seed is not None:
        pyro.set_rng_seed(seed)
        return seed
    return int(torch.randint(0, 2**62, ()))


def _check_weights(log_weights: torch.Tensor, offset: int) -> None:
    bad = torch.isnan(log_weights).any(0)
    if bool(bad.any()):
        index = offset + int(bad.nonzero()[0])
        raise ValueError(f"NaN AIS log weight for data point {index}")


@dataclass(frozen=True)
class _Plan:
    """What every block of a call shares."""

    model: Callable
    guide: Callable | None
    betas: torch.Tensor
    num_chains: int
    hmc: HMCSettings
    start: str
    data_plate: str
    nesting: int
    max_pairs: int

    def blocks(self, length: int) -> list[tuple[int, int]]:
        chains = self.num_chains + self.hmc.extra_chains
        return list(chunk_bounds(length, max(1, self.max_pairs // chains)))

    def target(self, args: tuple, kwargs: dict) -> AnnealingTarget:
        return AnnealingTarget(
            self.model, self.guide, args, kwargs, self.start, self.data_plate, self.nesting
        )

    def settings(self, schedule: str) -> dict:
        hmc = self.hmc
        return {
            "start": self.start,
            "schedule": schedule,
            "num_leapfrog": hmc.num_leapfrog,
            "initial_step_size": hmc.step_size,
            "target_accept": hmc.target_accept,
            "adapt": hmc.adapt,
            "tuning_chains": hmc.extra_chains,
        }


def _make_plan(model, guide, args, kwargs, options: dict) -> _Plan:
    _check_start(options["start"], guide)
    _check_positive_int("num_chains", options["num_chains"])
    _check_positive_int("max_pairs", options["max_pairs"])
    reference = guide
    if options["start"] == "prior":  # its discrete sites, if any, are refused per block
        reference = poutine.block(model, hide_fn=_is_observed_or_discrete)
    structure = check_structure(
        model, reference, *args, data_plate=options["data_plate"], probe_rows=1, **kwargs
    )
    if structure.guided_discrete:
        names = ", ".join(map(repr, structure.guided_discrete))
        raise ValueError(
            f"the guide samples the discrete site(s) {names}: AIS moves continuous latent "
            "variables with HMC. Leave them out of the guide: AIS then sums them out exactly "
            "(enumeration) inside log p(x, z)"
        )
    if not structure.vectorized:
        raise ValueError(
            "AIS runs its chains in one vectorized plate, and this model and guide do not "
            f"broadcast over a leading dimension ({structure.why_sequential}). Write the code "
            "to broadcast over leading dimensions (index and concatenate from the right, "
            "dim=-1), or estimate log p(x) by importance sampling (evaluate), which draws "
            "one particle per pass for such programs"
        )
    nesting = structure.max_plate_nesting
    return _Plan(
        model,
        guide,
        annealing_schedule(options["num_steps"], options["schedule"]),
        options["num_chains"],
        options["hmc"],
        options["start"],
        options["data_plate"],
        nesting,
        options["max_pairs"],
    )


def _run_blocks(plan: _Plan, args, kwargs, seed, progress, desc, run_block, on_block=None) -> dict:
    """Call ``run_block(target, start)`` on every block under its derived seed; concatenate
    the returned per-datapoint columns; ``on_block`` gets one line per block."""
    length = _batched_length(args, kwargs)
    base_seed = _base_seed(seed)
    devices = _cuda_devices(args, kwargs)
    columns: dict[str, list[np.ndarray]] = {}
    blocks = plan.blocks(length)
    started = time.perf_counter()
    with tqdm(total=length, disable=not progress, desc=desc, unit="pt") as bar:
        for block, (start, stop) in enumerate(blocks):
            block_started = time.perf_counter()
            chunk_args, chunk_kwargs = _slice_arguments(args, kwargs, length, slice(start, stop))
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derived_seed(base_seed, block))
                target = plan.target(chunk_args, chunk_kwargs)
                for name, values in run_block(target, start).items():
                    columns.setdefault(name, []).append(values)
            bar.update(stop - start)
            if on_block is not None:
                on_block(
                    _block_line(desc, block, len(blocks), stop, length, block_started, started)
                )
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _block_line(desc, block, blocks, done, length, block_started, started) -> str:
    """'AIS block 3/10: 300 of 1000 points, 5.1 s; about 16 s left'."""
    now = time.perf_counter()
    left = (now - started) / done * (length - done)
    return (
        f"{desc} block {block + 1}/{blocks}: {done} of {length} points, "
        f"{now - block_started:.1f} s; about {left:.0f} s left"
    )


def _estimate(log_weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    log_px, se, ess = importance_estimate(log_weights)
    return log_px.numpy(), se.numpy(), ess.numpy()


@evaluates("model", "guide")
def ais(
    model: Callable,
    guide: Callable | None,
    *args,
    num_steps: int = 1000,
    num_chains: int = 16,
    num_leapfrog: int = 10,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    adapt_rate: float = 0.5,
    tuning_chains: int = 2,
    schedule: str = "sigmoid",
    start: str = "guide",
    data_plate: str = "data",
    max_pairs: int = 2**15,
    seed: int | None = None,
    progress: bool = False,
    on_block: Callable[[str], None] | None = None,
    **kwargs,
) -> AISResult:
    """Annealed importance sampling estimate of log p(x), per data point (Neal, 2001).

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide with the same latent sites, all continuous and local to the
        plate ``data_plate``; called as ``model(*args, **kwargs)``. Tensor arguments whose
        first axis has the data size are split into blocks along it. ``guide`` may be
        ``None`` with ``start="prior"``. Scales and subsampled plates are treated as by
        :func:`pyrovae.evaluation.importance.evaluate` or refused (module docstring).
    num_steps : int
        T, annealing steps (T - 1 HMC transitions); T = 1 is importance sampling from r.
    num_chains : int
        C, independent chains (weights) per data point.
    num_leapfrog : int
        Leapfrog steps per HMC transition (each one gradient evaluation).
    step_size : float
        Initial leapfrog step size, in units of the unconstrained latent space.
    target_accept : float
        Acceptance probability the step-size adaptation aims for.
    adapt_step_size : bool
        Adapt the step size of each data point during the run (see the module docstring:
        transition t uses only the acceptance of transitions < t).
    adapt_rate : float
        Gain of the multiplicative update log eps += adapt_rate (accept - target_accept).
    tuning_chains : int
        Extra chains per data point that drive the adaptation and whose weights are
        discarded, so the estimate stays unbiased in p(x); 0 adapts from the estimating
        chains themselves (slightly biased; Wu et al., 2017).
    schedule : {"sigmoid", "linear"}
        Spacing of the inverse temperatures (:func:`annealing_schedule`).
    start : {"guide", "prior"}
        Starting density r(z): the guide q(z|x) or the model's prior p(z).
    data_plate : str
        Name of the plate over data points.
    max_pairs : int
        Most (chain, data point) pairs in one vectorized pass (tuning chains included);
        peak memory is proportional to it (one forward and backward pass of the model and
        guide per pair).
    seed : int, optional
        Seeds Pyro's RNGs; each block of data points draws from a seed derived from it and
        the block's index.
    progress : bool
        Show a progress bar over data points (with its estimated time left).
    on_block : callable, optional
        Called after every block of data points with one line: the block, the points done,
        its seconds and an estimate of the time left (the CLI prints it under ``-v``).

    Returns
    -------
    AISResult
        ``log_px`` in nats per data point (float64), a stochastic lower bound on log p(x)
        (E[log_px] <= log p(x)), with ``log_px_se`` and HMC diagnostics.
    """
    hmc = HMCSettings(
        num_leapfrog, step_size, target_accept, adapt_rate, tuning_chains, adapt_step_size
    )
    options = dict(
        num_steps=num_steps,
        num_chains=num_chains,
        hmc=hmc,
        schedule=schedule,
        start=start,
        data_plate=data_plate,
        max_pairs=max_pairs,
    )
    plan = _make_plan(model, guide, args, kwargs, options)

    def run_block(target: AnnealingTarget, offset: int) -> dict:
        run = anneal_forward(target, plan.betas, num_chains, hmc)
        _check_weights(run.log_weights, offset)
        log_px, se, ess = _estimate(run.log_weights)
        return {
            "log_px": log_px,
            "log_px_se": se,
            "ess": ess,
            "acceptance": run.acceptance.numpy(),
            "step_size": run.final_step_size.numpy(),
        }

    columns = _run_blocks(plan, args, kwargs, seed, progress, "AIS", run_block, on_block)
    return AISResult(columns, num_steps, num_chains, plan.settings(schedule))


# ------------------------------------------------------------------- bidirectional Monte Carlo


def simulate_data(
    model: Callable, num_points: int, data_plate: str = "data"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Simulate (x, z*) with z* ~ p(z), x ~ p(x | z*): z* is an exact draw of p(z | x).

    The model must generate when called as ``model(None, num_samples=num_points)`` and
    return x (the convention of :class:`pyrovae.VAE`'s model and of
    :class:`pyrovae.models.linear_gaussian.LinearGaussianModel`); its latent sites are those
    left unobserved when it is then called as ``model(x)``.

    Returns
    -------
    (torch.Tensor, dict of str to torch.Tensor)
        x with one row per data point, and z* per latent site, laid out as the model's trace.
    """
    _check_positive_int("num_points", num_points)
    with torch.no_grad(), poutine.block():
        simulated = poutine.trace(model).get_trace(None, num_samples=num_points)
        x = simulated.nodes["_RETURN"]["value"]
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != num_points:
            raise ValueError(
                "model(None, num_samples=n) must return the simulated data (n rows); "
                "simulate it yourself and pass bdmc(model, guide, *inputs, posterior_sample=...)"
            )
        scored = poutine.trace(model).get_trace(x)
    latent = [n for n, s in _sample_sites(scored).items() if not s["is_observed"]]
    return x, {name: simulated.nodes[name]["value"] for name in latent}


def _check_unscaled(target: AnnealingTarget) -> None:
    if target.scaled_sites:
        scales = ", ".join(f"{name!r}: {w:g}" for name, w in target.scaled_sites.items())
        raise ValueError(
            f"observed site(s) in subsampled plates (log densities scaled by {scales}): the "
            "exact draws z* are posterior draws given all the data, not draws of the scaled "
            "target AIS anneals to, so BDMC's upper bound would not hold; use plates without "
            "subsample_size"
        )


@evaluates("model", "guide")
def bdmc(
    model: Callable,
    guide: Callable | None,
    *args,
    num_points: int | None = None,
    posterior_sample: dict[str, torch.Tensor] | None = None,
    num_steps: int = 1000,
    num_chains: int = 16,
    num_leapfrog: int = 10,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    adapt_rate: float = 0.5,
    tuning_chains: int = 2,
    schedule: str = "sigmoid",
    start: str = "guide",
    data_plate: str = "data",
    max_pairs: int = 2**15,
    seed: int | None = None,
    progress: bool = False,
    on_block: Callable[[str], None] | None = None,
    **kwargs,
) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al., 2015; Wu et al., 2017): a stochastic
    sandwich lower <= log p(x) <= upper (in expectation) on data simulated from the model.

    Either give ``num_points`` (the data are simulated here by :func:`simulate_data`), or
    the model inputs ``*args`` with ``posterior_sample``, one exact posterior draw z* per data
    point and latent site, laid out as the model's trace lays it out (e.g. (N, L) for a site
    of event shape (L,) in the data plate), such as x ~ p(x|z*), z* ~ p(z).

    Forward AIS (as :func:`ais`) gives ``lower``; reverse AIS from z*, with the forward run's
    step sizes and schedule reversed, gives ``upper``. The expected ``width`` upper - lower
    bounds the bias of forward AIS on such data, E[upper] - E[lower] >= log p(x) - E[lower]
    (one run's width is noisy and bounds nothing by itself): increase ``num_steps`` until
    its mean over data points is small enough. All other parameters are those of
    :func:`ais`; ``num_chains`` chains run in each direction (the reverse chains all start
    from z*). Models with subsampled inner plates are refused (see the module docstring).

    Returns
    -------
    BDMCResult
        Per data point ``lower``, ``upper``, ``width`` (nats), standard errors and HMC
        diagnostics, with the inputs and z* used.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    if num_points is not None:
        if args or posterior_sample is not None:
            raise ValueError("pass either num_points (simulate) or inputs with posterior_sample")
        x, posterior_sample = simulate_data(model, num_points, data_plate)
        args = (x,)
    elif posterior_sample is None or not args:
        raise ValueError("pass num_points, or the model inputs and posterior_sample (z*)")
    hmc = HMCSettings(
        num_leapfrog, step_size, target_accept, adapt_rate, tuning_chains, adapt_step_size
    )
    options = dict(
        num_steps=num_steps,
        num_chains=num_chains,
        hmc=hmc,
        schedule=schedule,
        start=start,
        data_plate=data_plate,
        max_pairs=max_pairs,
    )
    plan = _make_plan(model, guide, args, kwargs, options)

    def run_block(target: AnnealingTarget, offset: int) -> dict:
        _check_unscaled(target)
        forward = anneal_forward(target, plan.betas, num_chains, hmc)
        exact = target.expand_sample(posterior_sample, num_chains, offset)
        reverse, reverse_accept = anneal_reverse(
            target, plan.betas, exact, forward.step_sizes, num_leapfrog
        )
        for weights in (forward.log_weights, reverse):
            _check_weights(weights, offset)
        lower, lower_se, _ = _estimate(forward.log_weights)
        inverse, upper_se, _ = _estimate(reverse)
        return {
            "lower": lower,
            "lower_se": lower_se,
            "upper": -inverse,
            "upper_se": upper_se,
            "width": -inverse - lower,
            "acceptance_forward": forward.acceptance.numpy(),
            "acceptance_reverse": reverse_accept.numpy(),
            "step_size": forward.final_step_size.numpy(),
        }

    seed_for_blocks = None if seed is None else derived_seed(seed, 1)
    columns = _run_blocks(
        plan, args, kwargs, seed_for_blocks, progress, "BDMC", run_block, on_block
    )
    return BDMCResult(
        columns, num_steps, num_chains, plan.settings(schedule), tuple(args), posterior_sample
    )
