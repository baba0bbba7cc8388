"""Importance-sampled evaluation of any Pyro model and guide, per data point.

:func:`evaluate` draws K samples z_k ~ q(z | x_n) for every data point, streams over the
data in chunks whose (draw, data point) pairs stay under a budget, and reduces each chunk
at once to per-datapoint estimates, so that memory does not grow with N:

* ``log_px``: log p_hat(x) = logsumexp_k(w_k) - log K, with ``log_px_se`` (Monte Carlo
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
"""

from __future__ import annotations

import csv
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
from pyrovae.evaluation.latents import LatentUse, latent_use
from pyrovae.evaluation.traces import (
    _batched_length,
    _slice_arguments,
    chunk_bounds,
    guess_max_plate_nesting,
    particle_terms,
)
from pyrovae.randomness import derived_seed

KHAT_THRESHOLD = 0.7
"""Pareto k-hat above which an importance-sampled estimate is unreliable."""

CONSTANT_WEIGHT_SPREAD = 1e-6
"""Log weights of one data point spread less than this (nats) count as equal: no tail."""


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
    """

    per_datapoint: dict[str, np.ndarray]
    num_samples: int
    ks: tuple[int, ...]
    latent: dict[str, LatentUse] = field(default_factory=dict)

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
        rows = []
        for name in self.bound_names():
            values = self.per_datapoint[name]
            spread = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
            rows.append({"quantity": name, "mean": float(values.mean()), "se": float(spread)})
        return rows

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
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python containers (lists and numbers), e.g. for JSON."""
        return {
            "num_samples": self.num_samples,
            "ks": list(self.ks),
            "per_datapoint": {name: values.tolist() for name, values in self.per_datapoint.items()},
            "summary": self.summary(),
            "share_high_khat": self.share_high_khat,
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self.per_datapoint)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["data_point", *names])
            for index, row in enumerate(zip(*(self.per_datapoint[n] for n in names), strict=True)):
                writer.writerow([index, *(f"{value:.6f}" for value in row)])
        return path

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


def _check_ks(ks: Sequence[int], num_samples: int) -> tuple[int, ...]:
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_samples:
            raise ValueError(f"each k must be an integer in [1, K={num_samples}], got {k!r}")
    return ks


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


def _reduce_chunk(terms, ks: tuple[int, ...], offset: int) -> dict[str, np.ndarray]:
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
    return columns


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
    **kwargs,
) -> EvaluationResult:
    """Importance-sampled bounds on log p(x), per data point, for a Pyro model and guide.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide with the same latent sites, all local to the plate
        ``data_plate``; called as ``model(*args, **kwargs)``. Tensor arguments whose first
        axis has the data size are split into chunks along it.
    num_samples : int
        K, draws z_k ~ q(z | x_n) per data point (5000 for published test log-likelihoods).
    ks : sequence of int
        Group sizes k of the IWAE_k bounds, each at most K.
    data_plate : str
        Name of the plate over data points.
    max_pairs : int
        Most (draw, data point) pairs traced at once; peak memory is proportional to it.
    seed : int, optional
        Seed Pyro's RNGs first, for reproducible draws; the draws of each block of
        ``max_pairs // num_samples`` data points are seeded from it and the block's index.
        Without it, the block seeds derive from one number drawn from torch's RNG (on rank 0,
        under data parallelism).
    latent_diagnostics : bool
        Also compute :func:`pyrovae.evaluation.latents.latent_use`.
    progress : bool
        Show a progress bar over data points.

    Returns
    -------
    EvaluationResult
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples (K) must be a positive integer, got {num_samples!r}")
    ks = _check_ks(ks, num_samples)
    if seed is not None:
        pyro.set_rng_seed(seed)
    parallel = active_context()
    base_seed = _base_seed(seed, parallel)
    length = _batched_length(args, kwargs)
    probe_args, probe_kwargs = _slice_arguments(args, kwargs, length, slice(0, 1))
    nesting = guess_max_plate_nesting(model, guide, *probe_args, **probe_kwargs)
    blocks = list(chunk_bounds(length, max(1, max_pairs // num_samples)))
    mine = (
        range(len(blocks)) if parallel is None else range(len(blocks))[parallel.shard(len(blocks))]
    )
    devices = _cuda_devices(args, kwargs)
    columns: dict[str, list[np.ndarray]] = {}
    total = sum(blocks[b][1] - blocks[b][0] for b in mine)
    with tqdm(total=total, disable=not progress, desc="evaluating", unit="pt") as bar:
        for block in mine:
            start, stop = blocks[block]
            chunk_args, chunk_kwargs = _slice_arguments(args, kwargs, length, slice(start, stop))
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derived_seed(base_seed, block))
                terms = particle_terms(
                    model,
                    guide,
                    *chunk_args,
                    num_particles=num_samples,
                    data_plate=data_plate,
                    max_pairs=max_pairs,
                    max_plate_nesting=nesting,
                    **chunk_kwargs,
                )
            for name, values in _reduce_chunk(terms, ks, offset=start).items():
                columns.setdefault(name, []).append(values)
            bar.update(stop - start)
    if parallel is not None:
        columns = _gather_columns(columns, parallel)
    per_datapoint = {name: np.concatenate(parts) for name, parts in columns.items()}
    latent = latent_use(model, guide, *args, **kwargs) if latent_diagnostics else {}
    return EvaluationResult(per_datapoint, num_samples, ks, latent)


def _base_seed(seed: int | None, parallel) -> int:
    """The seed the blocks' seeds derive from: ``seed``, or a number drawn from torch's RNG
    (rank 0's under data parallelism)."""
    if seed is not None:
        return seed
    drawn = int(torch.randint(0, 2**62, ()))
    return drawn if parallel is None else parallel.broadcast_object(drawn)


def _cuda_devices(args: tuple, kwargs: dict) -> list[int]:
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _gather_columns(columns: dict[str, list[np.ndarray]], parallel) -> dict[str, list]:
    """Every rank's columns, concatenated in rank order (ranks hold consecutive blocks)."""
    gathered: dict[str, list[np.ndarray]] = {}
    for part in parallel.gather(columns):
        for name, values in part.items():
            gathered.setdefault(name, []).extend(values)
    return gathered
