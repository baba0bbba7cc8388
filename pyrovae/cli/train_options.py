"""The options of ``pyrovae train`` (torch-free, like the rest of the parser)."""

from __future__ import annotations

from pathlib import Path

from pyrovae.cli import names
from pyrovae.cli.parser import (
    COMPILE_MODES,
    _count,
    _positive_int,
    _positive_ints,
    add_common,
    add_data,
    add_device,
    add_seed,
    command_parser,
)


def _vae_default(name: str):
    return names.VAE_DEFAULTS[name]


def _train_default(name: str):
    return names.TRAIN_DEFAULTS[name]


def add_train(commands, track: bool) -> None:
    top = command_parser(
        commands,
        "train",
        track,
        help="fit a VAE by SVI",
        description="Fit a VAE by stochastic variational inference and write OUT/model.pt "
        "(config, parameters, optimizer, history and resumable training state), "
        "OUT/history.jsonl and OUT/history.csv. ELBOs are in nats per data point (higher is "
        "better). With --resume, options not given keep the values the run was written with.",
    )
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
    model.add(
        "--likelihood",
        choices=names.LIKELIHOODS,
        default=_vae_default("likelihood"),
        help="observation model p(x|z)",
    )
    model.add(
        "--latent-dim",
        type=_positive_int,
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
        choices=names.ACTIVATIONS,
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
        choices=names.PRIORS,
        default=_vae_default("prior"),
        help="p(z): standard normal, learned normal, Gaussian mixture or VampPrior",
    )
    model.add(
        "--prior-components",
        type=_positive_int,
        default=_vae_default("prior_components"),
        metavar="N",
        help="components of the mixture prior, pseudo-inputs of the VampPrior",
    )
    model.add(
        "--guide",
        choices=names.POSTERIORS,
        default=_vae_default("guide"),
        help="q(z|x): diagonal, full (Cholesky) or low-rank Gaussian, or inverse "
        "autoregressive flows",
    )
    model.add(
        "--guide-rank",
        type=_positive_int,
        default=_vae_default("guide_rank"),
        metavar="R",
        help="rank of the low-rank guide's covariance factor (below --latent-dim)",
    )
    model.add(
        "--flows",
        type=_count,
        default=_vae_default("num_flows"),
        metavar="N",
        help="inverse autoregressive flows of the flow guide",
    )
    model.add(
        "--top-latent-dim",
        type=_positive_int,
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
        choices=names.OBJECTIVES,
        default=_train_default("objective"),
        help="training objective",
    )
    fitting.add(
        "--particles",
        type=_positive_int,
        default=_train_default("num_particles"),
        metavar="K",
        help="draws of z per data point per step",
    )
    fitting.add(
        "--epochs",
        type=_positive_int,
        default=_train_default("epochs"),
        metavar="N",
        help="passes over the training data (a maximum under --lr-schedule plateau)",
    )
    fitting.add(
        "--batch-size",
        type=_positive_int,
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
        type=_positive_int,
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
        type=_count,
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
    add_seed(fitting, "seed of the weights, data order and draws")
    add_device(fitting)

    output = top.group("run directory")
    output.add("--out", type=Path, required=True, metavar="DIR", help="run directory")
    output.add(
        "--checkpoint-every",
        type=_positive_int,
        default=_train_default("checkpoint_every"),
        metavar="N",
        help="write OUT/model.pt (atomically) every N epochs and at the end",
    )
    exclusive = output.exclusive()
    exclusive.add(
        "--resume",
        action="store_true",
        help="continue the run in OUT (same settings; --epochs may grow)",
    )
    exclusive.add(
        "--force",
        action="store_true",
        help="replace the run in OUT by a new one (without it, an OUT holding a model is "
        "refused); the old files are kept aside until the new run's first checkpoint",
    )
    add_common(top)

