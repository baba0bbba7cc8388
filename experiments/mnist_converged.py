"""Study: converged VAE bounds on statically binarized MNIST (issue 15, item 7).

Architecture of Burda et al. (2016): MLP 784-200-200-50 (tanh), Bernoulli likelihood, 50
latent dimensions, Adam from a learning rate of 1e-3, batch 100. Training runs to
convergence on the validation ELBO: the learning rate halves after ``--patience`` epochs
without a better validation ELBO and training stops when it would fall below
``--min-lr`` (``lr_schedule="plateau"``). The model of the best validation epoch is kept
(``best.pt``) and is the one evaluated.

Training checkpoints every epoch; the same command resumes a killed or stopped run
bitwise (the checkpoint holds the optimizer, RNG, data-order and schedule state), so a
converged number can be reached over several sessions::

    PYROVAE_DATA_DIR=../shared/data python experiments/mnist_converged.py train \\
        --objective trace_meanfield_elbo --out runs/mnist_converged/vae

Threads are pinned (``--threads``, default 1): on a busy 2-core machine torch's default of
two threads can be ten times slower than one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.data import load_binarized_mnist  # noqa: E402

ARCHITECTURE = {
    "num_features": 784,
    "image_shape": (28, 28),
    "latent_dim": 50,
    "hidden_sizes": (200, 200),
    "activation": "tanh",
    "likelihood": "bernoulli",
}


def train(args) -> None:
    """Train (or resume) one model to convergence on the validation ELBO."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint, best = args.out / "checkpoint.pt", args.out / "best.pt"
    data = load_binarized_mnist(args.data_dir)
    vae = VAE(VAEConfig(**ARCHITECTURE), seed=args.seed)
    started = time.perf_counter()
    history = vae.fit(
        data.train,
        data.valid,
        checkpoint_path=checkpoint,
        resume=checkpoint.exists(),
        best_path=best,
        objective=args.objective,
        num_particles=args.particles,
        epochs=args.max_epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule="plateau",
        lr_decay=args.decay,
        lr_patience=args.patience,
        min_learning_rate=args.min_lr,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        progress=not args.quiet,
    )
    records = history.records
    best_record = max(records, key=lambda record: record["valid_elbo"])
    summary = {
        "objective": args.objective,
        "particles": args.particles,
        "epochs": len(records),
        "best_epoch": best_record["epoch"],
        "best_valid_elbo": best_record["valid_elbo"],
        "final_learning_rate": records[-1]["learning_rate"],
        "converged": len(records) < args.max_epochs,
        "train_seconds_total": sum(record["seconds"] for record in records),
        "this_call_seconds": time.perf_counter() - started,
        "threads": args.threads,
        "compile": args.compile,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train or resume one model to convergence")
    trainer.add_argument("--objective", default="trace_meanfield_elbo")
    trainer.add_argument("--particles", type=int, default=1)
    trainer.add_argument("--max-epochs", type=int, default=3280)
    trainer.add_argument("--batch-size", type=int, default=100)
    trainer.add_argument("--lr", type=float, default=1e-3)
    trainer.add_argument("--decay", type=float, default=0.5)
    trainer.add_argument("--patience", type=int, default=10)
    trainer.add_argument("--min-lr", type=float, default=1e-5)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--device", default="auto")
    trainer.add_argument("--compile", default="inductor")
    trainer.add_argument("--threads", type=int, default=1)
    trainer.add_argument("--data-dir", default=None)
    trainer.add_argument("--quiet", action="store_true")
    trainer.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)


if __name__ == "__main__":
    main()
