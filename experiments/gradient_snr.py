"""Study: signal-to-noise ratio of gradient estimators as the number of particles K grows
(issue 4, study 2), and the variance of the ELBO gradient with Monte Carlo versus analytic
KL (study 3).

For a VAE trained briefly on the 8x8 digits, and one fixed minibatch, each estimator's
gradient is drawn R times; per parameter coordinate, SNR = |mean| / standard deviation over
the R draws. The median over the coordinates of the guide (encoder) and of the model
(decoder) is reported per K. Rainforth et al. (2018) show that for IWAE the guide's SNR
falls like 1/sqrt(K) for large K while the model's grows like sqrt(K); Tucker et al.
(2019) report, empirically, that DReG's guide SNR does not fall that way.

Uncertainty. Each median SNR comes with a 95% bias-corrected percentile bootstrap interval
over the R replicates (B resamples of the R gradient draws; settings drawn with the same
seed and the same number of particles share their random numbers, so comparisons between
them resample the same replicates). |mean| / sd is biased upwards when the true SNR is
small: with a true mean of zero its median over coordinates is about 0.674 / sqrt(R) (the
"noise floor", 0.048 for R = 200). The column "debiased" replaces each coordinate's SNR^2
by max(0, SNR^2 - 1/R) (E[mean^2] = mu^2 + sd^2 / R) before taking the median. The slope
of log SNR against log K (least squares over the K values) is compared with the -1/2 and
+1/2 of the asymptotic theory. The intervals cover the Monte Carlo noise of one trained
model and one minibatch only; --seeds repeats the study for other training seeds.

Example::

    python experiments/gradient_snr.py --replicates 200 --seeds 0,1,2,3,4 --out runs/gradient_snr

(about 25 s per seed on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyrovae import VAE  # noqa: E402
from pyrovae.data import binarize, load_digits  # noqa: E402
from pyrovae.objectives import make_objective  # noqa: E402

SNR_OBJECTIVES = ("iwae", "dreg", "stl")


def gradient_draws(
    vae: VAE, x: torch.Tensor, objective: str, num_particles: int, replicates: int, seed: int
) -> dict[str, np.ndarray]:
    """R gradient estimates, flattened per part: {"guide": (R, P_guide), "model": (R, P_model)}."""
    loss_module = make_objective(objective, num_particles)(vae.model, vae.guide)
    parts = {"guide": list(vae.guide.parameters()), "model": list(vae.model.parameters())}
    draws = {name: [] for name in parts}
    pyro.set_rng_seed(seed)
    for _ in range(replicates):
        vae.zero_grad(set_to_none=True)
        (loss_module(x) / x.shape[0]).backward()
        for name, params in parts.items():
            draws[name].append(torch.cat([p.grad.flatten() for p in params]).numpy().copy())
    return {name: np.stack(values).astype(np.float64) for name, values in draws.items()}


def median_snr(draws: np.ndarray) -> float:
    spread = draws.std(0, ddof=1)
    keep = spread > 0
    return float(np.median(np.abs(draws.mean(0))[keep] / spread[keep]))


def debiased_median_snr(draws: np.ndarray) -> float:
    """Median over coordinates of sqrt(max(0, SNR^2 - 1/R)): the upward bias of |mean| / sd
    from the noise in the mean of R draws removed (E[mean^2] = mu^2 + sd^2 / R)."""
    spread = draws.std(0, ddof=1)
    keep = spread > 0
    snr2 = (draws.mean(0)[keep] / spread[keep]) ** 2
    return float(np.median(np.sqrt(np.clip(snr2 - 1.0 / draws.shape[0], 0.0, None))))


def noise_floor(replicates: int) -> float:
    """Median |mean| / sd over coordinates whose true mean is zero: median |t_(R-1)| / sqrt(R)."""
    from scipy import stats

    return float(stats.t.ppf(0.75, replicates - 1) / np.sqrt(replicates))


def total_variance(draws: np.ndarray) -> float:
    """Sum over coordinates of the per-coordinate variance of the gradient estimate."""
    return float(draws.var(0, ddof=1).sum())


def resample_counts(replicates: int, resamples: int, seed: int) -> np.ndarray:
    """(B, R) multinomial counts: row b says how often each replicate enters resample b."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(replicates, np.full(replicates, 1.0 / replicates), size=resamples)


def bootstrap_moments(draws: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample and coordinate: mean and unbiased variance of the resampled draws."""
    replicates = draws.shape[0]
    mean = counts @ draws / replicates
    second = counts @ (draws**2) / replicates
    variance = np.clip(second - mean**2, 0.0, None) * replicates / (replicates - 1)
    return mean, variance


def bootstrap_median_snr(draws: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The median SNR of each bootstrap resample, shape (B,)."""
    mean, variance = bootstrap_moments(draws, counts)
    spread = np.sqrt(variance)
    ratio = np.where(spread > 0, np.abs(mean) / np.where(spread > 0, spread, 1.0), np.nan)
    return np.nanmedian(ratio, axis=1)


def bootstrap_total_variance(draws: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return bootstrap_moments(draws, counts)[1].sum(1)


def interval(values: np.ndarray, estimate: float) -> list[float]:
    """95% bias-corrected percentile bootstrap interval (Efron, 1981).

    |mean| / sd is biased upwards, and a resample, which repeats replicates, is noisier than
    the sample, so the plain percentile interval sits too high and may exclude the estimate.
    The correction shifts the quantiles by z0 = Phi^-1(share of replicates below the estimate).
    """
    from scipy import stats

    values = np.asarray(values, dtype=float)
    below = (np.sum(values < estimate) + 0.5 * np.sum(values == estimate)) / len(values)
    below = np.clip(below, 1.0 / (len(values) + 1), len(values) / (len(values) + 1))
    z0 = stats.norm.ppf(below)
    levels = stats.norm.cdf(2 * z0 + stats.norm.ppf([0.025, 0.975]))
    low, high = np.quantile(values, levels)
    return [float(low), float(high)]


def log_slope(ks: list[int], snrs: np.ndarray) -> np.ndarray:
    """Least-squares slope of log SNR on log K; ``snrs`` has shape (len(ks), B) or (len(ks),)."""
    x = np.log(np.asarray(ks, dtype=float))
    x = x - x.mean()
    y = np.log(snrs)
    y = y - y.mean(0)
    return (x @ y) / (x @ x)


def trained_vae(args) -> tuple[VAE, torch.Tensor]:
    digits = load_digits()
    # seed= fixes the initial weights (without it they depend on the global RNG and a rerun
    # trains a different model); fit(seed=) the data order, binarizations and draws.
    vae = VAE(
        num_features=64, latent_dim=args.latent_dim, hidden_sizes=(args.hidden,), seed=args.seed
    )
    vae.fit(
        digits.train,
        digits.valid,
        binarize="dynamic",
        epochs=args.train_epochs,
        batch_size=64,
        seed=args.seed,
        progress=False,
    )
    x = binarize(digits.test[: args.batch], generator=torch.Generator().manual_seed(args.seed))
    return vae, x


def snr_study(vae, x, args) -> tuple[list[dict], dict]:
    """Median SNR per (objective, K) with bootstrap intervals, and the bootstrap replicates
    ``{(objective, K, part): (B,) array}`` for derived comparisons."""
    rows, boots = [], {}
    # One set of resample indices for every setting: settings with the same seed and K use
    # the same random numbers (paired), so comparing them needs the same resamples.
    counts = resample_counts(args.replicates, args.bootstrap, args.seed + 1)
    for objective in SNR_OBJECTIVES:
        for k in args.ks:
            draws = gradient_draws(vae, x, objective, k, args.replicates, args.seed)
            row = {"objective": objective, "K": k}
            for part in ("guide", "model"):
                boots[(objective, k, part)] = bootstrap_median_snr(draws[part], counts)
                row[f"{part}_snr"] = median_snr(draws[part])
                row[f"{part}_snr_ci"] = interval(boots[(objective, k, part)], row[f"{part}_snr"])
                row[f"{part}_snr_debiased"] = debiased_median_snr(draws[part])
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return rows, boots


def comparisons(rows: list[dict], boots: dict, args) -> list[dict]:
    """Ratios and log-log slopes, each with a bootstrap interval."""
    ks, first, last = args.ks, args.ks[0], args.ks[-1]
    result = []

    def add(name, estimate, replicates, expected=""):
        result.append(
            {
                "comparison": name,
                "estimate": float(estimate),
                "ci": interval(replicates, estimate),
                "expected": expected,
            }
        )

    point = {(r["objective"], r["K"], p): r[f"{p}_snr"] for r in rows for p in ("guide", "model")}
    for objective in SNR_OBJECTIVES:
        for part in ("guide", "model"):
            estimate = log_slope(ks, np.array([point[(objective, k, part)] for k in ks]))
            replicates = log_slope(ks, np.stack([boots[(objective, k, part)] for k in ks]))
            expected = {("iwae", "guide"): "-0.5 (large K)", ("iwae", "model"): "+0.5"}.get(
                (objective, part), ""
            )
            add(f"{objective} {part}: slope of log SNR on log K", estimate, replicates, expected)
    for objective, part in (("iwae", "guide"), ("iwae", "model")):
        add(
            f"{objective} {part}: SNR(K={last}) / SNR(K={first})",
            point[(objective, last, part)] / point[(objective, first, part)],
            boots[(objective, last, part)] / boots[(objective, first, part)],
            f"{np.sqrt(last / first) ** (-1 if part == 'guide' else 1):.3g} under 1/sqrt(K)"
            if part == "guide"
            else f"{np.sqrt(last / first):.3g} under sqrt(K)",
        )
    middle = 10 if 10 in ks else ks[len(ks) // 2]
    add(
        f"dreg guide: SNR(K={last}) / SNR(K={middle})",
        point[("dreg", last, "guide")] / point[("dreg", middle, "guide")],
        boots[("dreg", last, "guide")] / boots[("dreg", middle, "guide")],
        "1 if it does not decay",
    )
    for k in ks:
        add(
            f"K={k}: dreg / iwae guide SNR (paired)",
            point[("dreg", k, "guide")] / point[("iwae", k, "guide")],
            boots[("dreg", k, "guide")] / boots[("iwae", k, "guide")],
        )
    for comparison in result:
        print(json.dumps(comparison), flush=True)
    return result


def kl_variance_study(vae, x, args) -> tuple[list[dict], dict]:
    rows, boots = [], {}
    counts = resample_counts(args.replicates, args.bootstrap, args.seed + 2)
    for objective in ("trace_elbo", "trace_meanfield_elbo"):
        # The same seed for both objectives: if they consume the random numbers alike, the
        # draws are paired and the ratio below resamples the same replicates for both.
        draws = gradient_draws(vae, x, objective, 1, args.replicates, args.seed)
        row = {"objective": objective}
        for part in ("guide", "model"):
            boots[(objective, part)] = bootstrap_total_variance(draws[part], counts)
            row[f"{part}_total_variance"] = total_variance(draws[part])
            row[f"{part}_total_variance_ci"] = interval(
                boots[(objective, part)], row[f"{part}_total_variance"]
            )
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[1]["guide_total_variance"] / rows[0]["guide_total_variance"]
    replicates = boots[("trace_meanfield_elbo", "guide")] / boots[("trace_elbo", "guide")]
    rows.append(
        {
            "objective": "ratio analytic / Monte Carlo KL (guide)",
            "guide_total_variance": ratio,
            "guide_total_variance_ci": interval(replicates, ratio),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    return rows, boots


def snr_figure(rows: list[dict], path: Path, floor: float) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    for axis, part in zip(figure.subplots(1, 2), ("guide", "model"), strict=True):
        for objective in SNR_OBJECTIVES:
            chosen = [r for r in rows if r["objective"] == objective]
            ks = [r["K"] for r in chosen]
            snr = np.array([r[f"{part}_snr"] for r in chosen])
            low, high = np.array([r[f"{part}_snr_ci"] for r in chosen]).T
            axis.errorbar(
                ks,
                snr,
                yerr=[np.clip(snr - low, 0, None), np.clip(high - snr, 0, None)],
                marker="o",
                capsize=3,
                label=objective.upper(),
            )
        if part == "guide":
            axis.axhline(floor, color="grey", linestyle=":", label="noise floor")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("particles K")
        axis.set_ylabel("median |mean| / std of gradient")
        axis.set_title(f"{part} ({'encoder' if part == 'guide' else 'decoder'}) parameters")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.savefig(path, dpi=110)


def _ci(values: list[float], digits: int = 3) -> str:
    return f"[{values[0]:.{digits}f}, {values[1]:.{digits}f}]"


def markdown(snr_rows, comparison_rows, kl_rows, args) -> str:
    lines = [
        f"Median gradient SNR over parameter coordinates, R = {args.replicates} draws, "
        f"minibatch of {args.batch} test digits, training seed {args.seed}; in brackets the "
        f"95% bias-corrected bootstrap interval over the R replicates (B = {args.bootstrap}); "
        f"'debiased': median of sqrt(max(0, SNR^2 - 1/R)). Noise floor (median SNR of "
        f"coordinates with zero mean): {noise_floor(args.replicates):.3f}.",
        "",
        "| objective | K | guide SNR | 95% interval | debiased | model SNR | 95% interval |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['objective']} | {r['K']} | {r['guide_snr']:.3f} | {_ci(r['guide_snr_ci'])} "
        f"| {r['guide_snr_debiased']:.3f} | {r['model_snr']:.3f} | {_ci(r['model_snr_ci'])} |"
        for r in snr_rows
    ]
    lines += ["", "| comparison | estimate | 95% interval | theory |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {r['comparison']} | {r['estimate']:.3f} | {_ci(r['ci'])} | {r['expected']} |"
        for r in comparison_rows
    ]
    lines += [
        "",
        "Total variance of the ELBO gradient (sum over coordinates), K = 1, with 95% "
        "bootstrap intervals:",
        "",
        "| objective | guide | 95% interval | model | 95% interval |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in kl_rows:
        if "model_total_variance" in r:
            lines.append(
                f"| {r['objective']} | {r['guide_total_variance']:.4g} "
                f"| {_ci(r['guide_total_variance_ci'], 2)} | {r['model_total_variance']:.4g} "
                f"| {_ci(r['model_total_variance_ci'], 3)} |"
            )
        else:
            lines.append(
                f"| {r['objective']} | {r['guide_total_variance']:.3f} "
                f"| {_ci(r['guide_total_variance_ci'])} | | |"
            )
    return "\n".join(lines)


def one_seed(args, out: Path) -> dict:
    """The whole study for the training seed ``args.seed``; writes results.json, table.md and
    gradient_snr.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    vae, x = trained_vae(args)
    snr_rows, snr_boots = snr_study(vae, x, args)
    comparison_rows = comparisons(snr_rows, snr_boots, args)
    kl_rows, _ = kl_variance_study(vae, x, args)
    summary = {
        "seed": args.seed,
        "replicates": args.replicates,
        "bootstrap": args.bootstrap,
        "noise_floor": noise_floor(args.replicates),
        "snr": snr_rows,
        "comparisons": comparison_rows,
        "kl": kl_rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    snr_figure(snr_rows, out / "gradient_snr.png", noise_floor(args.replicates))
    table = markdown(snr_rows, comparison_rows, kl_rows, args)
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)
    return summary


def across_seeds(summaries: list[dict]) -> str:
    """Seed-to-seed variability: each seed's point estimate, and their range."""
    seeds = [s["seed"] for s in summaries]
    header = " | ".join(f"seed {seed}" for seed in seeds)
    lines = [
        f"Across training seeds {', '.join(map(str, seeds))} (each seed: its own trained VAE, "
        "binarization of the minibatch and gradient draws); point estimates per seed.",
        "",
        f"| objective | K | part | {header} | min to max |",
        "| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " | --- |",
    ]
    for index, row in enumerate(summaries[0]["snr"]):
        for part in ("guide", "model"):
            values = [s["snr"][index][f"{part}_snr"] for s in summaries]
            lines.append(
                f"| {row['objective']} | {row['K']} | {part} | "
                + " | ".join(f"{v:.3f}" for v in values)
                + f" | {min(values):.3f} to {max(values):.3f} |"
            )
    lines += [
        "",
        f"| comparison | {header} | min to max |",
        "| --- | " + "--- | " * len(seeds) + "--- |",
    ]
    for index, row in enumerate(summaries[0]["comparisons"]):
        values = [s["comparisons"][index]["estimate"] for s in summaries]
        lines.append(
            f"| {row['comparison']} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {min(values):.3f} to {max(values):.3f} |"
        )
    values = [s["kl"][2]["guide_total_variance"] for s in summaries]
    lines.append(
        "| guide gradient variance, analytic / Monte Carlo KL | "
        + " | ".join(f"{v:.3f}" for v in values)
        + f" | {min(values):.3f} to {max(values):.3f} |"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3, 10, 30, 100]
    )
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples B")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=lambda s: [int(v) for v in s.split(",")],
        default=None,
        help="several training seeds, e.g. 0,1,2,3,4: the study per seed in <out>/seed_<s>, "
        "the first seed's files also in <out>, and seed-to-seed variability in <out>/seeds.md",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    seeds = args.seeds or [args.seed]
    summaries = []
    for seed in seeds:
        args.seed = seed
        out = args.out if len(seeds) == 1 else args.out / f"seed_{seed}"
        summaries.append(one_seed(args, out))
    if len(seeds) > 1:
        for name in ("results.json", "table.md", "gradient_snr.png"):
            (args.out / name).write_bytes((args.out / f"seed_{seeds[0]}" / name).read_bytes())
        table = across_seeds(summaries)
        (args.out / "seeds.md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
