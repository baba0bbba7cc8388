"""Benchmark: scaling of data-parallel training, steps per second on 1 and N processes.

The same training run (MLP 784-400-50 VAE, Bernoulli likelihood, Adam, statically binarized
MNIST, global minibatch ``--batch-size``) is timed with every configuration of processes x
torch threads per process, through the library's own :meth:`pyrovae.VAE.fit`: one process
started plainly, several under ``torchrun`` (gloo on CPUs, NCCL on GPUs). Each run times
``--epochs`` epochs of ``--points`` training points and reports the median epoch after the
first (warm-up); configurations are interleaved over ``--rounds`` rounds and the table gives
the median over rounds. Speed-up and efficiency are relative to one process with one
thread per process::

    PYROVAE_DATA_DIR=../shared/data python experiments/bench_distributed.py \\
        --configurations 1x1,1x2,2x1 --out docs/bench_distributed_cpu.md

A configuration ``PxT`` is P processes of T torch threads each. On a GPU machine use
``--device cuda`` and P up to the number of GPUs (T is then the CPU threads per process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_configurations(text: str) -> list[tuple[int, int]]:
    pairs = []
    for part in text.split(","):
        processes, threads = part.lower().split("x")
        pairs.append((int(processes), int(threads)))
    return pairs


def worker(args) -> None:
    """One run (one process, or one rank under torchrun): time ``fit`` epoch by epoch."""
    import torch

    from pyrovae import VAE, VAEConfig
    from pyrovae.data import load_dataset, threshold
    from pyrovae.distributed import active_context, init_from_environment, shutdown

    torch.set_num_threads(args.threads)
    init_from_environment()
    try:
        train = threshold(load_dataset("binarized-mnist").train[: args.points])
        config = VAEConfig(num_features=784, latent_dim=50, hidden_sizes=(400,))
        vae = VAE(config, seed=0)
        history = vae.fit(
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            compile=args.compile,
            device=args.device,
            seed=0,
            progress=False,
        )
        parallel = active_context()
        if parallel is None or parallel.is_main:
            print(json.dumps({"seconds": history.column("seconds")}))
    finally:
        shutdown()


def launch(processes: int, threads: int, args) -> list[float]:
    """Per-epoch seconds of one run of the configuration ``processes x threads``."""
    options = [
        "--worker",
        f"--threads={threads}",
        f"--points={args.points}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--compile={args.compile}",
        f"--device={args.device}",
    ]
    script = str(Path(__file__).resolve())
    if processes == 1:
        command = [sys.executable, script, *options]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={processes}", script, *options]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    line = [text for text in result.stdout.splitlines() if text.startswith("{")][-1]
    return json.loads(line)["seconds"]


def measure(args) -> dict[tuple[int, int], list[float]]:
    """Steps per second of every configuration in every round (interleaved, rotated)."""
    configurations = parse_configurations(args.configurations)
    steps = -(-args.points // args.batch_size)
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configurations}
    for round_index in range(args.rounds):
        shift = round_index % len(configurations)
        for processes, threads in configurations[shift:] + configurations[:shift]:
            seconds = launch(processes, threads, args)
            rate = steps / statistics.median(seconds[1:])
            rates[(processes, threads)].append(rate)
            print(f"round {round_index + 1}: {processes}x{threads}: {rate:.1f} steps/s")
    return rates


MATMUL_PROBE = """
import time, torch
torch.set_num_threads(1)
a, w = torch.randn(128, 784), torch.randn(784, 400)
for _ in range(50):
    a @ w
start = time.perf_counter()
for _ in range(1000):
    a @ w
print(1000 / (time.perf_counter() - start))
"""


def cpu_capacity(processes: int) -> float:
    """Aggregate matmul throughput of ``processes`` concurrent single-threaded processes,
    relative to one alone: how much parallel compute the CPU really offers."""

    def run_together(count: int) -> float:
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", MATMUL_PROBE], stdout=subprocess.PIPE, text=True
            )
            for _ in range(count)
        ]
        return sum(float(run.communicate()[0]) for run in runs)

    return run_together(processes) / run_together(1)


def describe_hardware(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        return f"{torch.cuda.device_count()} x {name}, torch {torch.__version__}"
    return (
        f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU, "
        f"torch {torch.__version__}"
    )


def markdown(rates: dict[tuple[int, int], list[float]], args) -> str:
    base = statistics.median(rates[min(rates)])
    lines = [
        f"Hardware: {describe_hardware(args.device)}, Python {platform.python_version()}.",
        "",
        f"Command: `python experiments/bench_distributed.py --configurations "
        f"{args.configurations} --points {args.points} --batch-size {args.batch_size} "
        f"--epochs {args.epochs} --rounds {args.rounds} --compile {args.compile} "
        f"--device {args.device}`",
        "",
        "| processes x threads | steps/s (median) | min-max | speed-up | efficiency |",
        "| --- | --- | --- | --- | --- |",
    ]
    if not args.device.startswith("cuda"):
        most = max(processes for processes, _ in rates)
        lines[1:1] = [
            "",
            f"CPU capacity: {most} concurrent single-threaded processes multiply a 128x784 by "
            f"784x400 matrix product {cpu_capacity(most):.2f} times as fast as one alone.",
        ]
    for (processes, threads), values in rates.items():
        median = statistics.median(values)
        lines.append(
            f"| {processes} x {threads} | {median:.1f} | {min(values):.1f}-{max(values):.1f} | "
            f"{median / base:.2f} | {median / base / processes:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configurations", default="1x1,1x2,2x1")
    parser.add_argument("--points", type=int, default=12800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", default="none", choices=("none", "graph", "inductor"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is a warm-up)")
    if args.worker:
        worker(args)
        return
    table = markdown(measure(args), args)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
