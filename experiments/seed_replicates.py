"""Study: seed replicates of VAE and IWAE k=5 on statically binarized MNIST (issue 23).

A cheaper protocol than ``mnist_converged.py``, sized to run in about half an hour on one CPU
thread, so that the IWAE-minus-VAE difference carries the variability between training runs:

* **Models.** MLP 784-H-L (tanh; default H = 100 hidden units, L = 20 latent dimensions),
  Bernoulli likelihood, diagonal-Normal guide; each file is well under 1 MB (parameters only,
  no optimizer state). Objectives: the ELBO with analytic KL (``trace_meanfield_elbo``) and
  IWAE with k = 5; seeds 0, 1, 2 of each (``--seeds``). Adam, learning rate 1e-3, batch 100,
  ``--epochs`` (30) epochs on the 50000 training images, the epoch of the best validation ELBO
  kept (``best_path``). Not converged: see docs/results.md for how this differs from the
  converged protocol (784-200-200-50, about 400 epochs, learning-rate plateaus).
* **Importance sampling.** K = ``--is-samples`` draws from each model's guide on a fixed
  random subset of ``--test-points`` test images (the same images for every model), seed 0.
  Paired comparison IWAE - VAE within each seed (SE over test images) and the difference
  of the seed means with its between-seed standard error.
* **AIS.** On the first ``--ais-points`` images of that subset, for seed 0 of each objective:
  AIS from the guide and AIS from the prior (T = ``--ais-steps``, 16 chains), the per-image
  AIS - IS correction with a percentile bootstrap interval for its mean (B = 10000
  resamples of the images), and the time per image per 1000 steps.
* **Gap optimisation.** The gap decomposition on the same images for the seed-0 VAE with
  250 and 1000 per-image Adam steps (log p(x) from AIS from the guide): the approximation
  gap must not move between the two if the per-image optimisation converged.

Model files are written to ``--models`` (skipped and reused when present, so the report can
be re-run from the committed files), with their sha256, the git commit and the sha256 of the
data file printed at the end. Every number docs/results.md quotes from this study is printed
by::

    OMP_NUM_THREADS=1 PYROVAE_DATA_DIR=../shared/data python experiments/seed_replicates.py \\
        --threads 1 --models experiments/seed_replicates
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.data import BINARIZED_MNIST_NPZ, load_binarized_mnist, resolve_data_dir  # noqa: E402
from pyrovae.evaluation.ais import ais  # noqa: E402
from pyrovae.evaluation.gaps import decompose_gaps  # noqa: E402

OBJECTIVES = {"vae": ("trace_meanfield_elbo", 1), "iwae5": ("iwae", 5)}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_one(name: str, seed: int, data, args) -> Path:
    """Train one model (or reuse its file) and return the path of the best-epoch model."""
    path = args.models / f"{name}_seed{seed}.pt"
    if path.exists():
        return path
    objective, particles = OBJECTIVES[name]
    config = VAEConfig(
        num_features=784,
        image_shape=(28, 28),
        latent_dim=args.latent,
        hidden_sizes=(args.hidden,),
        activation="tanh",
        likelihood="bernoulli",
    )
    vae = VAE(config, seed=seed)
    started = time.perf_counter()
    best = args.models / f"{name}_seed{seed}.best.tmp"
    history = vae.fit(
        data.train[: args.train_points],
        data.valid[: args.valid_points],
        best_path=best,
        objective=objective,
        num_particles=particles,
        epochs=args.epochs,
        batch_size=100,
        learning_rate=1e-3,
        seed=seed,
        compile="graph",
        progress=False,
    )
    best_epoch = max(history.records, key=lambda r: r["valid_elbo"])["epoch"]
    model = VAE.load(best)
    model.history_ = history  # the whole run's history, for the record
    model.save(path, include_training_state=False)
    best.unlink()
    print(
        f"trained {path.name}: {len(history)} epochs (best {best_epoch}), "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return path


def training_summary(models: dict) -> None:
    """Epochs, the epoch kept and its validation ELBO, from the history saved in each file."""
    print("\n## Training (from the histories in the model files)")
    print("model            epochs  kept  valid ELBO (kept)  train seconds")
    for (name, seed), vae in sorted(models.items()):
        records = vae.history_.records
        kept = max(records, key=lambda r: r["valid_elbo"])
        seconds = sum(r["seconds"] for r in records)
        print(
            f"{name}_seed{seed:<6} {len(records):>6}  {kept['epoch']:>4}  "
            f"{kept['valid_elbo']:17.2f}"
            f"  {seconds:13.0f}"
        )


def test_subset(size: int, points: int) -> torch.Tensor:
    """The same fixed random subset of test indices as mnist_converged.py (seed 0)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    return order[:points].sort().values


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def bootstrap_interval(values, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampling the points)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def importance_sampling(models: dict, test: torch.Tensor, args) -> dict:
    results = {}
    for key, vae in models.items():
        started = time.perf_counter()
        result = vae.evaluate(
            test, num_samples=args.is_samples, ks=(1,), seed=0, latent_diagnostics=False
        )
        results[key] = result.per_datapoint
        mean, se = mean_se(result.per_datapoint["log_px"])
        khat = np.mean(result.per_datapoint["khat"] > 0.7)
        print(
            f"IS {key}: log p_hat {mean:.2f} ± {se:.2f}, ELBO "
            f"{np.mean(result.per_datapoint['elbo_analytic']):.2f}, k-hat > 0.7 {khat:.1%} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return results


def seed_comparison(is_results: dict, seeds) -> None:
    print(f"\n## IWAE k=5 - VAE by IS, K = {ARGS.is_samples}, {ARGS.test_points} test images")
    print("seed  VAE log p_hat  IWAE log p_hat  IWAE - VAE  paired SE  unpaired SE")
    differences = []
    for seed in seeds:
        vae = is_results[("vae", seed)]["log_px"]
        iwae = is_results[("iwae5", seed)]["log_px"]
        difference, paired_se = mean_se(iwae - vae)
        unpaired = float(np.sqrt(mean_se(vae)[1] ** 2 + mean_se(iwae)[1] ** 2))
        differences.append(difference)
        print(
            f"{seed:>4}  {vae.mean():13.2f}  {iwae.mean():14.2f}  {difference:+10.2f}  "
            f"{paired_se:9.3f}  {unpaired:11.2f}"
        )
    vae_means = [is_results[("vae", s)]["log_px"].mean() for s in seeds]
    iwae_means = [is_results[("iwae5", s)]["log_px"].mean() for s in seeds]
    count = len(seeds)
    between = np.sqrt(np.var(vae_means, ddof=1) / count + np.var(iwae_means, ddof=1) / count)
    print(
        f"mean over {len(seeds)} seeds: VAE {np.mean(vae_means):.2f} (seed sd "
        f"{np.std(vae_means, ddof=1):.2f}), IWAE k=5 {np.mean(iwae_means):.2f} (seed sd "
        f"{np.std(iwae_means, ddof=1):.2f})"
    )
    print(
        f"IWAE - VAE: {np.mean(differences):+.2f}, between-seed SE {between:.2f} "
        f"({len(seeds)} independent runs of each objective; sd of the per-seed differences "
        f"{np.std(differences, ddof=1):.2f})"
    )


def ais_study(models: dict, is_results: dict, test: torch.Tensor, args) -> dict:
    points = min(args.ais_points, len(test))
    print(f"\n## AIS on the first {points} images of the subset, T = {args.ais_steps}, 16 chains")
    print(
        "model       start  AIS log p_hat  chain SE  AIS - IS   95% bootstrap   "
        "s/image/1000 steps"
    )
    guide_ais = {}
    for key in (("vae", 0), ("iwae5", 0)):
        vae = models[key]
        for start in ("guide", "prior"):
            started = time.perf_counter()
            result = ais(
                vae.model,
                vae.guide,
                vae.inputs(test[:points])[0],
                num_steps=args.ais_steps,
                num_chains=16,
                start=start,
                seed=0,
            )
            seconds = time.perf_counter() - started
            log_px = result.log_px
            correction = log_px - is_results[key]["log_px"][:points]
            low, high = bootstrap_interval(correction)
            mean, _ = mean_se(log_px)
            print(
                f"{key[0]}_seed{key[1]:<3} {start:<6} {mean:13.2f}  "
                f"{np.mean(result.log_px_se):8.3f}  "
                f"{correction.mean():+8.2f}   [{low:+.2f}, {high:+.2f}]   "
                f"{seconds / points * 1000 / args.ais_steps:.1f}",
                flush=True,
            )
            if start == "guide":
                guide_ais[key] = log_px
            else:
                gap, gap_se = mean_se(guide_ais[key] - log_px)
                print(f"    guide - prior start (paired): {gap:+.3f} ± {gap_se:.3f}")
    difference, paired_se = mean_se(guide_ais[("iwae5", 0)] - guide_ais[("vae", 0)])
    print(f"IWAE - VAE by AIS from the guide, seed 0: {difference:+.2f}, paired SE {paired_se:.2f}")
    return guide_ais


def gap_convergence(vae, log_px: np.ndarray, test: torch.Tensor) -> None:
    print("\n## Gap decomposition, VAE seed 0, log p(x) from AIS (guide start)")
    print("Adam steps  inference gap  approximation gap  amortization gap  converged")
    for steps in (250, 1000):
        result = decompose_gaps(
            vae, test[: len(log_px)], log_px=log_px, steps=steps, num_samples=1000, seed=0
        )
        columns = result.per_datapoint
        print(
            f"{steps:>10}  {mean_se(columns['inference_gap'])[0]:13.2f}  "
            f"{mean_se(columns['approximation_gap'])[0]:11.2f} ± "
            f"{mean_se(columns['approximation_gap'])[1]:.2f}  "
            f"{mean_se(columns['amortization_gap'])[0]:16.2f}  {result.convergence.converged}"
        )


def provenance(paths: dict, data_dir, commit: str) -> None:
    print("\n## Files")
    print(f"git commit of the code (at the start of this run): {commit}")
    data_file = resolve_data_dir(data_dir) / BINARIZED_MNIST_NPZ
    if data_file.is_file():
        print(f"data {data_file.name}: sha256 {sha256(data_file)}")
    for _key, path in sorted(paths.items()):
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB, sha256 {sha256(path)}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("experiments/seed_replicates"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--latent", type=int, default=20)
    parser.add_argument("--train-points", type=int, default=None, help="default: all 50000")
    parser.add_argument("--valid-points", type=int, default=None, help="default: all 10000")
    parser.add_argument("--test-points", type=int, default=500)
    parser.add_argument("--is-samples", type=int, default=1000)
    parser.add_argument("--ais-points", type=int, default=20)
    parser.add_argument("--ais-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    global ARGS
    args = ARGS = parse(argv)
    commit = git_commit()
    torch.set_num_threads(args.threads)
    args.models.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_binarized_mnist(args.data_dir)
    paths = {(n, s): train_one(n, s, data, args) for n in OBJECTIVES for s in seeds}
    models = {key: VAE.load(path) for key, path in paths.items()}
    test = data.test[test_subset(len(data.test), args.test_points)].float()
    print(
        f"\nmodels: 784-{args.hidden}-{args.latent} (tanh), {args.epochs} epochs; "
        f"torch threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    training_summary(models)
    is_results = importance_sampling(models, test, args)
    seed_comparison(is_results, seeds)
    guide_ais = ais_study(models, is_results, test, args)
    gap_convergence(models[("vae", 0)], guide_ais[("vae", 0)], test)
    provenance(paths, args.data_dir, commit)


ARGS = None

if __name__ == "__main__":
    main()
