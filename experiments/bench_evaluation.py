"""Benchmark: throughput (images per second) of importance-sampled log-likelihood estimators
on the same model, the same K and the same data, side by side in one process.

Variants
--------
traced       pyrovae's generic path: trace the Pyro model and guide (vectorized over K and
             chunked), then log-sum-exp per data point
             (``particle_terms`` + ``importance_estimate``)
evaluate     the full ``pyrovae.evaluation.importance.evaluate`` (adds IWAE_k, both ELBOs,
             Pareto k-hat per data point; latent diagnostics off)
handwritten  a hand-written vectorized PyTorch estimator for this VAE (same chunking)
importance   ``pyro.infer.Importance`` run once per image (the only way it yields a
             per-datapoint estimate; it loops over the K draws in Python)

Run from a plain checkout (no install needed)::

    python experiments/bench_evaluation.py --num-samples 1000 --num-images 500 --rounds 5

Each round times every variant once, in an order that rotates between rounds; the table
reports the median and the spread (min-max) over rounds.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyrovae import VAE  # noqa: E402
from pyrovae.evaluation.bounds import importance_estimate  # noqa: E402
from pyrovae.evaluation.importance import evaluate  # noqa: E402
from pyrovae.evaluation.traces import chunk_bounds, particle_terms  # noqa: E402


def handwritten_log_px(vae: VAE, x: torch.Tensor, num_samples: int, max_pairs: int):
    """log p_hat(x) per data point for the built-in Bernoulli VAE, in plain PyTorch."""
    results = []
    for start, stop in chunk_bounds(x.shape[0], max(1, max_pairs // num_samples)):
        batch = x[start:stop]
        loc, scale = vae.guide.encoder(batch)
        z = loc + scale * torch.randn((num_samples,) + loc.shape, device=x.device, dtype=x.dtype)
        logits = vae.model.likelihood.logits(vae.model.decoder(z))
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, batch.expand_as(logits), reduction="none"
        ).sum(-1)
        log_prior = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_q = (
            -0.5 * ((z - loc) / scale).square() - scale.log() - 0.5 * math.log(2 * math.pi)
        ).sum(-1)
        log_weights = (log_lik + log_prior - log_q).double()
        results.append(torch.logsumexp(log_weights, 0) - math.log(num_samples))
    return torch.cat(results)


def traced_log_px(vae: VAE, x: torch.Tensor, num_samples: int, max_pairs: int):
    terms = particle_terms(
        vae.model, vae.guide, x, num_particles=num_samples, max_pairs=max_pairs, max_plate_nesting=1
    )
    return importance_estimate(terms.log_weights)[0]


def importance_log_px(vae: VAE, x: torch.Tensor, num_samples: int, max_pairs: int):
    values = []
    for row in x.split(1):
        posterior = pyro.infer.Importance(vae.model, vae.guide, num_samples=num_samples).run(row)
        log_weights = torch.stack(posterior.log_weights).double()
        values.append(torch.logsumexp(log_weights, 0) - math.log(num_samples))
    return torch.stack(values)


def full_evaluate(vae: VAE, x: torch.Tensor, num_samples: int, max_pairs: int):
    return evaluate(
        vae.model,
        vae.guide,
        x,
        num_samples=num_samples,
        ks=(1, 5, 50),
        max_pairs=max_pairs,
        latent_diagnostics=False,
    ).per_datapoint["log_px"]


VARIANTS = {
    "traced": traced_log_px,
    "evaluate": full_evaluate,
    "handwritten": handwritten_log_px,
    "importance": importance_log_px,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args, device: torch.device) -> tuple[VAE, torch.Tensor]:
    from pyrovae.data import load_binarized_mnist

    test = load_binarized_mnist(args.data_dir, download=False).test
    generator = torch.Generator().manual_seed(0)
    x = test[torch.randperm(test.shape[0], generator=generator)[: args.num_images]]
    if args.model is not None:
        vae = VAE.load(args.model, device=device)
    else:  # an untrained model of Burda et al.'s architecture: throughput does not need training
        torch.manual_seed(0)
        vae = VAE(num_features=784, latent_dim=50, hidden_sizes=(200, 200), activation="tanh")
    return vae.to(device).eval(), x.to(device)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    vae, x = make_model(args, device)
    subsets = {name: x for name in VARIANTS}
    subsets["importance"] = x[: args.importance_images]  # it is ~100x slower: fewer images
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.no_grad():
        for name, function in VARIANTS.items():  # warm-up
            function(vae, subsets[name][:2], args.num_samples, args.max_pairs)
        names = list(VARIANTS)
        for round_index in range(args.rounds):
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                pyro.set_rng_seed(round_index)
                synchronize(device)
                started = time.perf_counter()
                VARIANTS[name](vae, subsets[name], args.num_samples, args.max_pairs)
                synchronize(device)
                times[name].append(time.perf_counter() - started)
    rows = []
    for name, seconds in times.items():
        rate = [subsets[name].shape[0] / s for s in seconds]
        rows.append(
            {
                "variant": name,
                "images": subsets[name].shape[0],
                "median": statistics.median(rate),
                "min": min(rate),
                "max": max(rate),
            }
        )
    return rows


def markdown(rows: list[dict], args) -> str:
    reference = next(r["median"] for r in rows if r["variant"] == "handwritten")
    lines = [
        f"K = {args.num_samples}, max_pairs = {args.max_pairs}, {args.rounds} rounds, device "
        f"{describe_device(torch.device(args.device))}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}",
        "",
        "| variant | images timed | images/s (median) | min-max | relative to handwritten |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['images']} | {r['median']:.1f} | "
            f"{r['min']:.1f}-{r['max']:.1f} | {r['median'] / reference:.3f} |"
        )
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="saved model (default: untrained)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--importance-images", type=int, default=5)
    parser.add_argument("--max-pairs", type=int, default=2**18)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    table = markdown(run(args), args)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
