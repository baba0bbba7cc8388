"""What evaluate, compare and gaps share: option checks, the points scored, the AIS
settings, and the sizes checked against the memory budget before any work."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pyrovae.cli.common import (
    CLIError,
    Output,
    check_device,
    check_out,
    data_inputs,
    dataset_of,
    labels_of,
    load_data,
    model_file,
    prepare_data,
)
from pyrovae.cli.parser import AIS_DEFAULT_POINTS, AIS_MAX_PAIRS
from pyrovae.distributed import active_context

MEMORY_FRACTION = 0.5
"""Share of the available memory that one AIS, BDMC or gaps setting may take."""
LONG_AIS_WORK = 10**7
"""(step x chain x point) count above which AIS is timed on a pilot and an estimate printed."""

_IS_ONLY = {"num_samples": "--num-samples", "ks": "--ks"}
_AIS_ONLY = {
    "ais_steps": "--ais-steps",
    "ais_chains": "--ais-chains",
    "bdmc": "--bdmc",
    "bdmc_points": "--bdmc-points",
}


def check_method_options(args: argparse.Namespace, explicit: set, is_only=_IS_ONLY) -> None:
    """Refuse options that the chosen --method would ignore."""
    if args.method == "ais":
        given = [flag for dest, flag in is_only.items() if dest in explicit]
        if given:
            raise CLIError(
                f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --method is "
                "(importance sampling); --method ais takes --ais-steps and --ais-chains"
            )
    else:
        given = [flag for dest, flag in _AIS_ONLY.items() if dest in explicit]
        if given:
            raise CLIError(
                f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --method ais; "
                "add --method ais, or drop them"
            )
    if "bdmc_points" in explicit and not getattr(args, "bdmc", False):
        raise CLIError("--bdmc-points applies with --bdmc; add --bdmc, or drop it")


def check_not_parallel(what: str) -> None:
    if active_context() is not None:
        raise CLIError(
            f"{what} does not run data-parallel; run it in one process (without torchrun)"
        )


def first_points(data: torch.Tensor, num_points: int | None, default: int | None):
    """The first ``num_points`` rows (``default`` when not given, all when both are None) and
    the count; an explicit --num-points beyond the split is refused."""
    total = data.shape[0]
    if num_points is None:
        num_points = total if default is None else min(default, total)
    elif num_points > total:
        raise CLIError(f"--num-points {num_points}: the split has only {total} data points")
    return num_points


def default_points(method: str) -> int | None:
    return AIS_DEFAULT_POINTS if method == "ais" else None


def split_line(split: str, name: str, used: int, total: int, described: str) -> str:
    points = f"the first {used} of {total} data points (--num-points)"
    if used == total:
        points = f"{total} data points"
    return f"{split} split of {name}: {points}, {described}"


def ais_options(args: argparse.Namespace, explicit: set) -> dict:
    options = dict(num_steps=args.ais_steps, num_chains=args.ais_chains, seed=args.seed)
    options["max_pairs"] = args.max_pairs if "max_pairs" in explicit else AIS_MAX_PAIRS
    return options


def ais_settings_line(args: argparse.Namespace) -> str:
    return (
        f"AIS: {args.ais_steps} annealing steps (--ais-steps), {args.ais_chains} chains per "
        "data point (--ais-chains), HMC transitions with 10 leapfrog steps, starting from the "
        "guide q(z|x); log_px is a stochastic lower bound on log p(x) (E[log_px] <= log p(x)), "
        "tighter as the steps grow"
    )


@dataclass
class Scored:
    """A saved model and the first ``used`` of ``total`` prepared points of a split."""

    vae: object
    path: Path
    name: str
    dataset: object
    data: torch.Tensor
    condition: torch.Tensor | None
    described: str
    total: int

    @property
    def inputs(self) -> tuple:
        return (self.data,) if self.condition is None else (self.data, self.condition)

    def split_line(self, split: str) -> str:
        return split_line(split, self.name, self.data.shape[0], self.total, self.described)


def load_scored(args, explicit: set, out: Output, default_points, is_only=None, kind="csv"):
    """Check the options and the --out file, load the model (on --device) and the first
    points of its split, as evaluate and gaps score them."""
    from pyrovae import VAE
    from pyrovae.training import resolve_device

    check_device(args.device)
    check_method_options(args, explicit, _IS_ONLY if is_only is None else is_only)
    model_path = model_file(args.model)
    if args.out is not None and out.main:
        check_out(args.out, kind, [model_path, *_data_of(args)])
    device, parallel = resolve_device(args.device), active_context()
    vae = VAE.load(model_path, device=device if parallel is None else parallel.device(device))
    return _scored(vae, model_path, args, default_points)


def _data_of(args) -> list:
    return data_inputs(args.dataset, args.data_dir) if args.dataset else []


def _scored(vae, model_path: Path, args, default_points) -> Scored:
    name = dataset_of(vae, args.dataset)
    dataset = load_data(name, args.data_dir)
    data, described = prepare_data(vae, dataset, args.split, args.binarize, args.seed)
    total = data.shape[0]
    used = first_points(data, args.num_points, default_points)
    condition = None
    if vae.config.condition_dim:
        condition = labels_of(dataset, args.split, vae.config.condition_dim)[:used]
    return Scored(vae, model_path, name, dataset, data[:used], condition, described, total)


# --------------------------------------------------------------------------- sizes


def available_memory() -> int | None:
    """Bytes of memory available on the CPU (Linux MemAvailable), or None where unknown."""
    from pyrovae.evaluation.memory import _available_memory

    return _available_memory(torch.device("cpu"))


def _pair_bytes(vae) -> int:
    """Bytes one (chain or draw, data point) pair takes in a pass: the data point, the
    network's activations and the latent state, in float64 with autograd's copies."""
    config = vae.config
    widths = sum(config.hidden_sizes) * 2 + config.num_features + 8 * config.latent_dim
    return 8 * 4 * widths


def check_sizes(args, explicit: set, vae, points: int, budget: int | None = None) -> None:
    """Refuse AIS, BDMC and gaps settings whose memory exceeds the budget (half the memory
    available), naming the option and the largest value that fits."""
    budget = budget if budget is not None else _budget()
    if budget is None:
        return
    per_pair = _pair_bytes(vae)
    fits = max(0, budget // per_pair)
    if getattr(args, "method", "is") == "ais":
        schedule = 8 * (args.ais_steps + 1)
        if schedule > budget:
            _too_big("--ais-steps", args.ais_steps, budget // 8 - 1, budget)
        if args.ais_chains > fits:
            _too_big("--ais-chains", args.ais_chains, fits, budget)
        pairs = ais_options(args, explicit)["max_pairs"]
        if min(pairs, args.ais_chains * points) > fits and "max_pairs" in explicit:
            _too_big("--max-pairs", pairs, fits, budget)
    if getattr(args, "bdmc", False):
        width = 8 * 4 * vae.config.num_features
        if args.bdmc_points * width > budget:
            _too_big("--bdmc-points", args.bdmc_points, budget // width, budget)
    if getattr(args, "steps", None) is not None and "max_pairs" in explicit:
        if args.max_pairs > fits:
            _too_big("--max-pairs", args.max_pairs, fits, budget)
    if hasattr(args, "num_samples") and args.method == "is" and args.num_samples > fits:
        _too_big("--num-samples", args.num_samples, fits, budget)


def _budget() -> int | None:
    available = available_memory()
    return None if available is None else int(available * MEMORY_FRACTION)


def _too_big(option: str, value: int, largest: int, budget: int) -> None:
    raise CLIError(
        f"{option} {value} needs more memory than the budget ({budget / 2**30:.1f} GiB, half "
        f"the memory available); the largest {option} that fits is {max(0, largest)}"
        + ("" if largest >= 1 else " (none: free memory or use a smaller model)")
    )


def estimate_ais_time(vae, inputs: tuple, args, explicit: set, out: Output, points: int):
    """For long AIS runs (more than :data:`LONG_AIS_WORK` step-chain-point units), time a
    pilot of a few steps on one point and print the estimated duration."""
    work = args.ais_steps * args.ais_chains * points
    if work <= LONG_AIS_WORK:
        return
    from pyrovae.evaluation.ais import ais

    pilot_steps = 10
    options = {**ais_options(args, explicit), "num_steps": pilot_steps}
    started = time.perf_counter()
    ais(vae.model, vae.guide, *vae.inputs(*(t[:1] for t in inputs)), **options)
    per_unit = (time.perf_counter() - started) / (pilot_steps * args.ais_chains)
    seconds = per_unit * work
    out.summary(
        f"AIS: about {_duration(seconds)} estimated ({args.ais_steps} steps x "
        f"{args.ais_chains} chains x {points} points, timed on a pilot of {pilot_steps} steps "
        "on one point); progress by data point on a terminal, --num-points or --ais-steps "
        "shortens it"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
