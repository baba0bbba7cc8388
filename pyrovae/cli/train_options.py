"""The options of ``pyrovae train`` (torch-free, like the rest of the parser), as tables:
each VAEConfig and TrainConfig option once, with its flag, field, type or choices, metavar
and help; :mod:`pyrovae.cli.train` reads the same tables to map flags to fields."""

from __future__ import annotations

from pathlib import Path

from pyrovae.cli import names
from pyrovae.cli.parser import (
    COMPILE_MODES,
    Arguments,
    _count,
    _positive_int,
    _positive_ints,
    add_data,
    add_device,
    add_seed,
    command_parser,
)

MODEL_OPTIONS = (  # flag, VAEConfig field, type or choices, metavar, help
    ("--likelihood", "likelihood", names.LIKELIHOODS, None, "observation model p(x|z)"),
    ("--latent-dim", "latent_dim", _positive_int, "L", "dimensions of the latent variable z"),
    ("--hidden", "hidden_sizes", _positive_ints, "W,W,...",
     "widths of the encoder's hidden layers, comma-separated (decoder: reversed)"),
    ("--activation", "activation", names.ACTIVATIONS, None, "hidden activation"),
    ("--network", "network", ("mlp", "conv"), None,
     "encoder and decoder: fully connected, or convolutional (images with sides divisible by "
     "4)"),
    ("--prior", "prior", names.PRIORS, None,
     "p(z): standard normal, learned normal, Gaussian mixture or VampPrior"),
    ("--prior-components", "prior_components", _positive_int, "N",
     "components of the mixture prior, pseudo-inputs of the VampPrior"),
    ("--guide", "guide", names.POSTERIORS, None,
     "q(z|x): diagonal, full (Cholesky) or low-rank Gaussian, or inverse autoregressive "
     "flows"),
    ("--guide-rank", "guide_rank", _positive_int, "R",
     "rank of the low-rank guide's covariance factor (below --latent-dim)"),
    ("--flows", "num_flows", _count, "N", "inverse autoregressive flows of the flow guide"),
    ("--top-latent-dim", "top_latent_dim", _positive_int, "L2",
     "dimensions of a second stochastic layer z2 above z (none: one layer)"),
    ("--top-hidden", "top_hidden_sizes", _positive_ints, "W,W,...", "widths of the networks "
     "between z and z2"),
)  # fmt: skip

TRAIN_OPTIONS = (  # flag, TrainConfig field, type or choices, metavar, help
    ("--objective", "objective", names.OBJECTIVES, None, "training objective"),
    ("--particles", "num_particles", _positive_int, "K", "draws of z per data point per step"),
    ("--epochs", "epochs", _positive_int, "N",
     "passes over the training data (a maximum under --lr-schedule plateau)"),
    ("--batch-size", "batch_size", _positive_int, "B", "data points per step"),
    ("--lr", "learning_rate", float, None, "Adam step size"),
    ("--lr-schedule", "lr_schedule", ("constant", "plateau"), None,
     "'plateau': multiply the step size by --lr-decay after --lr-patience epochs without a "
     "better validation ELBO, stop below --min-lr"),
    ("--lr-decay", "lr_decay", float, "F", "factor in (0, 1) applied to the step size at each "
     "plateau"),
    ("--lr-patience", "lr_patience", _positive_int, "N", "epochs without a better validation "
     "ELBO before a decay"),
    ("--min-lr", "min_learning_rate", float, "LR", "smallest step size; a decay below it ends "
     "training (converged)"),
    ("--clip-norm", "clip_norm", float, "NORM", "clip the gradients' global 2-norm to this "
     "value (none: no clipping)"),
    ("--renyi-alpha", "renyi_alpha", float, "A", "order alpha of the renyi objective"),
    ("--beta", "beta", float, "B", "KL weight of annealed_meanfield_elbo"),
    ("--kl-warmup-epochs", "kl_warmup_epochs", _count, "N", "epochs of linear KL warm-up "
     "(annealed_meanfield_elbo)"),
    ("--free-bits", "free_bits", float, "NATS", "KL in nats per latent dimension below which "
     "it is not penalised (annealed_meanfield_elbo)"),
    ("--compile", "compile", COMPILE_MODES, None,
     "'auto': the traced-graph fast path when the model traces (checked before training), "
     "else eager Pyro with a one-line warning; 'none': eager Pyro; 'graph': replay the "
     "traced ATen graph; 'inductor': also torch.compile it (pays on long runs)"),
    ("--on-nonfinite", "on_nonfinite", ("raise", "rollback"), None,
     "on a NaN/inf loss or gradient: stop, or roll back the epoch and halve the step size"),
)  # fmt: skip

RUN_OPTIONS = (  # flag, TrainConfig field, type, metavar, help
    ("--checkpoint-every", "checkpoint_every", _positive_int, "N", "write OUT/model.pt "
     "(atomically) every N epochs and at the end"),
)  # fmt: skip


def destination(flag: str) -> str:
    """The argparse destination of ``flag`` (``--latent-dim``: ``latent_dim``)."""
    return flag.lstrip("-").replace("-", "_")


def _add_table(group: Arguments, table: tuple, defaults: dict) -> None:
    for flag, field, kind, metavar, help in table:
        typed = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        if metavar is not None:
            typed["metavar"] = metavar
        group.add(flag, default=defaults[field], help=help, **typed)


def add_train(commands, track: bool) -> Arguments:
    top = command_parser(commands, "train", track)
    data = top.group("data")
    add_data(data, "digits")
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
    _add_table(model, MODEL_OPTIONS, names.VAE_DEFAULTS)
    fitting = top.group("training (TrainConfig)")
    _add_table(fitting, TRAIN_OPTIONS, names.TRAIN_DEFAULTS)
    add_seed(fitting, "seed of the weights, data order and draws")
    add_device(fitting)
    output = top.group("run directory")
    output.add("--out", type=Path, required=True, metavar="DIR", help="run directory")
    _add_table(output, RUN_OPTIONS, names.TRAIN_DEFAULTS)
    again = output.exclusive()
    again.add(
        "--resume", action="store_true", help="continue the run in OUT (same settings; "
        "--epochs may grow)",
    )  # fmt: skip
    again.add(
        "--force",
        action="store_true",
        help="replace the run in OUT by a new one (without it, an OUT holding a model is "
        "refused); the old files are kept aside until the new run's first checkpoint",
    )
    return top
