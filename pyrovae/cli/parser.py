"""The ``pyrovae`` argument parser: argument types, the option groups that several commands
share (each defined once), and one parser per command. Imports nothing heavy (no torch):
``pyrovae --help`` and argument errors are answered at once."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pyrovae.cli import names

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
GAPS_DEFAULT_POINTS = 100
COUNT_LIMIT = 2**31 - 1
"""Largest count an integer option takes (steps, chains, points, draws, widths, epochs)."""
SEED_LIMIT = 2**32
"""Seeds are integers in [0, 2**32) (:func:`pyrovae.randomness.check_seed`)."""

DESCRIPTION = (
    "Pyro VAEs fitted by SVI: train a model, evaluate its bounds on log p(x) (importance "
    "sampling or AIS), compare models on the same points, decompose inference gaps, draw "
    "samples and plot figures. Every command validates its arguments and files before it starts; "
    "expected failures print one line 'error: ...' and exit with status 2."
)


# --------------------------------------------------------------------------- argument types


def _integer(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if value > high:
        raise argparse.ArgumentTypeError(
            f"{text} is beyond the largest value this option takes, {high}"
        )
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, COUNT_LIMIT, "a positive integer")


def _count(text: str) -> int:
    return _integer(text, 0, COUNT_LIMIT, "a non-negative integer")


def _seed(text: str) -> int:
    return _integer(text, 0, SEED_LIMIT - 1, "a non-negative integer below 2**32")


def _label(text: str) -> int:
    return _integer(text, 0, COUNT_LIMIT, "a class number (0, 1, ...)")


def _positive_ints(text: str) -> tuple[int, ...]:
    parts = [part for part in text.split(",") if part.strip()]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(_positive_int(part) for part in parts)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


class Arguments:
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

    def group(self, title: str) -> Arguments:
        return Arguments(self.parser.add_argument_group(title), self.track)

    def exclusive(self) -> Arguments:
        group = self.parser.add_mutually_exclusive_group()
        return Arguments(group, self.track)  # type: ignore[arg-type]


def _formatter(prog: str) -> argparse.HelpFormatter:
    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    return argparse.HelpFormatter(prog, max_help_position=30, width=width)


COMMAND_TEXTS = {  # command: (help in the command list, description in its --help)
    "train": (
        "fit a VAE by SVI",
        "Fit a VAE by stochastic variational inference and write OUT/model.pt "
        "(config, parameters, optimizer, history and resumable training state), "
        "OUT/history.jsonl and OUT/history.csv. ELBOs are in nats per data point (higher is "
        "better). With --resume, options not given keep the values the run was written with.",
    ),
    "evaluate": (
        "log p(x) per data point by importance sampling (with ELBOs and IWAE bounds) "
        "or by annealed importance sampling",
        "Importance-sampled log p(x), Monte Carlo and analytic-KL ELBOs and IWAE_k "
        "bounds of a saved model, in nats per data point (higher is better), with their "
        "standard errors and diagnostics (ESS, Pareto k-hat, active units). --method ais "
        "estimates log p(x) by annealed importance sampling instead (a stochastic lower bound "
        "in expectation, tighter as --ais-steps grows); --bdmc adds a bidirectional Monte "
        "Carlo sandwich on simulated data that tells whether the steps are enough.",
    ),
    "compare": (
        "paired comparison of saved models on the same data points",
        "Score two or more saved models on the same data points (prepared as "
        "'pyrovae evaluate' prepares them) and print them sorted by the estimate, with the "
        "mean per-point differences and their paired standard errors (the same points for "
        "every model, so the differences are far better determined than the means). Nats per "
        "data point, higher is better; a positive difference favours the first model of its "
        "row. Models of different likelihood families or conditioning score different "
        "quantities and are refused unless --allow-different-likelihoods is given.",
    ),
    "gaps": (
        "split log p(x) - ELBO into approximation and amortization gaps",
        "Inference-gap decomposition (Cremer, Li and Duvenaud, 2018) of a saved "
        "model on the first data points of a split: log p(x) - ELBO(encoder) = approximation "
        "gap (log p(x) - ELBO of the best guide of the family per point) + amortization gap "
        "(ELBO of that per-point guide - ELBO of the encoder), in nats per data point. "
        "Supported for guides with one diagonal-Normal latent site (--guide diagonal, one "
        "stochastic layer).",
    ),
    "sample": (
        "write an image grid of samples from the prior",
        "Draw z ~ p(z) and write a grid of decoder means E[x|z] (or of draws "
        "x ~ p(x|z)). --out: a name ending in .png or .pdf is written as that format; "
        "any other name gets the --formats suffixes added.",
    ),
    "plot": (
        "write a figure of a saved model",
        "Write one figure of a saved model. --out: a name ending in .png or .pdf "
        "is written as that format only; any other name gets the --formats suffixes added.",
    ),
}


def command_parser(commands, name: str, track: bool) -> Arguments:
    """A subcommand's parser (texts from :data:`COMMAND_TEXTS`), wrapped in :class:`Arguments`."""
    help, description = COMMAND_TEXTS[name]
    parser = commands.add_parser(
        name, help=help, description=description, formatter_class=_formatter
    )
    return Arguments(parser, track)


# --------------------------------------------------------------------------- shared groups


def add_common(arguments: Arguments, command: str) -> None:
    """--threads, --quiet and --verbose: every command."""
    common = arguments.group("output and resources")
    common.add(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch intra-op threads for this command (torch.set_num_threads)",
        shown="auto: 1 for a model of under a million parameters, else the cores not busy "
        "(the output states the choice)",
    )
    level = common.exclusive()
    level.add("-q", "--quiet", action="store_true", help="print only errors and the final summary")
    level.add(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the resolved settings; the default prints "
        + (
            "one line per epoch and notes"
            if command == "train"
            else "notes such as how the data were prepared"
        )
        + " (bars only on a terminal)",
    )


def add_model_file(arguments: Arguments) -> None:
    arguments.add(
        "--model", type=Path, required=True, metavar="FILE", help="model file (or run directory)"
    )


def add_data(arguments: Arguments, default_dataset: str | None) -> None:
    arguments.add(
        "--dataset",
        choices=names.DATASETS,
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


def add_split(arguments: Arguments, binarize_help: str) -> None:
    """--split and --binarize of the commands that read a saved model's data."""
    arguments.add("--split", choices=names.SPLIT_NAMES, default="test", help="data split")
    arguments.add("--binarize", choices=EVALUATION_BINARIZATION, default="auto", help=binarize_help)


def add_device(arguments: Arguments) -> None:
    arguments.add(
        "--device",
        default="auto",
        metavar="NAME",
        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'",
    )


def add_seed(arguments: Arguments, help: str, metavar: str | None = "N") -> None:
    arguments.add("--seed", type=_seed, default=0, metavar=metavar, help=help)


def add_image_output(arguments: Arguments, default_formats: tuple, what: str) -> None:
    arguments.add("--out", type=Path, required=True, metavar="FILE", help=what)
    arguments.add(
        "--formats",
        nargs="+",
        choices=IMAGE_FORMATS,
        help="formats to write when --out has no .png/.pdf suffix",
        shown=" ".join(default_formats),
    )


_ESTIMATOR_HELP = {
    "evaluate": "'is': importance sampling with the guide as proposal (log p(x), ELBOs, "
    "IWAE_k bounds and diagnostics); 'ais': annealed importance sampling with HMC from the "
    "guide, a stochastic lower bound on log p(x) whose bias shrinks as --ais-steps grows, "
    "whatever the guide (slower)",
    "compare": "estimator of the compared quantity: 'is' (importance sampling with each "
    "model's guide; any --quantity) or 'ais' (annealed importance sampling; log_px only)",
    "gaps": "estimator of log p(x) the gaps are measured from: 'is' (importance sampling "
    "with the amortized guide, --num-samples draws) or 'ais' (annealed importance "
    "sampling: a tighter lower bound, so a less understated approximation gap)",
}
_BINARIZE_HELP = {
    "evaluate": "how grey levels become 0/1 values: 'threshold' at 0.5, 'sample' (one "
    "Bernoulli draw seeded by --seed) or 'none'; 'auto' follows training: 'sample' after "
    "dynamic, 'threshold' after static binarization, 'threshold' for grey levels under a "
    "Bernoulli likelihood, else 'none'",
    "compare": "how grey levels become 0/1 values, as for evaluate; 'auto' must prepare the "
    "same data for every model (else choose one)",
    "gaps": "how grey levels become 0/1 values, as for evaluate",
}
_NUM_SAMPLES_HELP = {
    "evaluate": "draws of z per data point (5000 for published numbers)",
    "compare": "draws of z per data point",
    "gaps": "draws per data point of each ELBO (and of log p(x) with --method is)",
}
_SEED_HELP = {
    "evaluate": "seed of the draws (and of --binarize sample)",
    "compare": "seed of the draws, the same for every model (and of --binarize sample)",
    "gaps": "seed of all draws",
}
_OUT_HELP = {
    "evaluate": "write the per-datapoint results (CSV) here",
    "compare": "write the table (CSV: kind, first, second, mean, se, unpaired_se, z) here",
    "gaps": "write the per-datapoint gaps (CSV) here",
}


def add_scoring(arguments: Arguments, command: str, after_data=None, after_sampling=None):
    """The options evaluate, compare and gaps share: data, --method, --num-points, the AIS
    options, --num-samples, --max-pairs, --seed, --device and --out; ``after_data(arguments)``
    and ``after_sampling(arguments, sampling_group)`` add a command's own options at those
    places."""
    add_data(arguments, None)
    add_split(arguments, _BINARIZE_HELP[command])
    if after_data is not None:
        after_data(arguments)
    arguments.add("--method", choices=METHODS, default="is", help=_ESTIMATOR_HELP[command])
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
    sampling = (
        arguments if command == "gaps" else arguments.group("importance sampling (--method is)")
    )
    sampling.add(
        "--num-samples",
        type=_positive_int,
        default=1000,
        metavar="K",
        help=_NUM_SAMPLES_HELP[command],
    )
    if after_sampling is not None:
        after_sampling(arguments, sampling)
    gaps = command == "gaps"
    arguments.add(
        "--max-pairs",
        type=_positive_int,
        default=2**14 if gaps else 2**20,
        metavar="P",
        help="memory budget: most (draw, data point) pairs traced at once",
        shown=None if gaps else f"{2**20} for is, {AIS_MAX_PAIRS} (chains included) for ais",
    )
    add_seed(arguments, _SEED_HELP[command])
    add_device(arguments)
    arguments.add("--out", type=Path, metavar="FILE", help=_OUT_HELP[command])


# --------------------------------------------------------------------------- commands


def _add_ks(arguments: Arguments, sampling: Arguments) -> None:
    sampling.add(
        "--ks",
        type=_positive_ints,
        default=(1, 5, 50),
        metavar="k,k,...",
        help="IWAE_k group sizes, comma-separated (those above K are skipped, with a note)",
    )


def _add_model_scoring(commands, track: bool, command: str, after_sampling) -> Arguments:
    """evaluate and gaps: --model, the scoring options and the command's own option."""
    arguments = command_parser(commands, command, track)
    add_model_file(arguments)
    add_scoring(arguments, command, after_sampling=after_sampling)
    return arguments


def _add_quantity(arguments: Arguments) -> None:
    arguments.add(
        "--quantity",
        default="log_px",
        metavar="NAME",
        help="compared column: log_px, or with --method is also elbo, elbo_analytic or "
        "iwae_<k> (k at most --num-samples)",
    )


def _add_pairs(arguments: Arguments, sampling: Arguments) -> None:
    arguments.add(
        "--pairs",
        choices=("best", "all"),
        default="best",
        help="differences shown: every model minus the best, or every pair",
    )


def _add_compare(commands, track: bool) -> Arguments:
    arguments = command_parser(commands, "compare", track)
    arguments.parser.add_argument(
        "models",
        nargs="+",
        type=Path,
        metavar="MODEL",
        help="two or more model files (or run directories), all of the same number of features",
    )
    add_scoring(arguments, "compare", after_data=_add_quantity, after_sampling=_add_pairs)
    arguments.add(
        "--allow-different-likelihoods",
        action="store_true",
        help="compare models of different likelihood families (e.g. Bernoulli and Normal) or "
        "conditioning (log p(x|y) and log p(x)), whose numbers measure different things",
    )
    return arguments


def _add_steps(arguments: Arguments, sampling: Arguments) -> None:
    arguments.add(
        "--steps",
        type=_positive_int,
        default=500,
        metavar="S",
        help="Adam steps of the per-point optimization (the output says whether it converged)",
    )


def _add_sample(commands, track: bool) -> Arguments:
    arguments = command_parser(commands, "sample", track)
    add_model_file(arguments)
    arguments.add("--num", type=_positive_int, default=64, help="images in the grid")
    arguments.add(
        "--kind",
        choices=("mean", "observation"),
        default="mean",
        help="decoder means E[x|z] or sampled observations x ~ p(x|z)",
    )
    arguments.add(
        "--label",
        type=_label,
        help="class of every sample of a conditional model (none: the classes in turn)",
    )
    add_seed(arguments, "seed of the draws", metavar=None)
    add_image_output(arguments, SAMPLE_DEFAULT_FORMATS, "image file")
    return arguments


def _add_plot(commands, track: bool) -> Arguments:
    arguments = command_parser(commands, "plot", track)
    arguments.parser.add_argument(
        "kind",
        choices=("samples", "reconstructions", "curves", "latent", "manifold", "interpolation"),
        help="prior samples, data vs reconstructions, training curves, scatter of posterior "
        "means, decoded 2-D latent grid (2-D models), or interpolations between posterior means",
    )
    add_model_file(arguments)
    add_image_output(arguments, PLOT_DEFAULT_FORMATS, "figure file")
    add_data(arguments, None)
    add_split(arguments, _BINARIZE_HELP["gaps"])
    arguments.add(
        "--num",
        type=_positive_int,
        help="samples (64), images (16), points (2000), manifold grid size (15) or "
        "interpolation pairs (4)",
        shown="per kind, in brackets",
    )
    add_seed(arguments, "seed of draws and of the chosen pairs", metavar=None)
    arguments.add(
        "--method",
        choices=("linear", "spherical"),
        default="linear",
        help="interpolation in latent space",
    )
    return arguments


def build_parser(track_explicit: bool = False) -> argparse.ArgumentParser:
    """The ``pyrovae`` argument parser. With ``track_explicit`` no option has a default, so
    that the parsed namespace holds only the options given on the command line."""
    from pyrovae.cli.train_options import add_train

    parser = argparse.ArgumentParser(prog="pyrovae", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = (
        add_train,
        lambda *given: _add_model_scoring(*given, "evaluate", _add_ks),
        _add_sample,
        _add_plot,
        _add_compare,
        lambda *given: _add_model_scoring(*given, "gaps", _add_steps),
    )
    for add in adders:
        arguments = add(commands, track_explicit)
        add_common(arguments, arguments.parser.prog.split()[-1])
    return parser
