"""Importance-sampled evaluation of any Pyro model and guide, per data point.

:func:`evaluate` draws K samples z_k ~ q(z | x_n) for every data point, streams over the
data in chunks whose (draw, data point) pairs stay under a budget, and reduces each chunk
at once to per-datapoint estimates, so that memory does not grow with N:

* ``log_px``: log p_hat(x) = logsumexp_k(log w_k) - log K, with ``log_px_se`` (Monte Carlo
  standard error), ``ess`` (Kish effective sample size) and ``khat`` (Pareto k-hat, PSIS;
  -inf when all K weights are equal, e.g. an exact posterior);
* ``elbo``: the ELBO with Monte Carlo KL; ``elbo_analytic``: with closed-form KL where the
  guide and prior allow it (else the Monte Carlo term for that site);
* ``iwae_<k>``: IWAE_k from disjoint groups of k of the same K draws;
* ``gap``: log p_hat(x) - ELBO, an estimate of KL(q(z|x) || p(z|x)) (slightly low, by the
  bias of log p_hat).

All in nats per data point; higher bounds are better.

The draws of each block of data points (one chunk) come from a seed derived from the
evaluation's seed and the block's index, so the results do not depend on how the blocks are
spread over processes: under :mod:`torch.distributed` with several ranks, each rank
evaluates a contiguous run of blocks and the per-datapoint results, gathered on every rank,
equal those of one process.

Memory: a pass traces at most ``max_pairs`` (draw, data point) pairs, and fewer when a bytes
budget (``memory_budget``, by default :data:`DEFAULT_MEMORY_BUDGET` for the device, at most
half of the memory available) would be exceeded: the bytes of one pair are measured once per
evaluation by counting every tensor the traced model and guide allocate for one data point
(:func:`pyrovae.evaluation.memory.bytes_per_pair`). The latent diagnostics obey the same
number of pairs.

Precision: where a float32 model's log weights are so large that float32 rounding (spacing
``eps * |log w|``) is not small against their spread over the K draws, the block is computed again
from a float64 copy of the model and guide (``result.float64_points`` marks them); where
even float64 cannot resolve them, evaluation stops with an error instead of reporting
rounded-away weights as equal (ESS = K, k-hat = -inf, gap 0).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.distributed import active_context
from pyrovae.evaluation.arviz_compat import pareto_khat, to_arviz
from pyrovae.evaluation.bounds import elbo, importance_estimate, iwae_bound
from pyrovae.evaluation.data_arguments import _cuda_devices
from pyrovae.evaluation.latents import LatentUse, latent_use
from pyrovae.evaluation.memory import (
    evaluation_pairs,
)
from pyrovae.evaluation.structure import check_structure
from pyrovae.evaluation.traces import (
    _batched_length,
    _slice_arguments,
    check_data_kwargs,
    chunk_bounds,
    particle_terms,
)
from pyrovae.models.modes import evaluates
from pyrovae.randomness import derived_seed
from pyrovae.validation import check_data_tensors, sampling_options

KHAT_THRESHOLD = 0.7
"""Pareto k-hat above which even a Pareto-*smoothed* estimate is unreliable (Vehtari et al.);
pyrovae's ``log_px`` is plain importance sampling, whose standard error already fails above
:data:`KHAT_INFINITE_VARIANCE` (0.5)."""

CONSTANT_WEIGHT_SPREAD = 1e-6
"""Log weights of one data point spread less than this (nats) count as equal: no tail."""

KHAT_INFINITE_VARIANCE = 0.5
"""Pareto k-hat above which the importance weights have infinite variance (plain IS)."""

MIN_SAMPLES_FOR_KHAT = 100
"""Fewer draws than this leave too few tail draws for a reliable Pareto k-hat."""

ROUNDING_TOLERANCE = 1e-3
"""Rounding error (nats) of the log weights accepted whatever their spread."""

ROUNDING_SHARE = 0.01
"""Rounding error accepted as a share of the spread (max - min) of a point's log weights."""

AIS_COMMAND = (
    "pyrovae evaluate --model MODEL --method ais (a built-in VAE file), or "
    "pyrovae.evaluation.ais.ais(model, guide, *data) from Python (any model)"
)


def summary_rows(per_datapoint: dict, names) -> list[dict]:
    """Rows (quantity, mean, standard error of the mean over data points) of the named
    per-datapoint columns; the SE is NaN for a single point."""
    rows = []
    for name in names:
        values = np.asarray(per_datapoint[name], dtype=np.float64)
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
        rows.append({"quantity": name, "mean": float(values.mean()), "se": float(se)})
    return rows


def per_datapoint_csv_writer(per_datapoint: dict):
    """``write(handle)`` writing per-datapoint columns as CSV, one row per data point (index
    first), for :func:`pyrovae.outputs.write_file`."""
    names = list(per_datapoint)

    def write(handle) -> None:
        writer = csv.writer(handle)
        writer.writerow(["data_point", *names])
        for index, row in enumerate(zip(*(per_datapoint[n] for n in names), strict=True)):
            writer.writerow([index, *(f"{value:.6f}" for value in row)])

    return write


def write_per_datapoint_csv(per_datapoint: dict, path: str | Path) -> Path:
    """Write per-datapoint columns to ``path``, one row per data point (index first),
    atomically and never over a file of another kind (:func:`pyrovae.outputs.write_file`)."""
    from pyrovae.outputs import write_file

    return write_file(path, per_datapoint_csv_writer(per_datapoint), "csv").path


@dataclass
class EvaluationResult:
    """Per-datapoint bounds and diagnostics, with summaries and exports.

    Attributes
    ----------
    per_datapoint : dict of str to numpy.ndarray
        Columns of length N (see the module docstring for their meaning).
    num_samples : int
        K, the draws per data point.
    ks : tuple of int
        The k of the ``iwae_<k>`` columns.
    latent : dict of str to LatentUse
        Latent-use diagnostics per latent site (empty when not computed).
    dropped_ks : tuple of int
        Requested k larger than K, whose IWAE_k was not computed (stated by :meth:`table`).
    data_fingerprint : str or None
        :func:`data_fingerprint` of the evaluated data, so that results can be paired
        (:func:`pyrovae.evaluation.comparison.compare`) only on the same points.
    pairs_per_pass : int or None
        (draw, data point) pairs traced at once: the blocks hold ``pairs_per_pass // K``
        points; pass it as ``max_pairs`` to reproduce the draws elsewhere.
    float64_points : numpy.ndarray of bool or None
        Per data point: computed from a float64 copy of the model and guide because float32
        rounding could not resolve the spread of the log weights in its block.
    """

    per_datapoint: dict[str, np.ndarray]
    num_samples: int
    ks: tuple[int, ...]
    latent: dict[str, LatentUse] = field(default_factory=dict)
    dropped_ks: tuple[int, ...] = ()
    data_fingerprint: str | None = None
    pairs_per_pass: int | None = None
    float64_points: np.ndarray | None = None

    BOUNDS = ("elbo", "elbo_analytic")

    @property
    def num_points(self) -> int:
        return len(self.per_datapoint["log_px"])

    @property
    def share_high_khat(self) -> float:
        """Fraction of data points whose Pareto k-hat exceeds 0.7."""
        return float(np.mean(self.per_datapoint["khat"] > KHAT_THRESHOLD))

    def bound_names(self) -> list[str]:
        return [*self.BOUNDS, *(f"iwae_{k}" for k in self.ks), "log_px", "gap"]

    def summary(self) -> list[dict]:
        """Rows (name, mean, standard error over data points) for each bound and the gap."""
        return summary_rows(self.per_datapoint, self.bound_names())

    def table(self) -> str:
        """The summary as aligned text, with the diagnostics below it."""
        lines = [
            f"{'quantity':<16}{'mean':>12}{'se':>10}   (nats per data point, N={self.num_points}, "
            f"K={self.num_samples})"
        ]
        lines += [f"{r['quantity']:<16}{r['mean']:>12.3f}{r['se']:>10.3f}" for r in self.summary()]
        lines.append(
            f"mean MC standard error of log_px: {self.per_datapoint['log_px_se'].mean():.4f}"
        )
        lines.append(
            f"median effective sample size: {np.median(self.per_datapoint['ess']):.1f} of "
            f"{self.num_samples}"
        )
        lines.append(
            f"share of data points with k-hat > {KHAT_THRESHOLD}: {self.share_high_khat:.3f}"
        )
        for site, use in self.latent.items():
            lines.append(
                f"latent site {site!r}: {use.active_units} active units of "
                f"{len(use.mean_variance)}, mutual information {use.mutual_information:.3f} nats"
            )
        lines += [f"note: {note}" for note in self.notes()]
        return "\n".join(lines)

    def notes(self) -> list[str]:
        """Plain-language warnings about the reliability of these numbers (may be empty)."""
        notes = [_khat_note(self.per_datapoint["khat"])]
        if self.num_samples < MIN_SAMPLES_FOR_KHAT:
            notes.append(
                f"K = {self.num_samples} draws are too few for a reliable Pareto k-hat (the "
                f"tail fit needs K >= {MIN_SAMPLES_FOR_KHAT}; use 1000 or more)"
            )
        if self.dropped_ks:
            dropped = ", ".join(map(str, self.dropped_ks))
            notes.append(
                f"IWAE_k for k = {dropped} not computed: k must be at most K = "
                f"{self.num_samples} (raise the number of draws to get it)"
            )
        recomputed = 0 if self.float64_points is None else int(self.float64_points.sum())
        if recomputed:
            notes.append(
                f"{recomputed} of {self.num_points} data points were recomputed from a float64 "
                "copy of the model and guide: float32 rounding of their log weights (or of "
                "others in their block) was not small against the spread of the weights"
            )
        return [note for note in notes if note]

    def to_dict(self) -> dict:
        """Plain Python containers (lists and numbers), e.g. for JSON."""
        return {
            "num_samples": self.num_samples,
            "ks": list(self.ks),
            "per_datapoint": {name: values.tolist() for name, values in self.per_datapoint.items()},
            "summary": self.summary(),
            "share_high_khat": self.share_high_khat,
            "notes": self.notes(),
            "dropped_ks": list(self.dropped_ks),
            "data_fingerprint": self.data_fingerprint,
            "pairs_per_pass": self.pairs_per_pass,
            "float64_points": (
                None if self.float64_points is None else self.float64_points.tolist()
            ),
            "latent": {
                site: {
                    "kl_per_dim": None if use.kl_per_dim is None else use.kl_per_dim.tolist(),
                    "mean_variance": use.mean_variance.tolist(),
                    "active_units": use.active_units,
                    "mutual_information": use.mutual_information,
                }
                for site, use in self.latent.items()
            },
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write the per-datapoint columns, one row per data point."""
        return write_per_datapoint_csv(self.per_datapoint, path)

    def to_dataframe(self):
        """The per-datapoint columns as a :class:`pandas.DataFrame`, one row per data point
        (nats per data point; needs pandas, which pyrovae does not require)."""
        return per_datapoint_frame(self.per_datapoint)

    def to_arviz(self):
        """Export to ArviZ (InferenceData in 0.x, DataTree in 1.x), group ``"evaluation"``,
        with dimension ``data_point`` (and ``latent_dim`` for per-dimension diagnostics)."""
        import xarray

        variables = {name: ("data_point", values) for name, values in self.per_datapoint.items()}
        for site, use in self.latent.items():
            variables[f"{site}_mean_variance"] = (f"{site}_dim", use.mean_variance)
            if use.kl_per_dim is not None:
                variables[f"{site}_kl_per_dim"] = (f"{site}_dim", use.kl_per_dim)
        attrs = {"num_samples": self.num_samples, "ks": list(self.ks), "units": "nats"}
        return to_arviz(xarray.Dataset(variables, attrs=attrs))


def _khat_note(khat: np.ndarray) -> str:
    """A plain-language statement about high k-hat values, or '' when there are none."""
    high, finite_variance = khat > KHAT_THRESHOLD, khat > KHAT_INFINITE_VARIANCE
    if not finite_variance.any():
        return ""
    count = len(khat)
    above = (
        f"k-hat > {KHAT_THRESHOLD} for {high.mean():.1%} of the data points "
        f"({int(high.sum())} of {count}): their log p_hat(x) is unreliable and may lie far "
        "below log p(x). "
        if high.any()
        else ""
    )
    return (
        f"{above}k-hat > {KHAT_INFINITE_VARIANCE} for {finite_variance.mean():.1%} "
        f"({int(finite_variance.sum())} of {count}): for plain importance sampling that "
        "already means the weights have infinite variance, so the standard error of "
        f"log p_hat(x) is unreliable. Use annealed importance sampling: {AIS_COMMAND}"
    )


def _check_ks(
    ks: Sequence[int], num_samples: int, drop_large: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kept, dropped) group sizes; k > K are dropped with ``drop_large``, else refused."""
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"each k must be an integer in [1, K={num_samples}], got {k!r}")
        if k > num_samples and not drop_large:
            raise ValueError(f"each k must be an integer in [1, K={num_samples}], got {k!r}")
    return tuple(k for k in ks if k <= num_samples), tuple(k for k in ks if k > num_samples)


def _check_finite_weights(log_weights, offset: int) -> None:
    bad = torch.isnan(log_weights).any(0)
    if bool(bad.any()):
        index = offset + int(bad.nonzero()[0])
        raise ValueError(f"NaN log importance weight for data point {index}")


def _khat(log_weights) -> np.ndarray:
    """Pareto k-hat per data point; -inf where all K weights are equal (to 1e-6 nats): then
    the weights have no tail and log p_hat(x) is exact."""
    weights = log_weights.T.double().cpu().numpy()
    constant = (weights.max(1) - weights.min(1)) < CONSTANT_WEIGHT_SPREAD
    khat = np.full(weights.shape[0], -np.inf)
    if not constant.all():
        khat[~constant] = pareto_khat(weights[~constant])
    return khat


def rounding_error(terms) -> torch.Tensor:
    """Rounding error of each data point's log weights, in nats, shape (N,): the spacing
    ``eps * max_k(|log p(x|z_k)| + |log p(z_k)| + |log q(z_k|x)|)`` of the terms' dtype (a lower
    bound: rounding inside the model can only add to it)."""
    magnitude = terms.log_p_obs.abs() + terms.log_p_latent.abs() + terms.log_q.abs()
    eps = torch.finfo(terms.log_p_obs.dtype).eps
    return eps * magnitude.double().max(0).values


def unresolved_points(terms) -> torch.Tensor:
    """Mask (N,) of data points whose log weights rounding cannot resolve: the rounding
    error exceeds both :data:`ROUNDING_TOLERANCE` nats and :data:`ROUNDING_SHARE` of the
    spread (max - min over the K draws). Weights equal only through rounding fall here."""
    log_weights = terms.log_weights.double()
    spread = log_weights.max(0).values - log_weights.min(0).values
    allowed = torch.clamp(ROUNDING_SHARE * spread, min=ROUNDING_TOLERANCE)
    return rounding_error(terms) > allowed


def _rounding_message(terms, mask: torch.Tensor, offset: int) -> str:
    index = int(mask.nonzero()[0])
    log_weights = terms.log_weights[:, index].double()
    spread = float(log_weights.max() - log_weights.min())
    return (
        f"the {terms.log_p_obs.dtype} log importance weights of data point {offset + index} "
        f"(and {int(mask.sum()) - 1} more in its block) are about "
        f"{float(log_weights.abs().max()):.3g} nats, where rounding alone is "
        f"{float(rounding_error(terms)[index]):.3g} nats against a spread of {spread:.3g} nats "
        "between the draws: ESS, k-hat, the gap and the standard error would be artefacts of "
        "rounding (equal weights look like a perfect proposal)"
    )


def _reduce_chunk(
    terms, ks: tuple[int, ...], offset: int, float64: bool = False
) -> dict[str, np.ndarray]:
    """Per-datapoint columns of one block; ``float64`` marks a block recomputed in float64."""
    log_weights = terms.log_weights
    _check_finite_weights(log_weights, offset)
    log_px, log_px_se, ess = importance_estimate(log_weights)
    columns = {
        "log_px": log_px,
        "log_px_se": log_px_se,
        "ess": ess,
        "elbo": elbo(log_weights),
        "elbo_analytic": (terms.log_p_obs - terms.kl).double().mean(0),
        **{f"iwae_{k}": iwae_bound(log_weights, k) for k in ks},
    }
    columns = {name: values.cpu().numpy() for name, values in columns.items()}
    columns["khat"] = _khat(log_weights)
    columns["gap"] = columns["log_px"] - columns["elbo"]
    columns["float64"] = np.full(log_weights.shape[1], float(float64))
    return columns


@evaluates("model", "guide")
def evaluate(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    ks: Sequence[int] = (1, 5, 50),
    data_plate: str = "data",
    max_pairs: int = 2**20,
    seed: int | None = None,
    latent_diagnostics: bool = True,
    progress: bool = False,
    memory_budget: int | None = None,
    drop_large_ks: bool = False,
    float64_fallback: bool = True,
    data_kwargs: Sequence[str] | None = None,
    **kwargs,
) -> EvaluationResult:
    """Importance-sampled bounds on log p(x), per data point, for a Pyro model and guide.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide with the same latent sites, all local to the plate
        ``data_plate``; called as ``model(*args, **kwargs)``. The positional arguments are
        the per-datapoint data: each positional tensor has one row per data point and is
        split into chunks along its first axis. Keyword arguments are passed whole unless
        named in ``data_kwargs``.
    num_samples : int
        K, draws z_k ~ q(z | x_n) per data point (5000 for published test log-likelihoods).
    ks : sequence of int
        Group sizes k of the IWAE_k bounds, each at most K (see ``drop_large_ks``).
    data_plate : str
        Name of the plate over data points.
    max_pairs : int
        Most (draw, data point) pairs traced at once; fewer when ``memory_budget`` requires
        it (the number used is ``result.pairs_per_pass``). Peak memory is proportional to it.
    seed : int, optional
        Seed Pyro's RNGs first, for reproducible draws; the draws of each block of
        ``pairs_per_pass // num_samples`` data points are seeded from it and the block's
        index. Without it, the block seeds derive from one number drawn from torch's RNG (on
        rank 0, under data parallelism).
    latent_diagnostics : bool
        Also compute :func:`pyrovae.evaluation.latents.latent_use` (within the same pairs).
    progress : bool
        Show a progress bar over data points.
    memory_budget : int, optional
        Bytes one pass may allocate; by default
        :func:`~pyrovae.evaluation.memory.default_memory_budget` of the data's device.
        Divided by :func:`~pyrovae.evaluation.memory.bytes_per_pair` it caps the pairs per
        pass.
    drop_large_ks : bool
        Leave out (instead of refusing) k larger than K; ``result.dropped_ks`` and the table
        say so.
    float64_fallback : bool
        Recompute a block from a float64 copy of the model and guide when float32 rounding
        cannot resolve its log weights (see :func:`unresolved_points`); with ``False``, or
        where float64 fails too, raise ``ValueError`` instead.
    data_kwargs : sequence of str, optional
        Keyword arguments that hold per-datapoint data, chunked with the positional data.
        Omitted: a keyword tensor with one row per data point is refused as ambiguous (it
        may be a parameter that happens to have N rows: pass ``data_kwargs=()`` to keep it
        whole). See :mod:`pyrovae.evaluation.traces`.

    Returns
    -------
    EvaluationResult
    """
    checked = sampling_options(dict(num_samples=num_samples, max_pairs=max_pairs, seed=seed))
    num_samples, max_pairs, seed = (checked[k] for k in ("num_samples", "max_pairs", "seed"))
    ks, dropped_ks = _check_ks(ks, num_samples, drop_large_ks)
    data_kwargs = check_data_kwargs(args, kwargs, data_kwargs)
    length = _batched_length(args, kwargs, data_kwargs)
    check_data_tensors(per_point_tensors(args, kwargs, length, data_kwargs))
    if seed is not None:  # every check above comes before any random state changes
        pyro.set_rng_seed(seed)
    parallel = active_context()
    base_seed = _base_seed(seed, parallel)
    probe_args, probe_kwargs = _slice_arguments(args, kwargs, length, slice(0, 1), data_kwargs)
    structure = check_structure(
        model, guide, *args, data_plate=data_plate, data_kwargs=data_kwargs, probe_rows=1, **kwargs
    )
    structure.require_common_scale("importance-sampled evaluation")
    structure.warn_if_sequential(num_samples)
    nesting, vectorized = structure.max_plate_nesting, structure.vectorized
    pairs = evaluation_pairs(
        model, guide, probe_args, probe_kwargs, nesting, data_plate, max_pairs, memory_budget
    )
    pairs = pairs if parallel is None else parallel.broadcast_object(pairs)
    blocks = list(chunk_bounds(length, max(1, pairs // num_samples)))
    rerun = _Float64Rerun(model, guide, num_samples, data_plate, pairs, nesting, float64_fallback)
    rerun.options.update(data_kwargs=data_kwargs, vectorized=vectorized)
    mine = (
        range(len(blocks)) if parallel is None else range(len(blocks))[parallel.shard(len(blocks))]
    )
    devices = _cuda_devices(args, kwargs)
    columns: dict[str, list[np.ndarray]] = {}
    total = sum(blocks[b][1] - blocks[b][0] for b in mine)
    with tqdm(total=total, disable=not progress, desc="evaluating", unit="pt") as bar:
        for block in mine:
            start, stop = blocks[block]
            chunk_args, chunk_kwargs = _slice_arguments(
                args, kwargs, length, slice(start, stop), data_kwargs
            )
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derived_seed(base_seed, block))
                terms = particle_terms(
                    model,
                    guide,
                    *chunk_args,
                    num_particles=num_samples,
                    data_plate=data_plate,
                    max_pairs=pairs,
                    max_plate_nesting=nesting,
                    data_kwargs=data_kwargs,
                    vectorized=vectorized,
                    **chunk_kwargs,
                )
            seeded = _seeded(devices, derived_seed(base_seed, block))
            reduced = _reduce_block(terms, ks, start, rerun, seeded, chunk_args, chunk_kwargs)
            for name, values in reduced.items():
                columns.setdefault(name, []).append(values)
            bar.update(stop - start)
    if parallel is not None:
        columns = _gather_columns(columns, parallel)
    per_datapoint = {name: np.concatenate(parts) for name, parts in columns.items()}
    float64_points = per_datapoint.pop("float64") > 0
    latent = (
        latent_use(model, guide, *args, max_pairs=pairs, data_kwargs=data_kwargs, **kwargs)
        if latent_diagnostics
        else {}
    )
    fingerprint = data_fingerprint(*per_point_tensors(args, kwargs, length, data_kwargs))
    return EvaluationResult(
        per_datapoint, num_samples, ks, latent, dropped_ks, fingerprint, pairs, float64_points
    )


def _base_seed(seed: int | None, parallel) -> int:
    """The seed the blocks' seeds derive from: ``seed``, or a number drawn from torch's RNG
    (rank 0's under data parallelism)."""
    if seed is not None:
        return seed
    drawn = int(torch.randint(0, 2**62, ()))
    return drawn if parallel is None else parallel.broadcast_object(drawn)


def _gather_columns(columns: dict[str, list[np.ndarray]], parallel) -> dict[str, list]:
    """Every rank's columns, concatenated in rank order (ranks hold consecutive blocks)."""
    gathered: dict[str, list[np.ndarray]] = {}
    for part in parallel.gather(columns):
        for name, values in part.items():
            gathered.setdefault(name, []).extend(values)
    return gathered


# --------------------------------------------------------------------------- precision


def _seeded(devices: list[int], seed: int):
    """A factory of contexts that run code on a private RNG stream seeded with ``seed``."""

    @contextlib.contextmanager
    def context():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return context


def _reduce_block(terms, ks, offset: int, rerun, seeded, chunk_args, chunk_kwargs) -> dict:
    """The block's columns; recomputed in float64 (same seed) where rounding hides the spread
    of its log weights, and an error where float64 cannot resolve them either."""
    mask = unresolved_points(terms)
    if not bool(mask.any()):
        return _reduce_chunk(terms, ks, offset)
    message = _rounding_message(terms, mask, offset)
    if terms.log_p_obs.dtype == torch.float64:
        raise ValueError(f"{message}; even float64 cannot resolve them: rescale the data")
    with seeded():
        precise = rerun(chunk_args, chunk_kwargs, message)
    mask = unresolved_points(precise)
    if bool(mask.any()):
        raise ValueError(
            f"{_rounding_message(precise, mask, offset)}; even float64 cannot resolve them: "
            "rescale the data"
        )
    return _reduce_chunk(precise, ks, offset, float64=True)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class _Float64Rerun:
    """Traces a block again with float64 copies of the model, guide and data (made once, on
    first use), within half the pairs per pass (float64 numbers take twice the bytes)."""

    def __init__(self, model, guide, num_samples, data_plate, pairs, nesting, enabled: bool):
        self.model, self.guide, self.enabled = model, guide, enabled
        self.options = {
            "num_particles": num_samples,
            "data_plate": data_plate,
            "max_pairs": max(1, pairs // 2),
            "max_plate_nesting": nesting,
        }
        self.copies = None

    def __call__(self, args: tuple, kwargs: dict, message: str):
        if not self.enabled:
            raise ValueError(
                f"{message}; evaluate a float64 model (model.double(), data.double()) or pass "
                "float64_fallback=True"
            )
        try:
            with _default_dtype(torch.float64):
                terms = self._terms(args, kwargs)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(
                f"{message}; recomputing them from a float64 copy of the model and guide failed "
                f"({error}); evaluate a float64 model (model.double(), data.double())"
            ) from error
        if terms.log_p_obs.dtype != torch.float64:
            raise ValueError(
                f"{message}; a float64 copy of the model still computes in "
                f"{terms.log_p_obs.dtype}: evaluate a float64 model"
            )
        return terms

    def _terms(self, args: tuple, kwargs: dict):
        if self.copies is None:
            self.copies = _float64_copies(self.model, self.guide)
        args64, kwargs64 = _float64_arguments(args, kwargs)
        model, guide = self.copies
        return particle_terms(model, guide, *args64, **self.options, **kwargs64)


def _float64_copies(model, guide) -> tuple:
    """Deep copies of model and guide (shared submodules stay shared), modules in float64."""
    model, guide = copy.deepcopy((model, guide))
    for program in (model, guide):
        if isinstance(program, torch.nn.Module):
            program.double()
    return model, guide


def _float64_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def convert(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.double()
        return value

    return tuple(map(convert, args)), {name: convert(v) for name, v in kwargs.items()}


# --------------------------------------------------------------------------- data identity


def per_point_tensors(
    args: tuple, kwargs: dict, length: int, data_kwargs: Sequence[str] = ()
) -> list[torch.Tensor]:
    """The per-datapoint tensors (first axis of length N): the positional ones, then the
    keyword ones named in ``data_kwargs`` (the data convention of evaluation's chunking)."""
    values = [*args, *(kwargs[name] for name in data_kwargs if name in kwargs)]
    return [
        v for v in values if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == length
    ]


def per_datapoint_frame(columns: dict):
    """Per-datapoint columns (equal lengths) as a :class:`pandas.DataFrame`, index
    ``data_point``; an ImportError says how to install pandas when it is missing."""
    try:
        import pandas
    except ImportError as error:
        raise ImportError("to_dataframe() needs pandas: pip install pandas") from error
    frame = pandas.DataFrame({name: np.asarray(values) for name, values in columns.items()})
    frame.index.name = "data_point"
    return frame


def data_fingerprint(*tensors) -> str:
    """A short hash of data tensors (shapes and values rounded to float32), to check that two
    results were computed on the same data points in the same order.

    Returns
    -------
    str
        16 hexadecimal digits (SHA-256 prefix).
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = torch.as_tensor(tensor).detach()
        digest.update(repr(tuple(tensor.shape)).encode())
        rows = tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)
        for start in range(0, rows.shape[0], 4096):  # bounded temporary copies
            block = rows[start : start + 4096].to("cpu", torch.float32).contiguous()
            digest.update(block.numpy().tobytes())
    return digest.hexdigest()[:16]
