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

Then evaluate the best model on the test images, each stage saved per point and skipped
when its file exists (a stopped evaluation resumes with the same command): importance
sampling with K draws in blocks of images (``is``), annealed importance sampling on a fixed
random subset (``ais``), bidirectional Monte Carlo on data simulated from the model for
several schedule lengths (``bdmc``), and the gap decomposition (``gaps``)::

    PYROVAE_DATA_DIR=../shared/data python experiments/mnist_converged.py evaluate \
        --run runs/mnist_converged/vae --stages is,ais,bdmc,gaps

``compare`` pairs two or more evaluated runs on the same test points (paired standard
errors of the per-point differences), and ``report`` prints the markdown tables.

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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.data import load_binarized_mnist  # noqa: E402
from pyrovae.evaluation.ais import ais, bdmc  # noqa: E402
from pyrovae.evaluation.comparison import compare  # noqa: E402
from pyrovae.evaluation.gaps import decompose_gaps  # noqa: E402

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
        data.train[: args.train_points],
        data.valid[: args.valid_points],
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


def subset(size: int, points: int) -> torch.Tensor:
    """A fixed random subset of test indices (the test split is sorted by digit class)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    return order[:points].sort().values


def save_stage(path: Path, columns: dict, info: dict) -> None:
    np.savez(path.with_suffix(".npz"), **{k: np.asarray(v) for k, v in columns.items()})
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")


def stage_is(vae, test, args, out: Path) -> None:
    """IS with K draws on the first ``--is-points`` of the fixed order, in resumable blocks."""
    index = subset(len(test), args.is_points)
    parts = []
    for block, start in enumerate(range(0, len(index), args.block)):
        path = out / f"is_block{block:03d}"
        if not path.with_suffix(".npz").exists():
            started = time.perf_counter()
            result = vae.evaluate(
                test[index[start : start + args.block]],
                num_samples=args.is_samples,
                ks=(1, 50),
                seed=args.seed + block,
                latent_diagnostics=False,
            )
            info = {"seconds": time.perf_counter() - started, "start": start}
            save_stage(path, result.per_datapoint, info)
            print(f"IS block {block}: {info['seconds']:.0f} s", flush=True)
        parts.append(dict(np.load(path.with_suffix(".npz"))))
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    columns["index"] = index.numpy()
    seconds = sum(
        json.loads((out / f"is_block{b:03d}.json").read_text())["seconds"]
        for b in range(len(parts))
    )
    info = {"points": len(index), "num_samples": args.is_samples, "seconds": seconds}
    info.update(mean_and_se(columns, ("log_px", "elbo", "elbo_analytic", "iwae_50")))
    info["share_khat_above_0.7"] = float(np.mean(columns["khat"] > 0.7))
    info["share_khat_above_0.5"] = float(np.mean(columns["khat"] > 0.5))
    save_stage(out / "is", columns, info)


def mean_and_se(columns: dict, names) -> dict:
    summary = {}
    for name in names:
        values = np.asarray(columns[name], dtype=np.float64)
        summary[name] = float(values.mean())
        summary[name + "_se"] = float(values.std(ddof=1) / np.sqrt(len(values)))
    return summary


def stage_ais(vae, test, args, out: Path) -> None:
    """AIS on the first ``--ais-points`` test images of the fixed random order, in saved
    blocks of ``--ais-block`` (block b: images b*B..(b+1)*B-1 of the order, seed + b), so
    that later runs extend earlier ones: block 0 is ``subset(N, B)``."""
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    settings = {"num_steps": args.ais_steps, "num_chains": args.ais_chains}
    blocks = []
    for block, start in enumerate(range(0, args.ais_points, args.ais_block)):
        path = out / f"ais_block{block:03d}"
        if not path.with_suffix(".npz").exists():
            index = order[start : min(start + args.ais_block, args.ais_points)].sort().values
            started = time.perf_counter()
            result = ais(
                vae.model,
                vae.guide,
                vae.inputs(test[index])[0],
                seed=args.seed + block,
                **settings,
            )
            columns = {
                "index": index.numpy(),
                "log_px": result.log_px,
                "log_px_se": result.log_px_se,
            }
            save_stage(path, columns, {**settings, "seconds": time.perf_counter() - started})
            print(f"AIS block {block}: {time.perf_counter() - started:.0f} s", flush=True)
        saved = json.loads(path.with_suffix(".json").read_text())
        if {k: saved[k] for k in settings} != settings:
            raise SystemExit(f"{path}.npz was computed with {saved}, not {settings}")
        blocks.append((dict(np.load(path.with_suffix(".npz"))), saved["seconds"]))
    columns = {k: np.concatenate([b[k] for b, _ in blocks]) for k in blocks[0][0]}
    info = {
        "points": len(columns["index"]),
        **settings,
        "seconds": sum(seconds for _, seconds in blocks),
        **mean_and_se(columns, ("log_px",)),
        "mean_chain_se": float(np.mean(columns["log_px_se"])),
    }
    save_stage(out / "ais", columns, info)


def stage_bdmc(vae, args, out: Path) -> None:
    widths = {}
    for steps in args.bdmc_steps:
        started = time.perf_counter()
        result = bdmc(
            vae.model,
            vae.guide,
            num_points=args.bdmc_points,
            num_steps=steps,
            num_chains=args.ais_chains,
            seed=args.seed,
        )
        widths[str(steps)] = {
            "mean_width": result.mean_width,
            "lower": float(np.mean(result.per_datapoint["lower"])),
            "upper": float(np.mean(result.per_datapoint["upper"])),
            "seconds": time.perf_counter() - started,
        }
        print(f"BDMC {steps} steps: width {result.mean_width:.3f} nats", flush=True)
    info = {"points": args.bdmc_points, "num_chains": args.ais_chains, "by_steps": widths}
    (out / "bdmc.json").write_text(json.dumps(info, indent=2) + "\n")


def stage_gaps(vae, test, args, out: Path) -> None:
    ais_file = out / "ais.npz"
    index = subset(len(test), args.gap_points)
    log_px = None
    if ais_file.exists():  # the better estimate of log p(x) where it covers these points
        saved = np.load(ais_file)
        position = {int(i): p for p, i in enumerate(saved["index"])}
        if all(int(i) in position for i in index):
            log_px = saved["log_px"][[position[int(i)] for i in index]]
    started = time.perf_counter()
    result = decompose_gaps(
        vae,
        test[index],
        log_px=log_px,
        num_samples=args.is_samples,
        seed=args.seed,
    )
    columns = {"index": index.numpy(), **result.per_datapoint}
    info = {
        "points": len(index),
        "log_px_from": "ais" if log_px is not None else "is",
        "seconds": time.perf_counter() - started,
        **mean_and_se(columns, ("inference_gap", "approximation_gap", "amortization_gap")),
    }
    save_stage(out / "gaps", columns, info)


def evaluate_run(args) -> None:
    torch.set_num_threads(args.threads)
    data = load_binarized_mnist(args.data_dir)
    vae = VAE.load(args.run / "best.pt")
    test = data.test.to(vae.dtype)
    stages = args.stages.split(",")
    if "is" in stages:
        stage_is(vae, test, args, args.run)
    if "ais" in stages:
        stage_ais(vae, test, args, args.run)
    if "bdmc" in stages and not (args.run / "bdmc.json").exists():
        stage_bdmc(vae, args, args.run)
    if "gaps" in stages and not (args.run / "gaps.npz").exists():
        stage_gaps(vae, test, args, args.run)


def compare_runs(args) -> None:
    """Paired comparison of evaluated runs on their common points (IS and AIS files)."""
    for stage in ("is", "ais"):
        files = {run.name: run / f"{stage}.npz" for run in args.runs}
        if not all(path.exists() for path in files.values()):
            continue
        loaded = {name: np.load(path) for name, path in files.items()}
        common = set.intersection(*(set(v["index"].tolist()) for v in loaded.values()))
        keep = sorted(common)
        arrays = {}
        for name, values in loaded.items():
            position = {int(i): p for p, i in enumerate(values["index"])}
            arrays[name] = values["log_px"][[position[i] for i in keep]]
        print(f"## {stage.upper()} log p_hat(x), {len(keep)} common test points\n")
        print(compare(arrays, quantity="log_px", pairs="all").table())


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
    trainer.add_argument("--train-points", type=int, default=None, help="default: all 50000")
    trainer.add_argument("--valid-points", type=int, default=None, help="default: all 10000")
    trainer.add_argument("--quiet", action="store_true")
    trainer.add_argument("--out", type=Path, required=True)
    evaluator = commands.add_parser("evaluate", help="evaluate a trained run's best model")
    evaluator.add_argument("--run", type=Path, required=True)
    evaluator.add_argument("--stages", default="is,ais,bdmc,gaps")
    evaluator.add_argument("--is-points", type=int, default=10000)
    evaluator.add_argument("--is-samples", type=int, default=5000)
    evaluator.add_argument("--block", type=int, default=500, help="IS images per saved block")
    evaluator.add_argument("--ais-points", type=int, default=200)
    evaluator.add_argument("--ais-steps", type=int, default=1000)
    evaluator.add_argument("--ais-chains", type=int, default=16)
    evaluator.add_argument("--ais-block", type=int, default=100, help="AIS images per block")
    evaluator.add_argument("--bdmc-points", type=int, default=50)
    evaluator.add_argument(
        "--bdmc-steps", type=lambda text: [int(v) for v in text.split(",")], default=[100, 1000]
    )
    evaluator.add_argument("--gap-points", type=int, default=200)
    evaluator.add_argument("--seed", type=int, default=0)
    evaluator.add_argument("--threads", type=int, default=1)
    evaluator.add_argument("--data-dir", default=None)
    comparer = commands.add_parser("compare", help="paired comparison of evaluated runs")
    comparer.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)
    elif args.command == "evaluate":
        evaluate_run(args)
    else:
        compare_runs(args)


if __name__ == "__main__":
    main()
