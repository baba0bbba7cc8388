"""Expected failures of the command line (issue 17, item 4): read-only and full disks, an
``--out`` that is a file, truncated or malformed data files, FIFOs, unknown devices and a
malformed resume state each end in one line on stderr naming the file or option and the
fix, with exit status 2, and (where they can be) before any training starts."""

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae.checkpoint import read_checkpoint, write_checkpoint
from pyrovae.cli import main

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--batch-size", "256"]


def train(out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--out", str(out), *extra]


def one_line_error(err: str, *needles: str) -> str:
    """The single stderr line of an expected failure, checked to contain ``needles``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert main(train(out, "--quiet")) == 0
    return out


def fails_before_training(arguments: list[str], capsys, *needles: str) -> str:
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert "epoch" not in captured.out and "trained" not in captured.out
    return one_line_error(captured.err, *needles)


# --------------------------------------------------------------------------- output places


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    fails_before_training(train(target), capsys, f"--out {target} is a file", "directory")
    fails_before_training(train(target / "sub"), capsys, f"{target} is a file")
    assert target.read_text() == "mine"


def test_evaluate_out_that_is_a_directory_is_refused_before_evaluating(run_dir, tmp_path, capsys):
    arguments = ["evaluate", "--model", str(run_dir), "--num-samples", "2", "--out", str(tmp_path)]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    one_line_error(captured.err, f"--out {tmp_path} is a directory")
    assert "log_px" not in captured.out


def drop_file_permission_override() -> None:
    """In the child (before exec): without CAP_DAC_OVERRIDE root obeys permission bits, as
    every other user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


RUN_MAIN = """
import contextlib, io, json, sys
from pyrovae.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run_as_unprivileged(argument_lists: list[list[str]]) -> list:
    """``main(argv)`` for each list, in one subprocess whose file access obeys permission
    bits (root gives up its override capability)."""
    preexec = drop_file_permission_override if os.geteuid() == 0 else None
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUN_MAIN, json.dumps(argument_lists)],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
            preexec_fn=preexec,
        )
    except subprocess.SubprocessError as error:
        if "prctl" in str(error):
            pytest.skip(f"cannot drop root's permission override here: {error}")
        raise
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_read_only_places_are_refused_before_any_work(run_dir, tmp_path):
    locked, existing = tmp_path / "read-only", tmp_path / "read-only-run"
    locked.mkdir()
    existing.mkdir()
    model = locked / "model.pt"
    shutil.copy(run_dir / "model.pt", model)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "binarized_mnist.npz", train=np.zeros((2, 784)))
    (data / "binarized_mnist.npz").chmod(0o000)
    locked.chmod(0o555)
    existing.chmod(0o555)
    evaluate = ["evaluate", "--model", str(model), "--num-samples", "2"]
    try:
        results = run_as_unprivileged(
            [
                train(existing),
                train(locked / "new"),
                [*evaluate, "--out", str(locked / "e.csv")],
                ["sample", "--model", str(model), "--out", str(locked / "s.png")],
                ["plot", "curves", "--model", str(model), "--out", str(locked / "c")],
                [*evaluate, "--dataset", "binarized-mnist", "--data-dir", str(data)],
            ]
        )
    finally:
        locked.chmod(0o755)
        existing.chmod(0o755)
    expected = [
        (f"--out {existing} is not writable", "Permission denied"),
        (f"cannot create the lock file {locked / 'new.lock'}", "writable location"),
        (f"--out {locked / 'e.csv'} is not writable", "writable location"),
        (f"--out {locked / 's.png'} is not writable",),
        (f"--out {locked / 'c.png'} is not writable",),
        (f"data file {data / 'binarized_mnist.npz'} is not readable", "permissions"),
    ]
    for (code, out, err), needles in zip(results, expected, strict=True):
        assert code == 2, (out, err)
        one_line_error(err, *needles)
        assert "epoch" not in out and "log_px" not in out
    assert sorted(p.name for p in locked.iterdir()) == ["model.pt"]
    assert not list(existing.iterdir()) and not (tmp_path / "read-only-run.lock").exists()


# --------------------------------------------------------------------------- full disks


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(
    tmp_path, capsys, monkeypatch
):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    fails_before_training(train(tmp_path / "run"), capsys, "MiB free", "free space")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_disk_that_fills_up_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(train(tmp_path / "run", "--epochs", "2")) == 2
    line = one_line_error(capsys.readouterr().err, "No space left on device", "--resume")
    assert str(tmp_path / "run" / "model.pt") in line
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_results_are_never_written_over_a_device(run_dir, capsys):
    """An atomic write renames a new file over the target: over /dev/full it would replace
    the device node, so a device is refused before any work (full disks: test_cli_outputs)."""
    arguments = ["evaluate", "--model", str(run_dir), "--num-samples", "2", "--ks", "1"]
    assert main([*arguments, "-q", "--out", "/dev/full"]) == 2
    one_line_error(capsys.readouterr().err, "/dev/full", "not a regular file", "--out")
    assert Path("/dev/full").is_char_device()


# --------------------------------------------------------------------------- data files


def small_binarized_npz(path: Path, **drop) -> Path:
    arrays = {split: np.zeros((4, 784), dtype=np.uint8) for split in ("train", "valid", "test")}
    for name in drop:
        arrays.pop(name)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("damage", ["truncated", "missing-split", "wrong-shape", "empty"])
def test_damaged_data_files_are_named_before_training(tmp_path, capsys, damage):
    npz = tmp_path / "binarized_mnist.npz"
    if damage == "truncated":
        content = small_binarized_npz(npz).read_bytes()
        npz.write_bytes(content[: len(content) // 2])
    elif damage == "missing-split":
        small_binarized_npz(npz, valid=True)
    elif damage == "wrong-shape":
        np.savez(npz, train=np.zeros((4, 100)), valid=np.zeros((4, 100)), test=np.zeros((4, 100)))
    else:
        npz.write_bytes(b"")
    arguments = train(tmp_path / "run", "--dataset", "binarized-mnist", "--data-dir", str(tmp_path))
    fails_before_training(arguments, capsys, f"data file {npz}", "replace it")
    assert not (tmp_path / "run").exists()


def test_data_files_that_are_fifos_are_refused_without_blocking(tmp_path, capsys):
    os.mkfifo(tmp_path / "binarized_mnist.npz")
    arguments = train(tmp_path / "run", "--dataset", "binarized-mnist", "--data-dir", str(tmp_path))
    fails_before_training(arguments, capsys, "binarized_mnist.npz is a FIFO")


def test_model_and_spec_fifos_are_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    assert main(["evaluate", "--model", str(fifo), "--num-samples", "2"]) == 2
    one_line_error(capsys.readouterr().err, str(fifo), "FIFO")
    spec = tmp_path / "spec.json"
    os.mkfifo(spec)
    fails_before_training(train(tmp_path / "run", "--spec", str(spec)), capsys, "--spec", "FIFO")


def test_a_data_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "data").write_text("")
    arguments = train(tmp_path / "run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"))
    fails_before_training(arguments, capsys, "--data-dir", "is a file")


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["foo", "cuda:7", "meta", "gpu0"])
def test_unknown_or_absent_devices_are_refused_before_any_work(run_dir, tmp_path, capsys, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    fails_before_training(train(tmp_path / "run", "--device", device), capsys, "--device")
    assert not (tmp_path / "run").exists()
    arguments = ["evaluate", "--model", str(run_dir), "--num-samples", "2", "--device", device]
    assert main(arguments) == 2
    one_line_error(capsys.readouterr().err, "--device")


# --------------------------------------------------------------------------- resume state


def break_rng(payload):
    payload["training_state"]["rng"] = {}


def break_epoch(payload):
    payload["training_state"]["epoch"] = "one"


def break_optimizer(payload):
    payload["optimizer_state"]["param_groups"] = []


def break_history(payload):
    payload["history"] = []


def break_numpy_state(payload):
    payload["training_state"]["rng"]["numpy"]["keys"] = torch.zeros(3, dtype=torch.int64)


def drop_training_state(payload):
    payload["training_state"] = None


@pytest.mark.parametrize(
    "damage",
    [
        break_rng,
        break_epoch,
        break_optimizer,
        break_history,
        break_numpy_state,
        drop_training_state,
    ],
)
def test_a_malformed_resume_state_is_one_line_before_training(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(train(out, "-q")) == 0
    capsys.readouterr()
    payload = read_checkpoint(out / "model.pt")
    damage(payload)
    write_checkpoint(payload, out / "model.pt")
    before = (out / "model.pt").read_bytes()
    fails_before_training(
        ["train", "--out", str(out), "--epochs", "2", "--resume"],
        capsys,
        "cannot resume",
        str(out / "model.pt"),
        "--force",
    )
    assert (out / "model.pt").read_bytes() == before
    assert not (tmp_path / "run.lock").exists()


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    fails_before_training(
        train(tmp_path / "run", "--resume"), capsys, "cannot resume", "does not exist"
    )
