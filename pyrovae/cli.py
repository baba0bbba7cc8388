"""Command line: ``pyrovae train``, ``evaluate``, ``compare``, ``gaps``, ``sample`` and ``plot``.

``evaluate`` estimates log p(x) per data point by importance sampling (``--method is``, with
ELBOs and IWAE bounds) or by annealed importance sampling (``--method ais``, with ``--bdmc``
to check the number of steps on simulated data); ``compare`` scores several models on the
same points and prints their paired differences; ``gaps`` splits the inference gap into
approximation and amortization gaps.

Every command checks its arguments, the files it reads (model, spec and data files) and the
place it writes before any training or evaluation starts, and turns every expected failure
into one line on stderr, ``error: ...``, naming the file or option and the fix, with exit
status 2 (an interrupt exits with 130). ``--help`` of each command lists every option with its
default.

Output: ``--quiet`` prints only errors and the final summary, the default adds one line per
epoch and notes such as how the data were prepared, ``--verbose`` also the resolved settings.
Progress bars are drawn only when stderr is a terminal. ``--threads N`` sets torch's
intra-op threads (``torch.set_num_threads``) for the command.

Runs are never overwritten silently: ``train`` refuses an ``--out`` that holds a model
unless ``--resume`` (continue it) or ``--force`` (replace it) is given, and holds a lock file
``OUT.lock`` beside the run directory while it trains, so that a second writer is refused
with the holder's process id (a lock left by a process that no longer runs is taken over).

Under ``torchrun`` with several processes, ``train`` and ``evaluate`` run data-parallel (see
:mod:`pyrovae.distributed`); only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from pyrovae.data import (
    BINARIZED_MNIST_NPZ,
    BINARIZED_MNIST_URL,
    DATASETS,
    MNIST_TEST_FILES,
    MNIST_TRAIN_FILES,
    MNIST_URL,
    SPLIT_NAMES,
    DataNotFoundError,
    binarize,
    load_dataset,
    resolve_data_dir,
    threshold,
)
from pyrovae.distributed import active_context, init_from_environment, shutdown
from pyrovae.evaluation.importance import write_per_datapoint_csv
from pyrovae.likelihoods import LIKELIHOODS, BernoulliLikelihood
from pyrovae.networks import ACTIVATIONS
from pyrovae.objectives import OBJECTIVES
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS

MODEL_FILE = "model.pt"
HISTORY_FILES = ("history.jsonl", "history.csv")
LOCK_SUFFIX = ".lock"
COMPILE_MODES = ("auto", "none", "graph", "inductor")
IMAGE_FORMATS = ("png", "pdf")
"""Formats ``sample`` and ``plot`` write; an ``--out`` ending in one of them asks for it."""
SAMPLE_DEFAULT_FORMATS = ("png",)
PLOT_DEFAULT_FORMATS = ("png", "pdf")
EVALUATION_BINARIZATION = ("auto", "threshold", "sample", "none")
METHODS = ("is", "ais")
"""Estimators of log p(x): importance sampling with the guide, annealed importance sampling."""
AIS_DEFAULT_STEPS = 200
"""Annealing steps of --method ais: a digits model's 100 points in well under a minute."""
AIS_DEFAULT_CHAINS = 16
AIS_DEFAULT_POINTS = 100
"""Data points --method ais takes without --num-points (the first of the split)."""
AIS_MAX_PAIRS = 2**15
"""Most (chain, data point) pairs of one AIS pass without --max-pairs."""
BDMC_DEFAULT_POINTS = 20
BDMC_WIDTH_LIMIT = 1.0
"""Mean BDMC sandwich width (nats) above which --ais-steps is reported as too few."""
GAPS_DEFAULT_POINTS = 100

QUIET, NORMAL, VERBOSE = 0, 1, 2
DESCRIPTION = (
    "Pyro VAEs fitted by SVI: train a model, evaluate its bounds on log p(x) (importance "
    "sampling or AIS), compare models on the same points, decompose inference gaps, draw "
    "samples and plot figures. Every command validates its arguments and files before it starts; "
    "expected failures print one line 'error: ...' and exit with status 2."
)


class CLIError(Exception):
    """An expected failure, reported as one line naming the file or option and the fix."""


# --------------------------------------------------------------------------- argument types


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


class _Arguments:
    """Adds options to one parser; every help text ends with the option's default.

    With ``track`` every default is ``argparse.SUPPRESS``, so that parsing tells which
    options were given on the command line (used to let a spec file or a resumed run's
    settings stand where the command line says nothing)."""

    def __init__(self, parser: argparse.ArgumentParser, track: bool):
        self.parser, self.track = parser, track

    def add(self, *flags, help: str, default=None, shown: str | None = None, **options):
        if options.get("action") in ("store_true", "store_false") and default is None:
            default = options["action"] == "store_false"
        if not options.get("required"):
            help = f"{help} (default: {shown if shown is not None else _shown(default)})"
        default = argparse.SUPPRESS if self.track else default
        return self.parser.add_argument(*flags, default=default, help=help, **options)

    def group(self, title: str) -> _Arguments:
        return _Arguments(self.parser.add_argument_group(title), self.track)


def _formatter(prog: str) -> argparse.HelpFormatter:
    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    return argparse.HelpFormatter(prog, max_help_position=30, width=width)


def _add_common(arguments: _Arguments) -> None:
    common = arguments.group("output and resources")
    common.add(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch intra-op threads for this command (torch.set_num_threads); on a busy "
        "machine 1 is often much faster",
        shown=f"torch's default, {torch.get_num_threads()} on this machine",
    )
    loudness = common.parser.add_mutually_exclusive_group()
    level = _Arguments(loudness, arguments.track)  # type: ignore[arg-type]
    level.add("-q", "--quiet", action="store_true", help="print only errors and the final summary")
    level.add(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the resolved settings; the default prints one line per epoch and "
        "notes (bars only on a terminal)",
    )


def _add_data(arguments: _Arguments, default_dataset: str | None) -> None:
    arguments.add(
        "--dataset",
        choices=sorted(DATASETS),
        default=default_dataset,
        help="dataset",
        shown=None if default_dataset else "the one the model was trained on",
    )
    arguments.add(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="directory of the data files (not needed for digits)",
        shown="$PYROVAE_DATA_DIR, else ~/.cache/pyrovae",
    )


def _add_device(arguments: _Arguments) -> None:
    arguments.add(
        "--device",
        default="auto",
        metavar="NAME",
        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'",
    )


def _vae_default(name: str):
    from pyrovae.config import VAEConfig

    return VAEConfig.__dataclass_fields__[name].default


def _train_default(name: str):
    from pyrovae.config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def _add_train(commands, track: bool) -> None:
    parser = commands.add_parser(
        "train",
        help="fit a VAE by SVI",
        description="Fit a VAE by stochastic variational inference and write OUT/model.pt "
        "(config, parameters, optimizer, history and resumable training state), "
        "OUT/history.jsonl and OUT/history.csv. ELBOs are in nats per data point (higher is "
        "better). With --resume, options not given keep the values the run was written with.",
        formatter_class=_formatter,
    )
    top = _Arguments(parser, track)
    data = top.group("data")
    _add_data(data, "digits")
    data.add(
        "--binarize",
        choices=("auto", "none", "static", "dynamic"),
        default="auto",
        help="grey levels to 0/1 values: 'dynamic' (a fresh Bernoulli draw of every minibatch), "
        "'static' (threshold at 0.5 once) or 'none'; 'auto' is 'dynamic' for grey levels under "
        "a Bernoulli likelihood, else 'none'",
    )
    data.add(
        "--condition",
        choices=("none", "labels"),
        default="none",
        help="'labels': a conditional VAE p(x|z,y) q(z|x,y) given the one-hot class labels",
    )

    model = top.group("model (VAEConfig; --spec FILE reads them from a file)")
    model.add(
        "--spec",
        type=Path,
        metavar="FILE",
        help="model specification (.json, .toml, .yaml or .yml; VAEConfig fields, see "
        "pyrovae.spec); options given on the command line override it",
    )
    model.add(
        "--likelihood",
        choices=sorted(LIKELIHOODS),
        default=_vae_default("likelihood"),
        help="observation model p(x|z)",
    )
    model.add(
        "--latent-dim",
        type=int,
        default=_vae_default("latent_dim"),
        metavar="L",
        help="dimensions of the latent variable z",
    )
    model.add(
        "--hidden",
        type=_positive_ints,
        default=_vae_default("hidden_sizes"),
        metavar="W,W,...",
        help="widths of the encoder's hidden layers, comma-separated (decoder: reversed)",
    )
    model.add(
        "--activation",
        choices=sorted(ACTIVATIONS),
        default=_vae_default("activation"),
        help="hidden activation",
    )
    model.add(
        "--network",
        choices=("mlp", "conv"),
        default=_vae_default("network"),
        help="encoder and decoder: fully connected, or convolutional (images with sides "
        "divisible by 4)",
    )
    model.add(
        "--prior",
        choices=sorted(PRIORS),
        default=_vae_default("prior"),
        help="p(z): standard normal, learned normal, Gaussian mixture or VampPrior",
    )
    model.add(
        "--prior-components",
        type=int,
        default=_vae_default("prior_components"),
        metavar="N",
        help="components of the mixture prior, pseudo-inputs of the VampPrior",
    )
    model.add(
        "--guide",
        choices=sorted(POSTERIORS),
        default=_vae_default("guide"),
        help="q(z|x): diagonal, full (Cholesky) or low-rank Gaussian, or inverse "
        "autoregressive flows",
    )
    model.add(
        "--guide-rank",
        type=int,
        default=_vae_default("guide_rank"),
        metavar="R",
        help="rank of the low-rank guide's covariance factor (below --latent-dim)",
    )
    model.add(
        "--flows",
        type=int,
        default=_vae_default("num_flows"),
        metavar="N",
        help="inverse autoregressive flows of the flow guide",
    )
    model.add(
        "--top-latent-dim",
        type=int,
        default=_vae_default("top_latent_dim"),
        metavar="L2",
        help="dimensions of a second stochastic layer z2 above z (none: one layer)",
    )
    model.add(
        "--top-hidden",
        type=_positive_ints,
        default=_vae_default("top_hidden_sizes"),
        metavar="W,W,...",
        help="widths of the networks between z and z2",
    )

    fitting = top.group("training (TrainConfig)")
    fitting.add(
        "--objective",
        choices=sorted(OBJECTIVES),
        default=_train_default("objective"),
        help="training objective",
    )
    fitting.add(
        "--particles",
        type=int,
        default=_train_default("num_particles"),
        metavar="K",
        help="draws of z per data point per step",
    )
    fitting.add(
        "--epochs",
        type=int,
        default=_train_default("epochs"),
        metavar="N",
        help="passes over the training data (a maximum under --lr-schedule plateau)",
    )
    fitting.add(
        "--batch-size",
        type=int,
        default=_train_default("batch_size"),
        metavar="B",
        help="data points per step",
    )
    fitting.add(
        "--lr",
        type=float,
        default=_train_default("learning_rate"),
        help="Adam step size",
    )
    fitting.add(
        "--lr-schedule",
        choices=("constant", "plateau"),
        default=_train_default("lr_schedule"),
        help="'plateau': multiply the step size by --lr-decay after --lr-patience epochs "
        "without a better validation ELBO, stop below --min-lr",
    )
    fitting.add(
        "--lr-decay",
        type=float,
        default=_train_default("lr_decay"),
        metavar="F",
        help="factor in (0, 1) applied to the step size at each plateau",
    )
    fitting.add(
        "--lr-patience",
        type=int,
        default=_train_default("lr_patience"),
        metavar="N",
        help="epochs without a better validation ELBO before a decay",
    )
    fitting.add(
        "--min-lr",
        type=float,
        default=_train_default("min_learning_rate"),
        metavar="LR",
        help="smallest step size; a decay below it ends training (converged)",
    )
    fitting.add(
        "--clip-norm",
        type=float,
        default=_train_default("clip_norm"),
        metavar="NORM",
        help="clip the gradients' global 2-norm to this value (none: no clipping)",
    )
    fitting.add(
        "--renyi-alpha",
        type=float,
        default=_train_default("renyi_alpha"),
        metavar="A",
        help="order alpha of the renyi objective",
    )
    fitting.add(
        "--beta",
        type=float,
        default=_train_default("beta"),
        metavar="B",
        help="KL weight of annealed_meanfield_elbo",
    )
    fitting.add(
        "--kl-warmup-epochs",
        type=int,
        default=_train_default("kl_warmup_epochs"),
        metavar="N",
        help="epochs of linear KL warm-up (annealed_meanfield_elbo)",
    )
    fitting.add(
        "--free-bits",
        type=float,
        default=_train_default("free_bits"),
        metavar="NATS",
        help="KL in nats per latent dimension below which it is not penalised "
        "(annealed_meanfield_elbo)",
    )
    fitting.add(
        "--compile",
        choices=COMPILE_MODES,
        default=_train_default("compile"),
        help="'auto': the traced-graph fast path when the model traces (checked before "
        "training), else eager Pyro with a one-line warning; 'none': eager Pyro; 'graph': "
        "replay the traced ATen graph; 'inductor': also torch.compile it (pays on long runs)",
    )
    fitting.add(
        "--on-nonfinite",
        choices=("raise", "rollback"),
        default=_train_default("on_nonfinite"),
        help="on a NaN/inf loss or gradient: stop, or roll back the epoch and halve the step size",
    )
    fitting.add(
        "--seed", type=int, default=0, metavar="N", help="seed of the weights, data order and draws"
    )
    _add_device(fitting)

    output = top.group("run directory")
    output.add("--out", type=Path, required=True, metavar="DIR", help="run directory")
    output.add(
        "--checkpoint-every",
        type=int,
        default=_train_default("checkpoint_every"),
        metavar="N",
        help="write OUT/model.pt (atomically) every N epochs and at the end",
    )
    again = output.parser.add_mutually_exclusive_group()
    exclusive = _Arguments(again, track)  # type: ignore[arg-type]
    exclusive.add(
        "--resume",
        action="store_true",
        help="continue the run in OUT (same settings; --epochs may grow)",
    )
    exclusive.add(
        "--force",
        action="store_true",
        help="replace the model in OUT by a new run (without it, an OUT holding a model is "
        "refused)",
    )
    _add_common(top)


def _add_estimator(arguments: _Arguments, command: str) -> None:
    """--method, --num-points and the AIS options shared by evaluate, compare and gaps."""
    what = {
        "evaluate": "'is': importance sampling with the guide as proposal (log p(x), ELBOs, "
        "IWAE_k bounds and diagnostics); 'ais': annealed importance sampling with HMC from the "
        "guide, a stochastic lower bound on log p(x) whose bias shrinks as --ais-steps grows, "
        "whatever the guide (slower)",
        "compare": "estimator of the compared quantity: 'is' (importance sampling with each "
        "model's guide; any --quantity) or 'ais' (annealed importance sampling; log_px only)",
        "gaps": "estimator of log p(x) the gaps are measured from: 'is' (importance sampling "
        "with the amortized guide, --num-samples draws) or 'ais' (annealed importance "
        "sampling: a tighter lower bound, so a less understated approximation gap)",
    }[command]
    arguments.add("--method", choices=METHODS, default="is", help=what)
    arguments.add(
        "--num-points",
        type=_positive_int,
        metavar="N",
        help="use the first N data points of the split only (as prepared by --binarize)",
        shown=(
            f"all with --method is, the first {AIS_DEFAULT_POINTS} with --method ais"
            if command != "gaps"
            else f"the first {GAPS_DEFAULT_POINTS}"
        ),
    )
    ais = arguments.group("annealed importance sampling (--method ais)")
    ais.add(
        "--ais-steps",
        type=_positive_int,
        default=AIS_DEFAULT_STEPS,
        metavar="T",
        help="annealing steps (intermediate distributions); the bias falls as T grows: use "
        "1000 or more for published numbers, checked with 'pyrovae evaluate --method ais "
        "--bdmc'",
    )
    ais.add(
        "--ais-chains",
        type=_positive_int,
        default=AIS_DEFAULT_CHAINS,
        metavar="C",
        help="independent AIS chains (weights) per data point",
    )
    if command == "evaluate":
        ais.add(
            "--bdmc",
            action="store_true",
            help="also run bidirectional Monte Carlo on data simulated from the model: a "
            "sandwich lower <= log p(x) <= upper whose mean width tells whether --ais-steps is "
            "enough (above ~1 nat: raise it)",
        )
        ais.add(
            "--bdmc-points",
            type=_positive_int,
            default=BDMC_DEFAULT_POINTS,
            metavar="N",
            help="data points simulated from the model for --bdmc",
        )


def _add_evaluate(commands, track: bool) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="log p(x) per data point by importance sampling (with ELBOs and IWAE bounds) "
        "or by annealed importance sampling",
        description="Importance-sampled log p(x), Monte Carlo and analytic-KL ELBOs and IWAE_k "
        "bounds of a saved model, in nats per data point (higher is better), with their "
        "standard errors and diagnostics (ESS, Pareto k-hat, active units). --method ais "
        "estimates log p(x) by annealed importance sampling instead (a stochastic lower bound "
        "in expectation, tighter as --ais-steps grows); --bdmc adds a bidirectional Monte "
        "Carlo sandwich on simulated data that tells whether the steps are enough.",
        formatter_class=_formatter,
    )
    arguments = _Arguments(parser, track)
    arguments.add(
        "--model", type=Path, required=True, metavar="FILE", help="model file (or run directory)"
    )
    _add_data(arguments, None)
    arguments.add("--split", choices=SPLIT_NAMES, default="test", help="data split")
    arguments.add(
        "--binarize",
        choices=EVALUATION_BINARIZATION,
        default="auto",
        help="how grey levels become 0/1 values: 'threshold' at 0.5, 'sample' (one Bernoulli "
        "draw seeded by --seed) or 'none'; 'auto' follows training: 'sample' after dynamic, "
        "'threshold' after static binarization, 'threshold' for grey levels under a "
        "Bernoulli likelihood, else 'none'",
    )
    _add_estimator(arguments, "evaluate")
    sampling = arguments.group("importance sampling (--method is)")
    sampling.add(
        "--num-samples",
        type=_positive_int,
        default=1000,
        metavar="K",
        help="draws of z per data point (5000 for published numbers)",
    )
    sampling.add(
        "--ks",
        type=_positive_ints,
        default=(1, 5, 50),
        metavar="k,k,...",
        help="IWAE_k group sizes, comma-separated (those above K are skipped, with a note)",
    )
    arguments.add(
        "--max-pairs",
        type=_positive_int,
        default=2**20,
        metavar="P",
        help="memory budget: most (draw, data point) pairs traced at once",
        shown=f"{2**20} for is, {AIS_MAX_PAIRS} (chains included) for ais",
    )
    arguments.add(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the draws (and of --binarize sample)",
    )
    _add_device(arguments)
    arguments.add(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the per-datapoint results (CSV) here",
    )
    _add_common(arguments)


def _add_compare(commands, track: bool) -> None:
    parser = commands.add_parser(
        "compare",
        help="paired comparison of saved models on the same data points",
        description="Score two or more saved models on the same data points (prepared as "
        "'pyrovae evaluate' prepares them) and print them sorted by the estimate, with the "
        "mean per-point differences and their paired standard errors (the same points for "
        "every model, so the differences are far better determined than the means). Nats per "
        "data point, higher is better; a positive difference favours the first model of its "
        "row.",
        formatter_class=_formatter,
    )
    arguments = _Arguments(parser, track)
    parser.add_argument(
        "models",
        nargs="+",
        type=Path,
        metavar="MODEL",
        help="two or more model files (or run directories), all of the same number of features",
    )
    _add_data(arguments, None)
    arguments.add("--split", choices=SPLIT_NAMES, default="test", help="data split")
    arguments.add(
        "--binarize",
        choices=EVALUATION_BINARIZATION,
        default="auto",
        help="how grey levels become 0/1 values, as for evaluate; 'auto' must prepare the "
        "same data for every model (else choose one)",
    )
    arguments.add(
        "--quantity",
        default="log_px",
        metavar="NAME",
        help="compared column: log_px, or with --method is also elbo, elbo_analytic or "
        "iwae_<k> (k at most --num-samples)",
    )
    _add_estimator(arguments, "compare")
    sampling = arguments.group("importance sampling (--method is)")
    sampling.add(
        "--num-samples",
        type=_positive_int,
        default=1000,
        metavar="K",
        help="draws of z per data point",
    )
    arguments.add(
        "--pairs",
        choices=("best", "all"),
        default="best",
        help="differences shown: every model minus the best, or every pair",
    )
    arguments.add(
        "--max-pairs",
        type=_positive_int,
        default=2**20,
        metavar="P",
        help="memory budget: most (draw, data point) pairs traced at once",
        shown=f"{2**20} for is, {AIS_MAX_PAIRS} (chains included) for ais",
    )
    arguments.add(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the draws, the same for every model (and of --binarize sample)",
    )
    _add_device(arguments)
    arguments.add(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the table (CSV: kind, first, second, mean, se, unpaired_se, z) here",
    )
    _add_common(arguments)


def _add_gaps(commands, track: bool) -> None:
    parser = commands.add_parser(
        "gaps",
        help="split log p(x) - ELBO into approximation and amortization gaps",
        description="Inference-gap decomposition (Cremer, Li and Duvenaud, 2018) of a saved "
        "model on the first data points of a split: log p(x) - ELBO(encoder) = approximation "
        "gap (log p(x) - ELBO of the best guide of the family per point) + amortization gap "
        "(ELBO of that per-point guide - ELBO of the encoder), in nats per data point. "
        "Supported for guides with one diagonal-Normal latent site (--guide diagonal, one "
        "stochastic layer).",
        formatter_class=_formatter,
    )
    arguments = _Arguments(parser, track)
    arguments.add(
        "--model", type=Path, required=True, metavar="FILE", help="model file (or run directory)"
    )
    _add_data(arguments, None)
    arguments.add("--split", choices=SPLIT_NAMES, default="test", help="data split")
    arguments.add(
        "--binarize",
        choices=EVALUATION_BINARIZATION,
        default="auto",
        help="how grey levels become 0/1 values, as for evaluate",
    )
    _add_estimator(arguments, "gaps")
    arguments.add(
        "--num-samples",
        type=_positive_int,
        default=1000,
        metavar="K",
        help="draws per data point of each ELBO (and of log p(x) with --method is)",
    )
    arguments.add(
        "--steps",
        type=_positive_int,
        default=500,
        metavar="S",
        help="Adam steps of the per-point optimization (the output says whether it converged)",
    )
    arguments.add(
        "--max-pairs",
        type=_positive_int,
        default=2**14,
        metavar="P",
        help="memory budget: most (draw, data point) pairs traced at once",
    )
    arguments.add("--seed", type=int, default=0, metavar="N", help="seed of all draws")
    _add_device(arguments)
    arguments.add(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the per-datapoint gaps (CSV) here",
    )
    _add_common(arguments)


def _add_sample(commands, track: bool) -> None:
    parser = commands.add_parser(
        "sample",
        help="write an image grid of samples from the prior",
        description="Draw z ~ p(z) and write a grid of decoder means E[x|z] (or of draws "
        "x ~ p(x|z)). --out: a name ending in .png or .pdf is written as that format; "
        "any other name gets the --formats suffixes added.",
        formatter_class=_formatter,
    )
    arguments = _Arguments(parser, track)
    arguments.add(
        "--model", type=Path, required=True, metavar="FILE", help="model file (or run directory)"
    )
    arguments.add("--num", type=_positive_int, default=64, help="images in the grid")
    arguments.add(
        "--kind",
        choices=("mean", "observation"),
        default="mean",
        help="decoder means E[x|z] or sampled observations x ~ p(x|z)",
    )
    arguments.add(
        "--label",
        type=int,
        help="class of every sample of a conditional model (none: the classes in turn)",
    )
    arguments.add("--seed", type=int, default=0, help="seed of the draws")
    arguments.add("--out", type=Path, required=True, metavar="FILE", help="image file")
    arguments.add(
        "--formats",
        nargs="+",
        choices=IMAGE_FORMATS,
        help="formats to write when --out has no .png/.pdf suffix",
        shown=" ".join(SAMPLE_DEFAULT_FORMATS),
    )
    _add_common(arguments)


def _add_plot(commands, track: bool) -> None:
    parser = commands.add_parser(
        "plot",
        help="write a figure of a saved model",
        description="Write one figure of a saved model. --out: a name ending in .png or .pdf "
        "is written as that format only; any other name gets the --formats suffixes added.",
        formatter_class=_formatter,
    )
    arguments = _Arguments(parser, track)
    parser.add_argument(
        "kind",
        choices=("samples", "reconstructions", "curves", "latent", "manifold", "interpolation"),
        help="prior samples, data vs reconstructions, training curves, scatter of posterior "
        "means, decoded 2-D latent grid (2-D models), or interpolations between posterior means",
    )
    arguments.add(
        "--model", type=Path, required=True, metavar="FILE", help="model file (or run directory)"
    )
    arguments.add("--out", type=Path, required=True, metavar="FILE", help="figure file")
    arguments.add(
        "--formats",
        nargs="+",
        choices=IMAGE_FORMATS,
        help="formats to write when --out has no .png/.pdf suffix",
        shown=" ".join(PLOT_DEFAULT_FORMATS),
    )
    _add_data(arguments, None)
    arguments.add("--split", choices=SPLIT_NAMES, default="test", help="data split")
    arguments.add(
        "--binarize",
        choices=EVALUATION_BINARIZATION,
        default="auto",
        help="how grey levels become 0/1 values, as for evaluate",
    )
    arguments.add(
        "--num",
        type=_positive_int,
        help="samples (64), images (16), points (2000), manifold grid size (15) or "
        "interpolation pairs (4)",
        shown="per kind, in brackets",
    )
    arguments.add("--seed", type=int, default=0, help="seed of draws and of the chosen pairs")
    arguments.add(
        "--method",
        choices=("linear", "spherical"),
        default="linear",
        help="interpolation in latent space",
    )
    _add_common(arguments)


def build_parser(track_explicit: bool = False) -> argparse.ArgumentParser:
    """The ``pyrovae`` argument parser. With ``track_explicit`` no option has a default, so
    that the parsed namespace holds only the options given on the command line."""
    parser = argparse.ArgumentParser(prog="pyrovae", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands, track_explicit)
    _add_evaluate(commands, track_explicit)
    _add_sample(commands, track_explicit)
    _add_plot(commands, track_explicit)
    _add_compare(commands, track_explicit)
    _add_gaps(commands, track_explicit)
    return parser


# --------------------------------------------------------------------------- output


class Output:
    """What a command prints, by verbosity; only the main process prints."""

    def __init__(self, args: argparse.Namespace):
        self.level = QUIET if args.quiet else VERBOSE if args.verbose else NORMAL
        self.main = _is_main_process()

    def summary(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def info(self, text: str) -> None:
        if self.main and self.level >= NORMAL:
            print(text, flush=True)

    def detail(self, text: str) -> None:
        if self.main and self.level >= VERBOSE:
            print(text, flush=True)

    @property
    def progress_bars(self) -> bool:
        return self.main and self.level >= NORMAL and sys.stderr.isatty()

    @contextlib.contextmanager
    def warnings(self):
        """Warnings as one line each on stderr (none under --quiet)."""
        with warnings.catch_warnings():
            if self.level == QUIET or not self.main:
                warnings.simplefilter("ignore")
            else:
                warnings.showwarning = _show_warning
            yield


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {_one_line(str(message))}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- checks


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _readable_file(path: Path, option: str, fix: str) -> Path:
    """``path`` if it is a readable regular file (never opens a FIFO, which would block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CLIError(f"{option} {path} does not exist; {fix}") from None
    except OSError as error:
        raise CLIError(f"{option} {path} cannot be read ({error.strerror}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise CLIError(f"{option} {path} is {_file_kind(mode)}, not a regular file; {fix}")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{option} {path} is not readable (permission denied); fix its permissions")
    return path


def _model_file(path: Path) -> Path:
    """The model file named by ``--model``: a file, or a run directory holding model.pt."""
    if path.is_dir() and (path / MODEL_FILE).exists():
        path = path / MODEL_FILE
    fix = f"pass the {MODEL_FILE} that 'pyrovae train' wrote"
    if not path.exists() and not path.is_symlink():
        raise CLIError(f"model file {path} does not exist; {fix}")
    return _readable_file(path, "--model", fix)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_output_file(path: Path, option: str = "--out") -> None:
    """The file ``path`` can be created or replaced: not a directory, in a writable place."""
    if path.is_dir():
        raise CLIError(f"{option} {path} is a directory; name a file in it")
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise CLIError(
            f"{option} {path}: {ancestor} is a file, not a directory; choose another path"
        )
    target = path if path.exists() else ancestor
    if not os.access(target, os.W_OK):
        why = "a read-only file system" if _read_only_fs(target) else "permission denied"
        raise CLIError(f"{option} {path} is not writable ({why}); choose a writable location")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _check_device(name: str) -> None:
    from pyrovae.training import resolve_device

    try:
        device = torch.device(name) if name != "auto" else None
    except (RuntimeError, ValueError):
        raise CLIError(
            f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N"
        ) from None
    try:
        device = resolve_device(name)
    except ValueError as error:  # e.g. CUDA asked for on a machine without it
        raise CLIError(f"--device {name}: {error}; use --device auto or cpu") from None
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise CLIError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}; choose one of them or 'cuda'"
            )
    elif device.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            raise CLIError(
                f"--device {name} is not usable on this machine ({_one_line(str(error))[:120]}); "
                "use auto, cpu or cuda"
            ) from None


def _data_files(name: str, directory: Path) -> list[Path]:
    """Files the loader of dataset ``name`` may read from ``directory``."""
    if name == "binarized-mnist":
        names = [BINARIZED_MNIST_NPZ, *(f"binarized_mnist_{s}.amat" for s in SPLIT_NAMES)]
    elif name == "mnist":
        names = [
            variant
            for file in MNIST_TRAIN_FILES + MNIST_TEST_FILES
            for variant in (file, file.removesuffix(".gz"))
        ]
    else:
        return []
    return [directory / n for n in names]


def _download_hint(name: str) -> str:
    if name == "binarized-mnist":
        return BINARIZED_MNIST_URL.format(split="{train,valid,test}")
    return MNIST_URL


def load_data(name: str, data_dir) -> object:
    """:func:`pyrovae.data.load_dataset`, with every unreadable, truncated or malformed data
    file reported as a :class:`CLIError` naming the file and the fix."""
    directory = resolve_data_dir(data_dir)
    if name != "digits" and directory.exists() and not directory.is_dir():
        raise CLIError(f"--data-dir {directory} is a file, not a directory")
    candidates = [path for path in _data_files(name, directory) if path.exists()]
    fix = f"replace it with a fresh copy (canonical download: {_download_hint(name)})"
    for path in candidates:
        _readable_file(path, "data file", fix)
    try:
        return load_dataset(name, data_dir)
    except DataNotFoundError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as error:
        filename = getattr(error, "filename", None)
        culprit = Path(filename) if filename else (candidates[0] if candidates else directory)
        reason = _one_line(str(error)) or type(error).__name__
        raise CLIError(
            f"data file {culprit} is unreadable, truncated or malformed "
            f"({type(error).__name__}: {reason}); {fix}"
        ) from None


def _dataset_of(vae, requested: str | None) -> str:
    name = requested or vae.metadata_.get("dataset")
    if name is None:
        raise CLIError("the model file does not record its dataset; pass --dataset")
    if name not in DATASETS:
        raise CLIError(
            f"the model file records dataset {name!r}, which this version does not know; "
            f"pass --dataset ({', '.join(sorted(DATASETS))})"
        )
    return name


def _is_main_process() -> bool:
    parallel = active_context()
    return parallel is None or parallel.is_main


def _needs_binary(likelihood: str) -> bool:
    return issubclass(LIKELIHOODS[likelihood], BernoulliLikelihood)


def _one_hot(labels: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, width).to(torch.get_default_dtype())


def _class_count(dataset) -> int:
    labels = [dataset.split(s)[1] for s in SPLIT_NAMES]
    return int(max(int(t.max()) for t in labels if t is not None)) + 1


def _labels_of(dataset, split: str, width: int) -> torch.Tensor:
    labels = dataset.split(split)[1]
    if labels is None:
        raise CLIError(
            f"the {split} split of {dataset.name} has no labels, which a conditional model "
            "needs; use a dataset with labels (digits, mnist) or another --split"
        )
    return _one_hot(labels, width)


# --------------------------------------------------------------------------- run lock


class RunLock:
    """An exclusive lock on a run directory: the file ``OUT.lock`` beside it, holding the
    holder's process id and host and locked with ``flock`` while the holder lives.

    A second writer finds the file locked and is refused with the holder's process id; a
    lock file left by a process that died (``kill -9``, power loss) is not locked any more,
    and is taken over."""

    def __init__(self, run_dir: Path):
        run_dir = run_dir.absolute()
        self.path = run_dir.parent / (run_dir.name + LOCK_SUFFIX)
        self.run_dir = run_dir
        self.descriptor: int | None = None
        self.took_over: str | None = None

    def acquire(self) -> RunLock:
        import fcntl

        for _ in range(10):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise CLIError(
                    f"--out {self.run_dir}: cannot create the lock file {self.path} "
                    f"({error.strerror}); choose a writable location"
                ) from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(descriptor)
                os.close(descriptor)
                raise CLIError(
                    f"--out {self.run_dir} is in use by {holder} (lock file {self.path}); "
                    "wait for that run to finish, or choose another --out"
                ) from None
            try:
                same = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: try again
                os.close(descriptor)
                continue
            previous = _read_holder(descriptor, stale=True)
            if previous is not None:
                self.took_over = previous
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.descriptor = descriptor
            return self
        raise CLIError(f"--out {self.run_dir}: could not take the lock file {self.path}")

    def release(self) -> None:
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.descriptor)
        self.descriptor = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(descriptor: int, stale: bool = False) -> str | None:
    """``process N on HOST`` from an open lock file, ``None`` when it is empty."""
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        text = os.read(descriptor, 256).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return None if stale else "another process"
    pid, host = text[0], text[1] if len(text) > 1 else "?"
    return f"process {pid} on {host}"


# --------------------------------------------------------------------------- train


_MODEL_FLAGS = {  # VAEConfig field: argparse destination
    "likelihood": "likelihood",
    "latent_dim": "latent_dim",
    "hidden_sizes": "hidden",
    "activation": "activation",
    "network": "network",
    "prior": "prior",
    "prior_components": "prior_components",
    "guide": "guide",
    "guide_rank": "guide_rank",
    "num_flows": "flows",
    "top_latent_dim": "top_latent_dim",
    "top_hidden_sizes": "top_hidden",
}

_TRAIN_FLAGS = {  # TrainConfig field: argparse destination
    "objective": "objective",
    "num_particles": "particles",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "learning_rate": "lr",
    "clip_norm": "clip_norm",
    "seed": "seed",
    "device": "device",
    "checkpoint_every": "checkpoint_every",
    "on_nonfinite": "on_nonfinite",
    "compile": "compile",
    "renyi_alpha": "renyi_alpha",
    "beta": "beta",
    "kl_warmup_epochs": "kl_warmup_epochs",
    "free_bits": "free_bits",
    "lr_schedule": "lr_schedule",
    "lr_decay": "lr_decay",
    "lr_patience": "lr_patience",
    "min_learning_rate": "min_lr",
}

SPEC_FORMATS = (".json", ".toml", ".yaml", ".yml")


def read_spec(path: Path) -> dict:
    """The mapping of VAEConfig fields in a spec file (``num_features`` and ``image_shape``
    may be left out: the dataset gives them)."""
    suffix = path.suffix.lower()
    if suffix not in SPEC_FORMATS:
        raise CLIError(f"--spec {path}: unknown format {suffix!r}; use {', '.join(SPEC_FORMATS)}")
    _readable_file(path, "--spec", "pass a spec file written by pyrovae.spec.save_spec or by hand")
    try:
        text = path.read_text()
        if suffix == ".json":
            values = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSON/TOML errors are ValueErrors
        raise CLIError(
            f"--spec {path} is not valid {suffix[1:]}: {_one_line(str(error))}"
        ) from None
    except Exception as error:  # yaml.YAMLError
        raise CLIError(
            f"--spec {path} is not valid {suffix[1:]}: {_one_line(str(error))}"
        ) from None
    if not isinstance(values, dict):
        raise CLIError(f"--spec {path} does not hold a mapping of VAEConfig options")
    return values


def _resume_payload(path: Path) -> dict:
    """The checkpoint a ``--resume`` continues, checked to the last field before anything
    runs: a malformed training state is one error line, not a traceback after loading."""
    from pyrovae.checkpoint import read_checkpoint
    from pyrovae.config import TrainConfig, VAEConfig

    if not path.exists():
        raise CLIError(
            f"cannot resume: {path} does not exist; train without --resume to start the run"
        )
    _readable_file(path, "--out model file", "remove it and train afresh")
    payload = read_checkpoint(path)
    fix = "restore the file from a backup, or start afresh with --force"
    try:
        state = payload.get("training_state")
        if not isinstance(state, dict):
            raise CLIError(
                f"cannot resume: {path} holds no training state (a model saved without one); "
                "train afresh with --force, or into another --out"
            )
        _check_training_state(payload, state)
        VAEConfig.from_dict(payload["config"])
        TrainConfig.from_dict(payload["train_config"])
    except CLIError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        what = f"{type(error).__name__}: {_one_line(str(error))}"
        raise CLIError(
            f"cannot resume: {path} holds a malformed training state ({what}); {fix}"
        ) from None
    return payload


def _check_training_state(payload: dict, state: dict) -> None:
    """Raise unless every part a resumed fit restores can be restored (tried on scratch
    objects: no global random stream changes)."""
    from pyrovae import VAE
    from pyrovae.config import VAEConfig

    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch is {epoch!r}, not a non-negative integer")
    history = payload["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise ValueError(f"history holds {len(history)} epochs, the training state {epoch}")
    if not all(isinstance(record, dict) and "epoch" in record for record in history):
        raise ValueError("history records are not per-epoch mappings")
    rngs = [state["rng"], *state.get("rng_of_ranks", [])]
    for rng in rngs:
        torch.Generator().set_state(rng["torch"])
        python = rng["python"]
        random.Random().setstate((python["version"], tuple(python["internal"]), python["gauss"]))
        numpy = rng["numpy"]
        np.random.RandomState().set_state(
            (
                numpy["name"],
                numpy["keys"].numpy().astype(np.uint32),
                numpy["position"],
                numpy["has_gauss"],
                numpy["cached"],
            )
        )
        if not isinstance(rng["cuda"], list):
            raise TypeError("rng['cuda'] is not a list")
        if "generator" in rng and not isinstance(rng["generator"], torch.Tensor):
            raise TypeError("rng['generator'] is not a tensor")
    if "schedule" in state and not isinstance(state["schedule"], dict):
        raise TypeError("schedule state is not a mapping")
    with torch.random.fork_rng(devices=[]):
        vae = VAE(VAEConfig.from_dict(payload["config"]))
    vae.load_state_dict(payload["model_state"])
    optimizer = torch.optim.Adam(vae.parameters())
    optimizer.load_state_dict(payload["optimizer_state"])


def _model_values(args, explicit: set, saved: dict | None, spec: dict | None) -> dict:
    """VAEConfig fields: command line over spec file over a resumed run's over defaults."""
    values = dict(saved["config"]) if saved is not None else {}
    if spec is not None:
        values.update(spec)
    for field, dest in _MODEL_FLAGS.items():
        if dest in explicit or field not in values:
            values[field] = getattr(args, dest)
    return values


def _fill_data_shape(values: dict, dataset, origin: str) -> None:
    for field, actual in (
        ("num_features", dataset.num_features),
        ("image_shape", tuple(dataset.image_shape)),
    ):
        given = values.get(field)
        if given is None:
            values[field] = actual
        elif (tuple(given) if isinstance(given, list) else given) != actual:
            raise CLIError(
                f"{origin} has {field}={given!r} but dataset {dataset.name} has {actual!r}; "
                "use a matching --dataset or remove the field"
            )


def _resolve_binarize(requested: str, likelihood: str, dataset) -> tuple[str, str]:
    """Training binarization and a sentence saying what it does to the data."""
    mode = requested
    if requested == "auto":
        mode = "dynamic" if _needs_binary(likelihood) and not dataset.binary else "none"
    values = "0/1 values" if dataset.binary else "grey levels in [0, 1]"
    why = (
        f", chosen by auto: the {likelihood} likelihood needs 0/1 values"
        if requested == "auto"
        else ""
    )
    text = {
        "dynamic": f"{values} binarized by a fresh Bernoulli draw of every minibatch "
        f"(--binarize dynamic{why}; validation data: one draw seeded with --seed + 1)",
        "static": f"{values} thresholded at 0.5 once (--binarize static)",
        "none": f"{values}, used as they are (--binarize none"
        + (", auto" if requested == "auto" else "")
        + ")",
    }[mode]
    return mode, text


def run_train(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.config import TrainConfig, VAEConfig

    run_dir: Path = args.out
    model_path = run_dir / MODEL_FILE
    _check_device(args.device)
    if run_dir.exists() and not run_dir.is_dir():
        raise CLIError(
            f"--out {run_dir} is a file, not a directory; name a directory (pyrovae writes "
            f"{MODEL_FILE}, {', '.join(HISTORY_FILES)} into it)"
        )
    ancestor = _existing_ancestor(run_dir)
    if not ancestor.is_dir():
        raise CLIError(f"--out {run_dir}: {ancestor} is a file, not a directory")
    if model_path.exists() and not (args.resume or args.force):
        raise CLIError(
            f"--out {run_dir} already holds a trained model ({model_path}); pass --resume to "
            "continue it, --force to replace it, or choose another --out"
        )
    saved = _resume_payload(model_path) if args.resume else None
    spec = read_spec(args.spec) if getattr(args, "spec", None) is not None else None

    dataset_name = args.dataset
    if saved is not None and "dataset" not in explicit:
        dataset_name = (saved.get("metadata") or {}).get("dataset", dataset_name)
    dataset = load_data(dataset_name, args.data_dir)

    values = _model_values(args, explicit, saved, spec)
    _fill_data_shape(
        values, dataset, f"--spec {args.spec}" if spec is not None else str(model_path)
    )
    metadata = {"dataset": dataset_name}
    condition = args.condition
    if saved is not None and "condition" not in explicit:
        condition = (saved.get("metadata") or {}).get("condition", "none")
    if spec is not None and values.get("condition_dim") and "condition" not in explicit:
        condition = "labels"
    if condition == "labels":
        classes = _class_count(dataset)
        if values.get("condition_dim", classes) not in (0, classes):
            raise CLIError(
                f"condition_dim={values['condition_dim']} does not match the {classes} classes "
                f"of {dataset_name}, which --condition labels gives one-hot"
            )
        values["condition_dim"] = classes
        metadata["condition"] = "labels"
    elif values.get("condition_dim"):
        raise CLIError(
            "the model is conditional (condition_dim > 0); pass --condition labels, or set "
            "condition_dim to 0"
        )
    config = VAEConfig.from_dict(values)

    train_values = dict(saved["train_config"]) if saved is not None else {}
    for field, dest in _TRAIN_FLAGS.items():
        if dest in explicit or field not in train_values:
            train_values[field] = getattr(args, dest)
    if "binarize" in explicit or "binarize" not in train_values:
        mode, described = _resolve_binarize(args.binarize, config.likelihood, dataset)
        train_values["binarize"] = mode
    else:
        mode, described = _resolve_binarize(train_values["binarize"], config.likelihood, dataset)
    train_values["progress"] = out.level >= NORMAL and out.main
    train_config = TrainConfig.from_dict(train_values)

    train, valid = dataset.train, dataset.valid
    if condition == "labels":
        train = (train, _labels_of(dataset, "train", config.condition_dim))
        valid = (valid, _labels_of(dataset, "valid", config.condition_dim))
    out.info(
        f"data: {dataset_name}, {dataset.train.shape[0]} training and {dataset.valid.shape[0]} "
        f"validation points of {dataset.num_features} features; {described}"
    )
    out.detail(f"model: {json.dumps(config.to_dict())}")
    out.detail(f"training: {json.dumps(train_config.to_dict())}")
    out.detail(f"threads: {torch.get_num_threads()} (--threads)")

    lock = RunLock(run_dir) if out.main else None
    with lock if lock is not None else contextlib.nullcontext():
        if lock is not None and lock.took_over:
            out.info(f"note: took over the stale lock {lock.path} of {lock.took_over}")
        if run_dir.is_dir():
            _check_writable_dir(run_dir)
        vae = VAE(config, seed=train_config.seed)
        vae.metadata_ = metadata
        if out.main:
            _check_free_space(run_dir, vae)
        try:
            history = vae.fit(
                train,
                valid,
                checkpoint_path=model_path,
                resume=args.resume,
                **train_config.to_dict(),
            )
        except OSError as error:
            raise CLIError(_write_failure(error, model_path, resumable=True)) from None
        if not out.main:
            return 0
        try:
            history.to_jsonl(run_dir / HISTORY_FILES[0])
            history.to_csv(run_dir / HISTORY_FILES[1])
        except OSError as error:
            raise CLIError(_write_failure(error, run_dir / HISTORY_FILES[0])) from None
    last = history.records[-1]
    path_taken = getattr(vae, "training_path_", None)
    taken = "" if path_taken is None else f" ({path_taken} path, --compile {train_config.compile})"
    out.summary(
        f"trained {len(history)} epochs in {sum(history.column('seconds')):.1f} s{taken}; "
        f"train ELBO {last['train_elbo']:.2f}, validation ELBO {last['valid_elbo']:.2f} "
        f"nats per data point"
    )
    written = ", ".join(str(p) for p in (model_path, *(run_dir / f for f in HISTORY_FILES)))
    out.summary(f"wrote {written}")
    return 0


def _check_writable_dir(directory: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise CLIError(
            f"--out {directory} is not writable ({error.strerror}); choose a writable location"
        ) from None


def _check_free_space(run_dir: Path, vae) -> None:
    """Refuse before training when the disk cannot hold a checkpoint (the file is written
    beside the previous one, then renamed over it: room for two)."""
    tensors = sum(p.numel() * p.element_size() for p in vae.parameters())
    size = 3 * tensors + 2**20  # parameters, two Adam moments, history and state
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    if free < 2 * size:
        raise CLIError(
            f"--out {run_dir}: {free / 2**20:.1f} MiB free on its disk, but a checkpoint of "
            f"this model takes about {size / 2**20:.1f} MiB and is written beside the previous "
            f"one (room for two needed); free space or choose another --out"
        )


def _write_failure(error: OSError, path: Path, resumable: bool = False) -> str:
    reason = _one_line(error.strerror or str(error)) or type(error).__name__
    if not reason.startswith("cannot "):  # the library's messages name the file already
        reason = f"cannot write {error.filename or path}: {reason}"
    if error.errno == errno.ENOSPC or error.errno == getattr(errno, "EDQUOT", -1):
        fix = "free disk space or choose another --out"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    else:
        fix = "check the location and try again"
    if resumable:
        fix += f"; the last complete checkpoint, if any, is intact ({path}: continue with --resume)"
    return f"{reason}; {fix}"


# --------------------------------------------------------------------------- evaluate


def prepare_data(
    vae, dataset, split: str, binarize_mode: str = "auto", seed: int = 0
) -> tuple[torch.Tensor, str]:
    """The split a saved model is scored on, and a sentence saying how it was prepared.

    ``binarize_mode``: ``"threshold"`` (x >= 0.5, :func:`pyrovae.data.threshold`),
    ``"sample"`` (one Bernoulli draw, ``binarize(x, torch.Generator().manual_seed(seed))``),
    ``"none"``, or ``"auto"``: ``"sample"`` for a model trained with dynamic binarization,
    ``"threshold"`` after static binarization or for grey levels under a Bernoulli
    likelihood, else ``"none"``. The same tensor given to ``vae.evaluate`` in Python gives
    the same numbers."""
    data, _ = dataset.split(split)
    trained = vae.train_config_.binarize if vae.train_config_ is not None else None
    mode = binarize_mode
    if mode == "auto":
        if trained == "dynamic":
            mode = "sample"
        elif trained == "static" or (not dataset.binary and _needs_binary(vae.config.likelihood)):
            mode = "threshold"
        else:
            mode = "none"
    values = "0/1 values" if dataset.binary else "grey levels"
    why = (
        f", auto: the model was trained with --binarize {trained}"
        if binarize_mode == "auto" and trained not in (None, "none")
        else ""
    )
    if mode == "threshold":
        return threshold(data), (
            f"{values} thresholded at 0.5 (--binarize threshold{why}; in Python: "
            "pyrovae.data.threshold(x))"
        )
    if mode == "sample":
        generator = torch.Generator().manual_seed(seed)
        return binarize(data, generator=generator), (
            f"{values} binarized by one Bernoulli draw seeded with {seed} (--binarize sample"
            f"{why}; in Python: pyrovae.data.binarize(x, torch.Generator().manual_seed({seed}))"
            "; --binarize threshold thresholds at 0.5 instead)"
        )
    return data, f"{values} as they are (--binarize none)"


def evaluation_data(
    vae, dataset_name: str, data_dir, split: str, seed: int, binarize_mode: str = "auto"
) -> torch.Tensor:
    """The split a saved model is evaluated on, prepared as :func:`prepare_data` says
    (by default binarized the way the model was trained: dynamic binarization is evaluated
    on one Bernoulli draw seeded with ``seed``)."""
    return prepare_data(vae, load_data(dataset_name, data_dir), split, binarize_mode, seed)[0]


def _dropped_ks_note(requested_ks, num_samples: int, result) -> str | None:
    """The CLI skips the k above K before evaluating; say so (the table's own notes cover
    k-hat from too few draws)."""
    dropped = [k for k in requested_ks if k > num_samples]
    if not dropped or getattr(result, "dropped_ks", None):
        return None
    listed = ", ".join(map(str, dropped))
    return (
        f"note: IWAE_k for k = {listed} not computed: k must be at most K = {num_samples} "
        f"draws per data point (raise --num-samples to {max(dropped)} or more to get it)"
    )


_IS_ONLY = {"num_samples": "--num-samples", "ks": "--ks"}
_AIS_ONLY = {
    "ais_steps": "--ais-steps",
    "ais_chains": "--ais-chains",
    "bdmc": "--bdmc",
    "bdmc_points": "--bdmc-points",
}


def _check_method_options(args: argparse.Namespace, explicit: set, is_only=_IS_ONLY) -> None:
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


def _check_not_parallel(what: str) -> None:
    if active_context() is not None:
        raise CLIError(
            f"{what} does not run data-parallel; run it in one process (without torchrun)"
        )


def _first_points(data: torch.Tensor, num_points: int | None, default: int | None):
    """The first ``num_points`` rows (``default`` when not given, all when both are None) and
    the count; an explicit --num-points beyond the split is refused."""
    total = data.shape[0]
    if num_points is None:
        num_points = total if default is None else min(default, total)
    elif num_points > total:
        raise CLIError(f"--num-points {num_points}: the split has only {total} data points")
    return num_points


def _default_points(method: str) -> int | None:
    return AIS_DEFAULT_POINTS if method == "ais" else None


def _split_line(split: str, name: str, used: int, total: int, described: str) -> str:
    points = f"the first {used} of {total} data points (--num-points)"
    if used == total:
        points = f"{total} data points"
    return f"{split} split of {name}: {points}, {described}"


def _ais_options(args: argparse.Namespace, explicit: set) -> dict:
    options = dict(num_steps=args.ais_steps, num_chains=args.ais_chains, seed=args.seed)
    options["max_pairs"] = args.max_pairs if "max_pairs" in explicit else AIS_MAX_PAIRS
    return options


def _ais_settings_line(args: argparse.Namespace) -> str:
    return (
        f"AIS: {args.ais_steps} annealing steps (--ais-steps), {args.ais_chains} chains per "
        "data point (--ais-chains), HMC transitions with 10 leapfrog steps, starting from the "
        "guide q(z|x); log_px is a stochastic lower bound on log p(x) (E[log_px] <= log p(x)), "
        "tighter as the steps grow"
    )


def _elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


def _run_bdmc(vae, args: argparse.Namespace, explicit: set, out: Output) -> None:
    from pyrovae.evaluation.ais import bdmc

    started = time.perf_counter()
    sandwich = bdmc(
        vae.model,
        vae.guide,
        num_points=args.bdmc_points,
        progress=out.progress_bars,
        **_ais_options(args, explicit),
    )
    out.summary("")
    out.summary(
        f"BDMC: forward and reverse AIS with the same settings on {args.bdmc_points} data "
        f"points simulated from the model (--bdmc-points), {_elapsed(started)}:"
    )
    out.summary(sandwich.table())
    width = sandwich.mean_width
    if width > BDMC_WIDTH_LIMIT:
        out.summary(
            f"mean width {width:.3f} nats is above ~{BDMC_WIDTH_LIMIT:g} nat: AIS with "
            f"{args.ais_steps} steps may understate log p(x) by about that much; raise "
            f"--ais-steps (e.g. {4 * args.ais_steps})"
        )
    else:
        out.summary(
            f"mean width {width:.3f} nats is below ~{BDMC_WIDTH_LIMIT:g} nat: {args.ais_steps} "
            "steps are enough for this model's simulated data (real data may be harder; if "
            "the mean width is above ~1 nat, raise --ais-steps)"
        )


def run_evaluate(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.training import resolve_device

    _check_device(args.device)
    _check_method_options(args, explicit)
    if args.method == "ais":
        _check_not_parallel("--method ais")
    model_path = _model_file(args.model)
    if args.out is not None and out.main:
        _check_output_file(args.out)
    device, parallel = resolve_device(args.device), active_context()
    vae = VAE.load(model_path, device=device if parallel is None else parallel.device(device))
    if args.bdmc and vae.config.condition_dim:
        raise CLIError(
            "--bdmc simulates data from the model, which this conditional model (condition "
            "labels) cannot do without a condition; drop --bdmc"
        )
    name = _dataset_of(vae, args.dataset)
    dataset = load_data(name, args.data_dir)
    data, described = prepare_data(vae, dataset, args.split, args.binarize, args.seed)
    total = data.shape[0]
    used = _first_points(data, args.num_points, _default_points(args.method))
    data = data[:used]
    condition = None
    if vae.config.condition_dim:
        condition = _labels_of(dataset, args.split, vae.config.condition_dim)[:used]
    out.summary(_split_line(args.split, name, used, total, described))
    if args.method == "ais":
        return _evaluate_ais(vae, data, condition, args, explicit, out)
    ks = tuple(k for k in args.ks if k <= args.num_samples)
    result = vae.evaluate(
        data,
        num_samples=args.num_samples,
        ks=ks,
        seed=args.seed,
        max_pairs=args.max_pairs,
        progress=out.progress_bars,
        condition=condition,
    )
    if not out.main:
        return 0
    out.summary(result.table())
    note = _dropped_ks_note(args.ks, args.num_samples, result)
    if note is not None:
        out.summary(note)
    _write_results(result, args.out, out)
    return 0


def _write_results(result, path: Path | None, out: Output, what: str = "per-datapoint results"):
    if path is None:
        return
    try:
        result.to_csv(path)
    except OSError as error:
        raise CLIError(_write_failure(error, path)) from None
    out.summary(f"wrote {what} to {path}")


def _evaluate_ais(vae, data, condition, args, explicit: set, out: Output) -> int:
    from pyrovae.evaluation.ais import ais

    out.summary(_ais_settings_line(args))
    started = time.perf_counter()
    result = ais(
        vae.model,
        vae.guide,
        *vae.inputs(data, condition),
        progress=out.progress_bars,
        **_ais_options(args, explicit),
    )
    out.summary(result.table())
    out.summary(f"AIS took {_elapsed(started)} for {result.num_points} data points")
    _write_results(result, args.out, out)
    if args.bdmc:
        _run_bdmc(vae, args, explicit, out)
    return 0


# --------------------------------------------------------------------------- compare


_QUANTITY_FORMS = ("log_px", "elbo", "elbo_analytic")


def _check_quantity(quantity: str, method: str, num_samples: int) -> tuple[int, ...]:
    """The IWAE group sizes ``quantity`` needs; refuse a quantity the method does not give."""
    if method == "ais":
        if quantity != "log_px":
            raise CLIError(
                f"--quantity {quantity}: --method ais estimates log_px only; use --method is "
                "for ELBOs and IWAE bounds"
            )
        return ()
    if quantity in _QUANTITY_FORMS:
        return (1,)
    match = re.fullmatch(r"iwae_(\d+)", quantity)
    if match is None or int(match.group(1)) < 1:
        raise CLIError(
            f"--quantity {quantity!r} is not a quantity; use log_px, elbo, elbo_analytic or "
            "iwae_<k> (e.g. iwae_5)"
        )
    k = int(match.group(1))
    if k > num_samples:
        raise CLIError(
            f"--quantity {quantity}: k = {k} needs at least {k} draws per data point; raise "
            f"--num-samples to {k} or more"
        )
    return (k,)


def _binarize_mode(described: str) -> str:
    match = re.search(r"--binarize (\w+)", described)
    return match.group(1) if match else "?"


def run_compare(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from types import SimpleNamespace

    from pyrovae import VAE
    from pyrovae.evaluation.comparison import compare
    from pyrovae.evaluation.importance import data_fingerprint
    from pyrovae.training import resolve_device

    _check_device(args.device)
    _check_method_options(args, explicit, {"num_samples": "--num-samples"})
    if len(args.models) < 2:
        raise CLIError(
            f"pyrovae compare needs two or more models, got {len(args.models)}; name each "
            "model file (or run directory)"
        )
    ks = _check_quantity(args.quantity, args.method, args.num_samples)
    paths: dict[str, Path] = {}
    named: dict[Path, str] = {}
    for given in args.models:
        name, path = str(given), _model_file(given)
        other = named.setdefault(path.resolve(), name)
        if other != name or name in paths:
            also = "" if other == name else f" (also as {other})"
            raise CLIError(f"model {name} is given twice{also}; name each model once")
        paths[name] = path
    if args.out is not None:
        _check_output_file(args.out)
    device = resolve_device(args.device)
    vaes = {name: VAE.load(path, device=device) for name, path in paths.items()}
    features = {name: vae.config.num_features for name, vae in vaes.items()}
    if len(set(features.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in features.items())
        raise CLIError(
            f"the models have different numbers of features ({listed}); a paired comparison "
            "needs models of the same data"
        )
    datasets = {name: _dataset_of(vae, args.dataset) for name, vae in vaes.items()}
    if len(set(datasets.values())) > 1:
        listed = ", ".join(f"{name}: {dataset}" for name, dataset in datasets.items())
        raise CLIError(
            f"the models were trained on different datasets ({listed}); pass --dataset to "
            "score them all on one"
        )
    dataset_name = next(iter(datasets.values()))
    dataset = load_data(dataset_name, args.data_dir)
    prepared = {
        name: prepare_data(vae, dataset, args.split, args.binarize, args.seed)
        for name, vae in vaes.items()
    }
    (data, described), *others = prepared.values()
    if any(not torch.equal(data, other) for other, _ in others):
        listed = ", ".join(
            f"{name}: --binarize {_binarize_mode(text)}" for name, (_, text) in prepared.items()
        )
        raise CLIError(
            f"--binarize {args.binarize} prepares different data for the models ({listed}); "
            "pass --binarize threshold, sample or none to score them all on the same points"
        )
    total = data.shape[0]
    used = _first_points(data, args.num_points, _default_points(args.method))
    data = data[:used]
    out.summary(_split_line(args.split, dataset_name, used, total, described))
    if args.method == "ais":
        out.summary(_ais_settings_line(args))
    else:
        out.summary(
            f"importance sampling: {args.num_samples} draws per data point from each model's "
            f"guide (--num-samples), seed {args.seed} for every model"
        )
    fingerprint = data_fingerprint(data)
    scored = {}
    for name, vae in vaes.items():
        condition = None
        if vae.config.condition_dim:
            condition = _labels_of(dataset, args.split, vae.config.condition_dim)[:used]
        started = time.perf_counter()
        result = _score(vae, data, condition, args, explicit, ks, out)
        out.info(f"scored {name} in {_elapsed(started)}")
        scored[name] = SimpleNamespace(
            per_datapoint=result.per_datapoint, data_fingerprint=fingerprint
        )
    comparison = compare(scored, data, quantity=args.quantity, pairs=args.pairs)
    out.summary(comparison.table())
    if args.method == "ais":
        out.summary("AIS log_px is a stochastic lower bound for every model: E[log_px] <= log p(x)")
    elif args.quantity == "log_px":
        out.summary(
            "log_px by importance sampling is a stochastic lower bound whose bias depends on "
            "each model's guide; --method ais makes it depend on it far less"
        )
    if args.out is not None:
        try:
            _comparison_csv(comparison, args.out)
        except OSError as error:
            raise CLIError(_write_failure(error, args.out)) from None
        out.summary(f"wrote the comparison to {args.out}")
    return 0


def _score(vae, data, condition, args, explicit: set, ks: tuple, out: Output):
    if args.method == "ais":
        from pyrovae.evaluation.ais import ais

        return ais(
            vae.model,
            vae.guide,
            *vae.inputs(data, condition),
            progress=out.progress_bars,
            **_ais_options(args, explicit),
        )
    return vae.evaluate(
        data,
        num_samples=args.num_samples,
        ks=ks,
        seed=args.seed,
        max_pairs=args.max_pairs,
        latent_diagnostics=False,
        progress=out.progress_bars,
        condition=condition,
    )


def _comparison_csv(comparison, path: Path) -> None:
    """One row per model (mean, se) and one per difference (mean, paired se as se,
    unpaired se, z)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "first", "second", "mean", "se", "unpaired_se", "z"])
        for row in comparison.ranking():
            writer.writerow(
                ["model", row["model"], "", f"{row['mean']:.6f}", f"{row['se']:.6f}", "", ""]
            )
        for row in comparison.differences():
            writer.writerow(
                [
                    "difference",
                    row["first"],
                    row["second"],
                    f"{row['difference']:.6f}",
                    f"{row['paired_se']:.6f}",
                    f"{row['unpaired_se']:.6f}",
                    f"{row['z']:.6f}",
                ]
            )


# --------------------------------------------------------------------------- gaps


def run_gaps(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.evaluation.gaps import decompose_gaps, local_guide
    from pyrovae.training import resolve_device

    _check_device(args.device)
    _check_method_options(args, explicit, {})
    model_path = _model_file(args.model)
    if args.out is not None:
        _check_output_file(args.out)
    vae = VAE.load(model_path, device=resolve_device(args.device))
    name = _dataset_of(vae, args.dataset)
    dataset = load_data(name, args.data_dir)
    data, described = prepare_data(vae, dataset, args.split, args.binarize, args.seed)
    total = data.shape[0]
    used = _first_points(data, args.num_points, GAPS_DEFAULT_POINTS)
    data = data[:used]
    condition = None
    if vae.config.condition_dim:
        condition = _labels_of(dataset, args.split, vae.config.condition_dim)[:used]
    inputs = (data,) if condition is None else (data, condition)
    try:  # refuse an unsupported guide before any draw
        local_guide(vae.guide, *vae.inputs(*(t[:1] for t in inputs)), data_plate=vae.data_plate)
    except ValueError as error:
        raise CLIError(
            f"pyrovae gaps cannot decompose {model_path} (guide {vae.config.guide!r}"
            f"{', two stochastic layers' if vae.config.top_latent_dim else ''}): {error}"
        ) from None
    out.summary(_split_line(args.split, name, used, total, described))
    started = time.perf_counter()
    log_px = None
    if args.method == "ais":
        from pyrovae.evaluation.ais import ais

        out.summary(_ais_settings_line(args))
        log_px = ais(
            vae.model,
            vae.guide,
            *vae.inputs(*inputs),
            progress=out.progress_bars,
            **_ais_options(args, explicit),
        )
    result = decompose_gaps(
        vae,
        *inputs,
        log_px=log_px,
        num_samples=args.num_samples,
        steps=args.steps,
        max_pairs=args.max_pairs,
        seed=args.seed,
    )
    if log_px is not None:
        result.log_px_source = (
            f"AIS with {args.ais_steps} steps and {args.ais_chains} chains (a stochastic lower "
            "bound: the approximation gap is understated by its bias)"
        )
    out.summary(result.table())
    out.summary(
        "inference gap = approximation gap (the guide's family) + amortization gap (the "
        f"encoder); {_elapsed(started)}"
    )
    if args.out is not None:
        try:
            write_per_datapoint_csv(result.per_datapoint, args.out)
        except OSError as error:
            raise CLIError(_write_failure(error, args.out)) from None
        out.summary(f"wrote per-datapoint gaps to {args.out}")
    return 0


# --------------------------------------------------------------------------- sample and plot


def output_paths(path: Path, formats, default_formats) -> list[Path]:
    """Files to write for ``--out path``: a name ending in .png or .pdf is that one file
    (with ``--formats``, also the other formats asked, same stem); any other name gets
    each format's suffix added (``--formats``, else ``default_formats``)."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix in IMAGE_FORMATS:
        formats = list(formats or [suffix])
        if suffix not in formats:
            raise CLIError(
                f"--out {path} asks for {suffix.upper()} but --formats says "
                f"{' '.join(formats)}; drop the suffix or the option"
            )
        stem = path.with_suffix("")
        return [path, *(stem.with_name(f"{stem.name}.{f}") for f in formats if f != suffix)]
    return [path.with_name(f"{path.name}.{f}") for f in (formats or default_formats)]


def _check_image_model(vae, what: str) -> None:
    if vae.config.image_shape is None:
        raise CLIError(f"{what} draws images; this model's data are not images (no image_shape)")


def _sample_condition(vae, num: int, label: int | None) -> torch.Tensor | None:
    width = vae.config.condition_dim
    if not width:
        if label is not None:
            raise CLIError("--label applies to conditional models; this model is not one")
        return None
    if label is not None and not 0 <= label < width:
        raise CLIError(f"--label {label} is not a class of this model (0 to {width - 1})")
    classes = torch.full((num,), label) if label is not None else torch.arange(num) % width
    return _one_hot(classes, width)


def run_sample(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.plots import save_image_grid

    model_path = _model_file(args.model)
    paths = output_paths(args.out, args.formats, SAMPLE_DEFAULT_FORMATS)
    for path in paths:
        _check_output_file(path)
    vae = VAE.load(model_path)
    _check_image_model(vae, "pyrovae sample")
    condition = _sample_condition(vae, args.num, args.label)
    means, observations = vae.sample(args.num, seed=args.seed, condition=condition)
    images = means if args.kind == "mean" else observations
    written = []
    for path in paths:
        try:
            written.append(save_image_grid(images, path, vae.config.image_shape))
        except OSError as error:
            raise CLIError(_write_failure(error, path)) from None
    out.summary("wrote " + ", ".join(str(path) for path in written))
    return 0


def run_plot(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.plots import DATA_FIGURE_KINDS, model_figure

    model_path = _model_file(args.model)
    paths = output_paths(args.out, args.formats, PLOT_DEFAULT_FORMATS)
    for path in paths:
        _check_output_file(path)
    vae = VAE.load(model_path)
    kind = args.kind
    if kind != "curves":
        _check_image_model(vae, f"pyrovae plot {kind}")
    if kind == "manifold" and vae.config.latent_dim != 2:
        raise CLIError(
            f"'pyrovae plot manifold' draws a 2-D latent space; this model has latent_dim="
            f"{vae.config.latent_dim}. Use 'pyrovae plot latent' (posterior means) or "
            "'pyrovae plot interpolation'"
        )
    if kind == "curves" and vae.history_ is None:
        raise CLIError(
            f"{model_path} holds no training history; 'pyrovae plot curves' needs a model "
            "written by 'pyrovae train'"
        )
    if vae.config.condition_dim and kind != "curves":
        raise CLIError(
            f"'pyrovae plot {kind}' does not take a condition; for this conditional model use "
            "'pyrovae plot curves' or 'pyrovae sample' (--label)"
        )
    data = labels = None
    if kind in DATA_FIGURE_KINDS:
        name = _dataset_of(vae, args.dataset)
        dataset = load_data(name, args.data_dir)
        data, described = prepare_data(vae, dataset, args.split, args.binarize, args.seed)
        out.info(f"{args.split} split of {name}: {described}")
        if kind == "latent":
            labels = dataset.split(args.split)[1]
            if labels is None:
                raise CLIError(
                    f"the {args.split} split of {name} has no labels, which 'pyrovae plot "
                    "latent' colours the points by; choose another --split (e.g. test)"
                )
        if kind == "interpolation" and 2 * (args.num or 4) > data.shape[0]:
            raise CLIError(
                f"--num {args.num or 4} interpolation pairs need {2 * (args.num or 4)} data "
                f"points; the {args.split} split has {data.shape[0]}"
            )
    figure = model_figure(kind, vae, data, labels, num=args.num, seed=args.seed, method=args.method)
    written = []
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=150, format=path.suffix[1:].lower(), metadata=_metadata(path))
        except OSError as error:
            raise CLIError(_write_failure(error, path)) from None
        written.append(path)
    out.summary("wrote " + ", ".join(str(path) for path in written))
    return 0


def _metadata(path: Path) -> dict:
    from pyrovae.plots import _metadata as figure_metadata

    return figure_metadata(path.suffix[1:].lower())


# --------------------------------------------------------------------------- entry point


PARALLEL_COMMANDS = ("train", "evaluate")
"""Commands that run data-parallel under ``torchrun``."""

COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "sample": run_sample,
    "plot": run_plot,
    "compare": run_compare,
    "gaps": run_gaps,
}

EXPECTED_ERRORS = (CLIError, ValueError, TypeError, OSError, FloatingPointError)
"""Failures reported as one line (bad input, unreadable or unwritable files, non-finite
training); anything else is a bug and keeps its traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(track_explicit=True).parse_args(argv)))
    threads = torch.get_num_threads()
    joined = args.command in PARALLEL_COMMANDS and active_context() is None
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line as it happens
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        joined = joined and init_from_environment() is not None
        output = Output(args)
        with output.warnings():
            return COMMANDS[args.command](args, explicit, output)
    except EXPECTED_ERRORS as error:
        text = _write_failure(error, Path("?")) if _bare_os_error(error) else str(error)
        print(f"error: {_one_line(text)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        torch.set_num_threads(threads)
        if joined:
            shutdown()


def _bare_os_error(error: BaseException) -> bool:
    """An OSError that is not one of the library's own messages (those subclass it with a
    sentence of their own, e.g. DataNotFoundError)."""
    return type(error) in (OSError, PermissionError, IsADirectoryError, NotADirectoryError)


if __name__ == "__main__":
    sys.exit(main())
