"""Study: signal-to-noise ratio of gradient estimators as the number of particles K grows
(issue 4, study 2), and the variance of the ELBO gradient with Monte Carlo versus analytic
KL (study 3).

For a VAE trained briefly on the 8x8 digits, and one fixed minibatch, each estimator's
gradient is drawn R times; per parameter coordinate, SNR = |mean| / standard deviation over
the R draws. The median over the coordinates of the guide (encoder) and of the model
(decoder) is reported per K. Rainforth et al. (2018) show that for IWAE the guide's SNR
falls like 1/sqrt(K) while the model's grows like sqrt(K); DReG (Tucker et al., 2019)
restores the guide's SNR.

Example::

    python experiments/gradient_snr.py --replicates 200 --out runs/gradient_snr
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


def total_variance(draws: np.ndarray) -> float:
    """Sum over coordinates of the per-coordinate variance of the gradient estimate."""
    return float(draws.var(0, ddof=1).sum())


def trained_vae(args) -> tuple[VAE, torch.Tensor]:
    digits = load_digits()
    vae = VAE(num_features=64, latent_dim=args.latent_dim, hidden_sizes=(args.hidden,))
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


def snr_study(vae, x, args) -> list[dict]:
    rows = []
    for objective in SNR_OBJECTIVES:
        for k in args.ks:
            draws = gradient_draws(vae, x, objective, k, args.replicates, args.seed)
            rows.append(
                {
                    "objective": objective,
                    "K": k,
                    "guide_snr": median_snr(draws["guide"]),
                    "model_snr": median_snr(draws["model"]),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def kl_variance_study(vae, x, args) -> list[dict]:
    rows = []
    for objective in ("trace_elbo", "trace_meanfield_elbo"):
        draws = gradient_draws(vae, x, objective, 1, args.replicates, args.seed)
        rows.append(
            {
                "objective": objective,
                "guide_total_variance": total_variance(draws["guide"]),
                "model_total_variance": total_variance(draws["model"]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def snr_figure(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    for axis, part in zip(figure.subplots(1, 2), ("guide", "model"), strict=True):
        for objective in SNR_OBJECTIVES:
            points = [(r["K"], r[f"{part}_snr"]) for r in rows if r["objective"] == objective]
            axis.plot(*zip(*points, strict=True), marker="o", label=objective.upper())
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("particles K")
        axis.set_ylabel("median |mean| / std of gradient")
        axis.set_title(f"{part} ({'encoder' if part == 'guide' else 'decoder'}) parameters")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.savefig(path, dpi=110)


def markdown(snr_rows, kl_rows, args) -> str:
    lines = [
        f"Median gradient SNR over parameter coordinates, R = {args.replicates} draws, "
        f"minibatch of {args.batch} test digits.",
        "",
        "| objective | K | guide SNR | model SNR |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['objective']} | {r['K']} | {r['guide_snr']:.3f} | {r['model_snr']:.3f} |"
        for r in snr_rows
    ]
    lines += [
        "",
        "Total variance of the ELBO gradient (sum over coordinates), K = 1:",
        "",
        "| objective | guide | model |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {r['objective']} | {r['guide_total_variance']:.4g} | {r['model_total_variance']:.4g} |"
        for r in kl_rows
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3, 10, 30, 100]
    )
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vae, x = trained_vae(args)
    snr_rows, kl_rows = snr_study(vae, x, args), kl_variance_study(vae, x, args)
    (args.out / "results.json").write_text(json.dumps({"snr": snr_rows, "kl": kl_rows}, indent=2))
    snr_figure(snr_rows, args.out / "gradient_snr.png")
    table = markdown(snr_rows, kl_rows, args)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
