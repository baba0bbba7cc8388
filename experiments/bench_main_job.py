"""Benchmark: the README's main job (``pyrovae train`` on the 8x8 digits, 50 epochs) with
``--compile none`` (eager Pyro, the default before issue 16) and ``--compile auto`` (the
default since), as a user runs it: one fresh process per run, the two interleaved round by
round (alternating which goes first).

Reported per variant, median and range over rounds: wall time of the whole command (process
start, imports, data, the compile check, training, files), training time (the sum of the
epochs' seconds in ``history.jsonl``), the first epoch (tracing included) and the median
later epoch, as milliseconds per step (1297 training images in batches of 64: 21 steps), and
the auto/none ratios of the same round. Both variants reach the same validation ELBO (the
graph path computes the same parameters as eager Pyro).

Run from the repository root::

    python experiments/bench_main_job.py --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAIN_JOB = [
    *("train", "--dataset", "digits", "--binarize", "dynamic", "--latent-dim", "8"),
    *("--hidden", "256,256", "--epochs", "50", "--batch-size", "64"),
]
STEPS_PER_EPOCH = 21  # ceil(1297 / 64)


def run(mode: str, out: Path, threads: int | None) -> dict:
    command = [sys.executable, "-m", "pyrovae.cli", *MAIN_JOB, "--compile", mode, "--quiet"]
    command += ["--out", str(out)] + ([] if threads is None else ["--threads", str(threads)])
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    seconds = [record["seconds"] for record in history]
    return {
        "wall": wall,
        "train": sum(seconds),
        "first": seconds[0],
        "step_ms": statistics.median(seconds[1:]) / STEPS_PER_EPOCH * 1000,
        "valid_elbo": history[-1]["valid_elbo"],
    }


def spread(values: list[float], digits: int = 2) -> str:
    return (
        f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
        f"{max(values):.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    threads = args.threads or None
    results: dict[str, list[dict]] = {"none": [], "auto": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = ("none", "auto") if round_ % 2 == 0 else ("auto", "none")
            for mode in order:
                results[mode].append(run(mode, Path(scratch) / f"{mode}-{round_}", threads))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads: "
        f"{threads or 'default'}, {args.rounds} rounds, load average at the end {load:.1f}\n"
    )
    print("| compile | wall s | training s | first epoch s | ms/step (later epochs) |")
    print("| --- | --- | --- | --- | --- |")
    for mode, rows in results.items():
        columns = [
            spread([r[key] for r in rows], 1 if key in ("wall", "train") else 2)
            for key in ("wall", "train", "first", "step_ms")
        ]
        print(f"| {mode} | " + " | ".join(columns) + " |")
    pairs = list(zip(results["auto"], results["none"], strict=True))
    for key, name in (("wall", "wall time"), ("train", "training time"), ("step_ms", "per step")):
        print(f"\nauto/none, {name}: {spread([a[key] / n[key] for a, n in pairs])}", end="")
    elbos = {r["valid_elbo"] for rows in results.values() for r in rows}
    print(f"\nfinal validation ELBO of every run: {sorted(elbos)}")


if __name__ == "__main__":
    main()
