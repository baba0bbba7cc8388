"""Command line: ``pyrovae train``, ``evaluate``, ``sample`` and ``plot``.

Every command validates its arguments before reading or writing model files. Under
``torchrun`` with several processes, ``train`` and ``evaluate`` run data-parallel (see
:mod:`pyrovae.distributed`); only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pyrovae.data import DATASETS, SPLIT_NAMES, binarize, load_dataset, threshold
from pyrovae.distributed import active_context, init_from_environment, shutdown
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import ACTIVATIONS
from pyrovae.objectives import OBJECTIVES

MODEL_FILE = "model.pt"


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


def _add_data_arguments(parser: argparse.ArgumentParser, default_dataset: str | None) -> None:
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=default_dataset,
        help="dataset name (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="directory of data files (default: $PYROVAE_DATA_DIR)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fit a VAE by SVI")
    _add_data_arguments(train, "digits")
    train.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default="bernoulli")
    train.add_argument("--latent-dim", type=int, default=2)
    train.add_argument(
        "--hidden",
        type=_positive_ints,
        default=(256, 256),
        help="encoder hidden sizes, comma-separated (decoder: reversed)",
    )
    train.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    train.add_argument("--objective", choices=sorted(OBJECTIVES), default="trace_elbo")
    train.add_argument("--particles", type=int, default=1, help="samples of z per data point")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--clip-norm", type=float, default=None)
    train.add_argument("--binarize", choices=("none", "static", "dynamic"), default="none")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--out", type=Path, required=True, help="output directory")
    train.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="write OUT/model.pt every N epochs (atomically) and at the end",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/model.pt (same settings; --epochs may grow)",
    )
    train.add_argument(
        "--on-nonfinite",
        choices=("raise", "rollback"),
        default="raise",
        help="on a NaN/inf loss or gradient: stop, or roll back the epoch and "
        "halve the learning rate",
    )

    evaluate = commands.add_parser(
        "evaluate", help="importance-sampled log p(x), ELBOs and IWAE bounds per data point"
    )
    evaluate.add_argument("--model", type=Path, required=True)
    _add_data_arguments(evaluate, None)
    evaluate.add_argument("--split", choices=SPLIT_NAMES, default="test")
    evaluate.add_argument(
        "--num-samples",
        type=int,
        default=1000,
        help="K, draws of z per data point (5000 for published numbers)",
    )
    evaluate.add_argument(
        "--ks",
        type=_positive_ints,
        default=(1, 5, 50),
        help="IWAE_k group sizes, comma-separated (those above K are dropped)",
    )
    evaluate.add_argument(
        "--max-pairs",
        type=int,
        default=2**20,
        help="memory budget: most (draw, data point) pairs traced at once",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument(
        "--out", type=Path, default=None, help="write the per-datapoint results (CSV) here"
    )

    sample = commands.add_parser("sample", help="write a PNG grid of samples from the prior")
    sample.add_argument("--model", type=Path, required=True)
    sample.add_argument("--num", type=int, default=64)
    sample.add_argument(
        "--kind",
        choices=("mean", "observation"),
        default="mean",
        help="decoder means E[x|z] or sampled observations x ~ p(x|z)",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", type=Path, required=True, help="PNG file to write")

    plot = commands.add_parser("plot", help="write a figure of a saved model (PNG and PDF)")
    plot.add_argument(
        "kind",
        choices=("samples", "reconstructions", "curves", "latent", "manifold", "interpolation"),
        help="prior samples, data vs reconstructions, training curves, scatter of posterior "
        "means, decoded 2-D latent grid, or interpolations between posterior means",
    )
    plot.add_argument("--model", type=Path, required=True)
    plot.add_argument(
        "--out", type=Path, required=True, help="output path; each format's suffix is added"
    )
    _add_data_arguments(plot, None)
    plot.add_argument("--split", choices=SPLIT_NAMES, default="test")
    plot.add_argument(
        "--num",
        type=int,
        default=None,
        help="samples (64), images (16), points (2000), manifold grid size (15) or "
        "interpolation pairs (4)",
    )
    plot.add_argument("--seed", type=int, default=0)
    plot.add_argument(
        "--method",
        choices=("linear", "spherical"),
        default="linear",
        help="interpolation in latent space",
    )
    plot.add_argument("--formats", nargs="+", choices=("png", "pdf"), default=["png", "pdf"])
    return parser


def run_train(args: argparse.Namespace) -> int:
    from pyrovae import VAE, TrainConfig, VAEConfig

    dataset = load_dataset(args.dataset, args.data_dir)
    config = VAEConfig(
        num_features=dataset.num_features,
        latent_dim=args.latent_dim,
        hidden_sizes=args.hidden,
        activation=args.activation,
        likelihood=args.likelihood,
        image_shape=dataset.image_shape,
    )
    train_config = TrainConfig(
        objective=args.objective,
        num_particles=args.particles,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        clip_norm=args.clip_norm,
        binarize=args.binarize,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        checkpoint_every=args.checkpoint_every,
        on_nonfinite=args.on_nonfinite,
    )
    path = args.out / MODEL_FILE  # fit validates everything before this file or folder exists
    vae = VAE(config, seed=args.seed)
    vae.metadata_ = {"dataset": args.dataset}
    history = vae.fit(
        dataset.train,
        dataset.valid,
        checkpoint_path=path,
        resume=args.resume,
        **train_config.to_dict(),
    )
    if not _is_main_process():
        return 0
    history.to_jsonl(args.out / "history.jsonl")
    history.to_csv(args.out / "history.csv")
    last = history.records[-1]
    print(
        f"trained {len(history)} epochs in {sum(history.column('seconds')):.1f} s; "
        f"train ELBO {last['train_elbo']:.2f}, validation ELBO {last['valid_elbo']:.2f} "
        f"nats per data point"
    )
    print(f"wrote {path}, {args.out / 'history.jsonl'}, {args.out / 'history.csv'}")
    return 0


def evaluation_data(vae, dataset_name: str, data_dir, split: str, seed: int) -> torch.Tensor:
    """The split a saved model is evaluated on, binarized the way it was trained.

    Dynamic binarization is evaluated on one fixed Bernoulli draw (seeded).
    """
    data, _ = load_dataset(dataset_name, data_dir).split(split)
    mode = vae.train_config_.binarize if vae.train_config_ is not None else "none"
    if mode == "static":
        return threshold(data)
    if mode == "dynamic":
        return binarize(data, generator=torch.Generator().manual_seed(seed))
    return data


def _is_main_process() -> bool:
    parallel = active_context()
    return parallel is None or parallel.is_main


def _dataset_of(vae, requested: str | None) -> str:
    name = requested or vae.metadata_.get("dataset")
    if name is None:
        raise SystemExit("error: the model file does not record its dataset; pass --dataset")
    return name


def run_evaluate(args: argparse.Namespace) -> int:
    from pyrovae import VAE
    from pyrovae.training import resolve_device

    if args.num_samples < 1:
        raise SystemExit(f"error: --num-samples must be positive, got {args.num_samples}")
    ks = tuple(k for k in args.ks if k <= args.num_samples)
    device, parallel = resolve_device(args.device), active_context()
    vae = VAE.load(args.model, device=device if parallel is None else parallel.device(device))
    data = evaluation_data(
        vae, _dataset_of(vae, args.dataset), args.data_dir, args.split, args.seed
    )
    main_process = _is_main_process()
    if main_process:
        print(f"{args.split} split of {_dataset_of(vae, args.dataset)}")
    result = vae.evaluate(
        data,
        num_samples=args.num_samples,
        ks=ks,
        seed=args.seed,
        max_pairs=args.max_pairs,
        progress=main_process and not args.quiet,
    )
    if not main_process:
        return 0
    print(result.table())
    if args.out is not None:
        result.to_csv(args.out)
        print(f"wrote per-datapoint results to {args.out}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from pyrovae import VAE
    from pyrovae.plots import save_image_grid

    if args.num < 1:
        raise SystemExit(f"error: --num must be positive, got {args.num}")
    vae = VAE.load(args.model)
    if vae.config.image_shape is None:
        raise SystemExit("error: this model's data are not images (no image_shape in its config)")
    means, observations = vae.sample(args.num, seed=args.seed)
    images = means if args.kind == "mean" else observations
    print(f"wrote {save_image_grid(images, args.out, vae.config.image_shape)}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from pyrovae import VAE
    from pyrovae.plots import DATA_FIGURE_KINDS, model_figure, save_figure

    if args.num is not None and args.num < 1:
        raise SystemExit(f"error: --num must be positive, got {args.num}")
    vae = VAE.load(args.model)
    data = labels = None
    if args.kind in DATA_FIGURE_KINDS:
        name = _dataset_of(vae, args.dataset)
        data = evaluation_data(vae, name, args.data_dir, args.split, args.seed)
        if args.kind == "latent":
            labels = load_dataset(name, args.data_dir).split(args.split)[1]
    figure = model_figure(
        args.kind, vae, data, labels, num=args.num, seed=args.seed, method=args.method
    )
    paths = save_figure(figure, args.out, formats=args.formats)
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


PARALLEL_COMMANDS = ("train", "evaluate")
"""Commands that run data-parallel under ``torchrun``."""

COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "sample": run_sample,
    "plot": run_plot,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joined = args.command in PARALLEL_COMMANDS and active_context() is None
    try:
        joined = joined and init_from_environment() is not None
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if joined:
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
