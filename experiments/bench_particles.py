"""Benchmark: the cost of code written for one draw (issue 21).

The same conditional linear-Gaussian model written two ways -- ``torch.cat([z, y], dim=1)``
(for one draw: pyrovae's structural check finds it does not broadcast over a particle
dimension and draws the K particles one per pass) and ``torch.cat([z, y.expand(...)],
dim=-1)`` (broadcasting: one vectorized pass) -- evaluated by importance sampling with the
same K on the same points, side by side in one process. Both give the same numbers; the
table shows what the one-draw path costs.

Run from a plain checkout (no install needed)::

    python experiments/bench_particles.py --num-samples 100 --num-points 200 --rounds 5

Each round times both variants once, in an order that alternates between rounds; the table
reports the median and the spread (min-max) over rounds. One torch thread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pyrovae.evaluation.importance import evaluate  # noqa: E402

LOADINGS = torch.tensor([[1.0, 0.5, 2.0, 0.0, -1.0], [-0.5, 1.0, 0.0, 1.0, 1.0]]).T  # (5, 2)
OFFSETS = torch.tensor(
    [[2.0, 0.0, -1.0], [0.0, 1.0, 1.0], [-2.0, -1.0, 0.0], [1.0, 1.0, 1.0], [0.0, -2.0, 2.0]]
)  # (5, 3): one column per label
MIXING = torch.cat([LOADINGS, OFFSETS], dim=1)  # x = MIXING [z, onehot(y)] + noise


def model_for_one_draw(x, y):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        h = torch.cat([z, F.one_hot(y, 3).to(z.dtype)], dim=1)
        pyro.sample("x", dist.Normal(h @ MIXING.T, 0.7).to_event(1), obs=x)


def broadcasting_model(x, y):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        label = F.one_hot(y, 3).to(z.dtype).expand(z.shape[:-1] + (3,))
        h = torch.cat([z, label], dim=-1)
        pyro.sample("x", dist.Normal(h @ MIXING.T, 0.7).to_event(1), obs=x)


def guide(x, y):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.3 * x[:, :2], 0.8).to_event(1))


def timed(model, data, num_samples: int) -> tuple[float, float]:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-per-pass note
        result = evaluate(
            model, guide, *data, num_samples=num_samples, ks=(1,), seed=0, latent_diagnostics=False
        )
    return time.perf_counter() - started, float(result.per_datapoint["log_px"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--num-points", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (options.num_points,), generator=generator)
    x = torch.randn(options.num_points, 5, generator=generator)
    variants = {"one draw per pass": model_for_one_draw, "vectorized": broadcasting_model}
    times = {name: [] for name in variants}
    means = {}
    for round_index in range(options.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            seconds, means[name] = timed(variants[name], (x, y), options.num_samples)
            times[name].append(seconds)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
        f"K = {options.num_samples}, {options.num_points} points, {options.rounds} rounds"
    )
    print(f"{'variant':<20} {'median s':>9} {'min-max s':>15} {'mean log p_hat':>15}")
    for name, values in times.items():
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(f"{name:<20} {statistics.median(values):9.3f} {spread:>15} {means[name]:15.4f}")
    ratio = statistics.median(times["one draw per pass"]) / statistics.median(times["vectorized"])
    print(f"one draw per pass / vectorized: {ratio:.1f}x")


if __name__ == "__main__":
    main()
