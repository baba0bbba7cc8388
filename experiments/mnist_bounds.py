"""Study: variational bounds on statically binarized MNIST (issue 4, study 1 and the final
bounds of study 3).

Architecture of Burda et al. (2016): MLP 784-200-200-50 with tanh, Bernoulli likelihood,
50 latent dimensions. Rows: VAE with Monte Carlo KL, VAE with analytic KL, IWAE k=5,
IWAE k=50, DReG-IWAE k=50. Each row trains with the same seed, checkpointing every epoch
(a killed run continues with the same command), under an optional wall-time budget, then is
evaluated on the test split with K importance samples.

Burda et al. train for 3280 epochs; a run with fewer epochs is reported as such ("short run,
not converged"), never as a converged result.

Example (from a plain checkout; the data directory holds binarized_mnist.npz)::

    PYROVAE_DATA_DIR=../shared/data python experiments/mnist_bounds.py \\
        --epochs 10 --eval-points 1000 --eval-samples 5000 --out runs/mnist_bounds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.data import load_binarized_mnist  # noqa: E402

PROTOCOL_EPOCHS = 3280
ROWS = {
    "vae_mc_kl": {"objective": "trace_elbo", "num_particles": 1, "label": "VAE, MC KL"},
    "vae_analytic_kl": {
        "objective": "trace_meanfield_elbo",
        "num_particles": 1,
        "label": "VAE, analytic KL",
    },
    "iwae_5": {"objective": "iwae", "num_particles": 5, "label": "IWAE k=5"},
    "iwae_50": {"objective": "iwae", "num_particles": 50, "label": "IWAE k=50"},
    "dreg_50": {"objective": "dreg", "num_particles": 50, "label": "DReG-IWAE k=50"},
}
ARCHITECTURE = {
    "latent_dim": 50,
    "hidden_sizes": (200, 200),
    "activation": "tanh",
    "likelihood": "bernoulli",
}


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def train_row(name: str, data, args) -> tuple[VAE, dict]:
    """Train one row epoch by epoch (resuming its checkpoint) until done or out of time."""
    spec = ROWS[name]
    checkpoint = args.out / f"{name}.pt"
    config = VAEConfig(num_features=784, image_shape=(28, 28), **ARCHITECTURE)
    options = {
        "objective": spec["objective"],
        "num_particles": spec["num_particles"],
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "device": args.device,
        "progress": False,
    }
    started, epochs_done, vae = time.perf_counter(), 0, VAE(config)
    if checkpoint.exists():
        epochs_done = len(VAE.load(checkpoint).history_ or [])
    while epochs_done < args.epochs:
        vae = VAE(config)
        vae.fit(
            data.train,
            data.valid,
            checkpoint_path=checkpoint,
            resume=epochs_done > 0,
            epochs=epochs_done + 1,
            **options,
        )
        epochs_done += 1
        last = vae.history_.records[-1]
        print(
            f"{name}: epoch {epochs_done} valid ELBO {last['valid_elbo']:.2f} "
            f"({last['seconds']:.1f} s)",
            flush=True,
        )
        if args.time_budget and time.perf_counter() - started > args.time_budget * 60:
            break
    vae = VAE.load(checkpoint, device=args.device)
    seconds = sum(vae.history_.column("seconds"))
    return vae, {"epochs": len(vae.history_), "train_seconds": seconds}


def evaluate_row(vae: VAE, test: torch.Tensor, args) -> dict:
    result = vae.evaluate(
        test,
        num_samples=args.eval_samples,
        ks=(1, 50),
        seed=args.seed,
        max_pairs=args.max_pairs,
        progress=not args.quiet,
    )
    summary = {row["quantity"]: row for row in result.summary()}
    return {
        "test_log_px": summary["log_px"]["mean"],
        "test_log_px_se": summary["log_px"]["se"],
        "test_elbo": summary["elbo"]["mean"],
        "test_elbo_analytic": summary["elbo_analytic"]["mean"],
        "test_iwae_50": summary["iwae_50"]["mean"],
        "gap": summary["gap"]["mean"],
        "active_units": result.latent["z"].active_units,
        "share_khat_above_0.7": result.share_high_khat,
        "mean_log_px_mc_se": float(result.per_datapoint["log_px_se"].mean()),
    }


def markdown(results: dict, args) -> str:
    lines = [
        f"Test points: {args.eval_points} of 10000; K = {args.eval_samples} importance samples; "
        f"hardware: {hardware()}; torch {torch.__version__}.",
        "",
        f"| model | test log p(x) (K={args.eval_samples}) | test ELBO | test IWAE-50 | gap | "
        "active units | epochs | train wall time | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        status = "protocol length" if r["epochs"] >= PROTOCOL_EPOCHS else "short run, not converged"
        lines.append(
            f"| {ROWS[name]['label']} | {r['test_log_px']:.2f} ± {r['test_log_px_se']:.2f} | "
            f"{r['test_elbo']:.2f} | {r['test_iwae_50']:.2f} | {r['gap']:.2f} | "
            f"{r['active_units']} | {r['epochs']} | {r['train_seconds'] / 60:.1f} min | {status} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--epochs", type=int, default=PROTOCOL_EPOCHS)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="minutes of training per row; stops after the epoch that exceeds it",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument(
        "--eval-points",
        type=int,
        default=10000,
        help="evaluate on this many test points (a fixed random subset)",
    )
    parser.add_argument("--max-pairs", type=int, default=2**18)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_binarized_mnist(args.data_dir)
    subset = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[: args.eval_points]
    results = {}
    for name in args.rows.split(","):
        vae, record = train_row(name, data, args)
        record.update(evaluate_row(vae, data.test[subset.sort().values], args))
        record["hardware"] = hardware()
        results[name] = record
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=2))
        print(json.dumps({name: record}), flush=True)
    table = markdown(results, args)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
