"""Data parallelism on torch.distributed: two processes started by torchrun (gloo backend,
loopback only) against the same work done in one process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pyrovae.cli import main
from pyrovae.distributed import DataParallelContext, init_from_environment
from pyrovae.training import _check_shardable

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)


@pytest.fixture(scope="module")
def worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(*arguments: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``arguments`` (a script or ``-m module`` and its options) under torchrun."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("compile_mode", ["none", "graph"])
def test_two_process_training_equals_one_process(worker, tmp_path, compile_mode):
    # Eager steps go through DistributedDataParallel, compiled ones through one all-reduce.
    out = tmp_path / "two.pt"
    succeeded(
        torchrun(str(WORKER), "train", "--compile", compile_mode, "--out", str(out), cwd=tmp_path)
    )
    two = torch.load(out, weights_only=False)
    one = worker.train(compile_mode)
    assert two["world_size"] == 2
    for name, value in one["state"].items():
        # float64; the only difference is the order of a sum over the minibatch.
        torch.testing.assert_close(two["state"][name], value, rtol=0, atol=1e-12)
    for key in ("train_elbo", "valid_elbo"):
        np.testing.assert_allclose(
            [r[key] for r in two["history"]], [r[key] for r in one["history"]], rtol=1e-12
        )


def test_two_process_run_resumes_as_if_never_interrupted(tmp_path):
    # Real Monte Carlo noise: each rank's random stream is saved and restored.
    def run(name: str, epochs: int, *resume: str) -> dict:
        options = ["--epochs", str(epochs), "--checkpoint", str(tmp_path / f"{name}.ckpt")]
        out = tmp_path / f"{name}-{epochs}.pt"
        succeeded(
            torchrun(str(WORKER), "train-vae", *options, *resume, "--out", str(out), cwd=tmp_path)
        )
        return torch.load(out, weights_only=False)

    straight = run("straight", 3)
    run("interrupted", 2)
    resumed = run("interrupted", 3, "--resume")
    elbos = [[r["train_elbo"] for r in result["history"]] for result in (straight, resumed)]
    assert elbos[0] == elbos[1] and len(elbos[0]) == 3
    for name, value in straight["state"].items():
        assert torch.equal(resumed["state"][name], value), name


def test_sharded_evaluation_equals_one_process(worker, tmp_path):
    out = tmp_path / "two.pt"
    succeeded(torchrun(str(WORKER), "evaluate", "--out", str(out), cwd=tmp_path))
    two = torch.load(out, weights_only=False)
    one = worker.evaluate()
    assert set(two["per_datapoint"]) == set(one["per_datapoint"])
    for name, values in one["per_datapoint"].items():
        assert len(values) == 30
        np.testing.assert_allclose(two["per_datapoint"][name], values, rtol=1e-12, err_msg=name)
    assert two["latent"] == one["latent"]


def test_cli_trains_resumes_and_evaluates_under_torchrun(tmp_path):
    out = tmp_path / "run"
    train = ["-m", "pyrovae.cli", "train", "--dataset", "digits", "--latent-dim", "2"]
    train += ["--hidden", "16", "--batch-size", "128", "--binarize", "dynamic"]
    train += ["--out", str(out), "--quiet"]
    first = succeeded(torchrun(*train, "--epochs", "2", cwd=tmp_path))
    assert first.stdout.count("trained 2 epochs") == 1  # only rank 0 reports and writes
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]

    succeeded(torchrun(*train, "--epochs", "3", "--resume", cwd=tmp_path))
    resumed = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2, 3] and resumed[:2] == records

    # The run's shards and random streams belong to two processes: one cannot resume it.
    single = subprocess.run(
        [sys.executable, *train, "--epochs", "4", "--resume"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 2
    assert "written by a run on 2 process(es), this run has 1" in single.stderr
    assert "torchrun --nproc_per_node 2" in single.stderr

    evaluate = ["-m", "pyrovae.cli", "evaluate", "--model", str(out / "model.pt")]
    evaluate += ["--num-samples", "20", "--ks", "1,5", "--max-pairs", "2000", "--quiet"]
    succeeded(torchrun(*evaluate, "--out", str(tmp_path / "two.csv"), cwd=tmp_path))
    assert main([*evaluate[2:], "--out", str(tmp_path / "one.csv")]) == 0
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("total", [0, 1, 4, 7, 128])
def test_shards_are_contiguous_and_cover_everything(world_size, total):
    shards = [DataParallelContext(rank, world_size).shard(total) for rank in range(world_size)]
    expected = torch.arange(total).tensor_split(world_size)
    assert [list(range(total))[s] for s in shards] == [part.tolist() for part in expected]


def test_minibatches_too_small_to_shard_are_refused():
    _check_shardable(50, 15, world_size=2)  # last minibatch of 5
    with pytest.raises(ValueError, match="last batch of 1; choose a batch_size"):
        _check_shardable(31, 15, world_size=2)
    with pytest.raises(ValueError, match="needs at least 4 data points"):
        _check_shardable(30, 3, world_size=4)


def test_a_partial_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        init_from_environment()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_environment() is None  # one process: nothing to join
