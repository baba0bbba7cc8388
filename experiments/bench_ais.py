"""Benchmark: throughput of annealed importance sampling (AIS) beside importance sampling (IS)
on the same VAE and the same binarized MNIST test images, one CPU thread.

Variants
--------
ais         ``pyrovae.evaluation.ais.ais``: C chains per image, T annealing steps, L leapfrog
            steps per HMC transition (one batched gradient evaluation of log p(x, z) and
            log q(z|x) over all chains and images per leapfrog step)
importance  ``pyrovae.evaluation.importance.evaluate`` with K draws per image (all bounds,
            Pareto k-hat; latent diagnostics off)

Rates reported: AIS in images x annealing steps per second, batched gradient evaluations
per second and (chain, image) gradient evaluations per second; IS in images x draws per
second. The last two compare the cost of one leapfrog step of one chain with one IS draw.

The model is a 784-200-200-50 tanh VAE with Bernoulli likelihood (Burda et al.'s
architecture), untrained unless ``--model`` names a saved one: throughput does not depend
on training. Run from a plain checkout::

    python experiments/bench_ais.py --num-images 32 --num-steps 50 --num-samples 1000 --rounds 3

Each round times every variant once, alternating their order; the table gives the median and
the range over rounds.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402

from pyrovae import VAE  # noqa: E402
from pyrovae.evaluation.ais import ais  # noqa: E402
from pyrovae.evaluation.importance import evaluate  # noqa: E402


def make_model(args) -> tuple[VAE, torch.Tensor]:
    from pyrovae.data import load_binarized_mnist

    test = load_binarized_mnist(args.data_dir, download=False).test
    generator = torch.Generator().manual_seed(0)
    x = test[torch.randperm(test.shape[0], generator=generator)[: args.num_images]]
    if args.model is not None:
        vae = VAE.load(args.model)
    else:
        vae = VAE(
            num_features=784, latent_dim=50, hidden_sizes=(200, 200), activation="tanh", seed=0
        )
    return vae.eval(), x.to(next(vae.parameters()).dtype)


def run_ais(vae: VAE, x: torch.Tensor, args, seed: int) -> float:
    result = ais(
        vae.model,
        vae.guide,
        x,
        num_steps=args.num_steps,
        num_chains=args.num_chains,
        num_leapfrog=args.num_leapfrog,
        tuning_chains=args.tuning_chains,
        max_pairs=args.max_pairs,
        seed=seed,
    )
    return float(result.log_px.mean())


def run_importance(vae: VAE, x: torch.Tensor, args, seed: int) -> float:
    result = evaluate(
        vae.model,
        vae.guide,
        x,
        num_samples=args.num_samples,
        max_pairs=args.max_pairs,
        latent_diagnostics=False,
        seed=seed,
    )
    return float(result.per_datapoint["log_px"].mean())


VARIANTS = {"ais": run_ais, "importance": run_importance}


def gradient_evaluations(args) -> int:
    """Batched gradient evaluations of one AIS run on one block of images."""
    return 1 + (args.num_steps - 1) * args.num_leapfrog


def timings(vae: VAE, x: torch.Tensor, args) -> tuple[dict, dict]:
    times = {name: [] for name in VARIANTS}
    estimates = {}
    for function in VARIANTS.values():  # warm-up on two images
        function(vae, x[:2], args, seed=0)
    names = list(VARIANTS)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            started = time.perf_counter()
            estimates[name] = VARIANTS[name](vae, x, args, seed=round_index)
            times[name].append(time.perf_counter() - started)
    return times, estimates


def rows(times: dict, estimates: dict, args) -> list[dict]:
    images = args.num_images
    chains = args.num_chains + args.tuning_chains
    blocks = -(-images // max(1, args.max_pairs // chains))
    evals = gradient_evaluations(args) * blocks
    ais_seconds = statistics.median(times["ais"])
    is_seconds = statistics.median(times["importance"])
    return [
        {
            "variant": f"AIS (C={args.num_chains}+{args.tuning_chains} tuning, "
            f"T={args.num_steps}, L={args.num_leapfrog})",
            "seconds": ais_seconds,
            "range": (min(times["ais"]), max(times["ais"])),
            "rate": f"{images * args.num_steps / ais_seconds:.1f} images x steps/s",
            "evals": f"{evals / ais_seconds:.1f} batched gradients/s, "
            f"{evals * images * chains / ais_seconds:.3g} (chain, image) gradients/s",
            "log_px": estimates["ais"],
        },
        {
            "variant": f"IS evaluate (K={args.num_samples})",
            "seconds": is_seconds,
            "range": (min(times["importance"]), max(times["importance"])),
            "rate": f"{images * args.num_samples / is_seconds:.3g} images x draws/s",
            "evals": f"{images * args.num_samples / is_seconds:.3g} (draw, image) evaluations/s",
            "log_px": estimates["importance"],
        },
    ]


def describe_hardware() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} thread(s)"


def markdown(table_rows: list[dict], args) -> str:
    lines = [
        f"`python experiments/bench_ais.py {' '.join(map(shlex.quote, args.argv))}`",
        "",
        f"{args.num_images} binarized MNIST test images, 784-200-200-50 tanh VAE "
        f"({'loaded from ' + str(args.model) if args.model else 'untrained'}), "
        f"{args.rounds} rounds, {describe_hardware()}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}",
        "",
        "| variant | seconds (median) | min-max | throughput | per evaluation "
        "| mean log p_hat(x) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table_rows:
        low, high = r["range"]
        lines.append(
            f"| {r['variant']} | {r['seconds']:.2f} | {low:.2f}-{high:.2f} | {r['rate']} | "
            f"{r['evals']} | {r['log_px']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="saved model (default: untrained)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--num-chains", type=int, default=16)
    parser.add_argument("--tuning-chains", type=int, default=2)
    parser.add_argument("--num-leapfrog", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--max-pairs", type=int, default=2**15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(args.threads)
    vae, x = make_model(args)
    times, estimates = timings(vae, x, args)
    table = markdown(rows(times, estimates, args), args)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
