"""No command destroys an input, every write is atomic, every expected failure is one line
(issue 24): the guarded writer (:mod:`pyrovae.outputs`) through every command and the API,
a full disk and ``kill -9`` during a write, the run lock and ``--force``, ``compare`` and
``gaps`` refusals, sizes, threads, history columns and epoch counts.

Two tiny digits models are trained once for the module; every command runs in-process
through ``pyrovae.cli.main`` except the one ``kill -9`` subprocess."""

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyrovae.cli import RunLock, main
from pyrovae.evaluation.importance import write_per_datapoint_csv

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--batch-size", "256"]
QUICK = ["--num-samples", "2", "--ks", "1", "--num-points", "4", "-q"]


def train(out: Path, *extra: str, quiet: bool = True) -> list[str]:
    return ["train", *SMALL, "--out", str(out), *(["-q"] if quiet else []), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs: Bernoulli (``a``) and Normal likelihood (``normal``) on the digits."""
    root = tmp_path_factory.mktemp("outputs")
    assert main(train(root / "a")) == 0
    assert main(train(root / "normal", "--likelihood", "normal", "--binarize", "none")) == 0
    return root


def one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- no input destroyed


@pytest.mark.parametrize("command", ["evaluate", "evaluate-ais", "gaps", "compare"])
def test_no_command_writes_over_its_model(runs, tmp_path, capsys, command):
    model = runs / "a" / "model.pt"
    before = model.read_bytes()
    other = tmp_path / "b.pt"
    other.write_bytes(before)  # a copy, so that compare has two different files
    argv = {
        "evaluate": ["evaluate", "--model", str(model), *QUICK],
        "evaluate-ais": ["evaluate", "--model", str(model), "--method", "ais", "--ais-steps",
                         "2", "--ais-chains", "2", "--num-points", "2", "-q"],
        "gaps": ["gaps", "--model", str(model), "--steps", "2", "--num-points", "2",
                 "--num-samples", "2", "-q"],
        "compare": ["compare", str(other), str(model), "--num-samples", "2", "--num-points", "4",
                    "-q"],
    }[command]  # fmt: skip
    assert main([*argv, "--out", str(model)]) == 2
    one_line(capsys.readouterr().err, str(model), "input")
    link = tmp_path / "link.csv"
    os.link(model, link)  # the same file under another name
    assert main([*argv, "--out", str(link)]) == 2
    one_line(capsys.readouterr().err, "input")
    assert model.read_bytes() == before


def test_the_api_refuses_a_results_file_over_a_model(runs, tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes((runs / "a" / "model.pt").read_bytes())
    with pytest.raises(ValueError, match="model file, not a csv file"):
        write_per_datapoint_csv({"log_px": np.zeros(3)}, target)
    assert target.read_bytes() == (runs / "a" / "model.pt").read_bytes()


def test_a_replaced_results_file_is_said(runs, tmp_path, capsys):
    out = tmp_path / "r.csv"
    argv = ["evaluate", "--model", str(runs / "a"), *QUICK, "--out", str(out)]
    assert main(argv) == 0 and "(replaced the previous file" not in capsys.readouterr().out
    assert main(argv) == 0
    assert f"{out} (replaced the previous file" in capsys.readouterr().out


# --------------------------------------------------------------------------- atomic writes


def test_a_full_disk_leaves_the_old_results_file(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.csv"
    out.write_text("data_point,log_px\n0,-1.0\n")

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["evaluate", "--model", str(runs / "a"), *QUICK, "--out", str(out)]) == 2
    one_line(capsys.readouterr().err, str(out), "No space left on device", "unchanged")
    assert out.read_text() == "data_point,log_px\n0,-1.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary file left


KILLED_WRITER = """
import csv, sys, time
from pathlib import Path
import numpy as np
from pyrovae.evaluation.importance import write_per_datapoint_csv

target, flag = Path(sys.argv[1]), Path(sys.argv[2])
plain = csv.writer

class Slow:
    def __init__(self, handle):
        self.handle, self.writer = handle, plain(handle)

    def writerow(self, row):
        self.writer.writerow(row)
        if row[0] == 500:  # half-way: make the partial content visible, then wait to die
            self.handle.flush()
            flag.write_text("half")
            time.sleep(120)

csv.writer = Slow
write_per_datapoint_csv({"log_px": np.zeros(1000)}, target)
"""


def test_kill_9_during_a_results_write_leaves_the_old_file(tmp_path):
    target, flag = tmp_path / "results.csv", tmp_path / "flag"
    target.write_text("data_point,log_px\n0,-1.000000\n")
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target), str(flag)], env=environment
    )
    try:
        for _ in range(600):
            if flag.exists() or writer.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists(), "the writer never reached the middle of its write"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert target.read_text() == "data_point,log_px\n0,-1.000000\n"
    write_per_datapoint_csv({"log_px": np.zeros(2)}, target)  # the next write cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "results.csv"]
    with open(target, newline="") as handle:
        assert len(list(csv.reader(handle))) == 3


# --------------------------------------------------------------------------- run directories


def test_the_lock_never_writes_through_a_symlink(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "run.lock").symlink_to(victim)
    assert main(train(tmp_path / "run")) == 2
    one_line(capsys.readouterr().err, "symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_stale_lock_with_garbage_is_taken_over_cleanly(tmp_path, capsys):
    (tmp_path / "run.lock").write_bytes(b"\x00\x00\x00\x00")
    assert main(train(tmp_path / "run", quiet=False)) == 0
    printed = capsys.readouterr().out
    assert "took over the stale lock" in printed and "\x00" not in printed
    assert "holds no process id" in printed


def test_the_model_check_is_repeated_under_the_lock(tmp_path, capsys, monkeypatch):
    """A run that finished while this one waited for the lock is not replaced."""
    out = tmp_path / "run"
    acquire = RunLock.acquire

    def finished_meanwhile(self):
        taken = acquire(self)
        out.mkdir(exist_ok=True)
        (out / "model.pt").write_text("a model written by the other run")
        return taken

    monkeypatch.setattr(RunLock, "acquire", finished_meanwhile)
    assert main(train(out)) == 2
    one_line(capsys.readouterr().err, "already holds a trained model")
    assert (out / "model.pt").read_text() == "a model written by the other run"


def test_the_lock_is_taken_before_the_data_are_read(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        argv = train(out, "--dataset", "mnist", "--data-dir", str(tmp_path / "no-such-dir"))
        assert main(argv) == 2
    one_line(capsys.readouterr().err, f"in use by process {os.getpid()}")


def test_a_mistyped_data_dir_is_refused_and_not_created(tmp_path, capsys):
    typo = tmp_path / "typo"
    assert main(train(tmp_path / "run", "--dataset", "mnist", "--data-dir", str(typo))) == 2
    one_line(capsys.readouterr().err, "--data-dir", "does not exist")
    assert not typo.exists()


def test_force_says_what_it_replaces_and_never_mixes_runs(tmp_path, capsys, monkeypatch):
    """Killed after the new run's first checkpoint, --force leaves the new run (resumable)
    and none of the old run's files beside it."""
    import pyrovae.training

    out = tmp_path / "run"
    assert main(train(out)) == 0
    old_model = (out / "model.pt").read_bytes()
    calls = []
    epoch = pyrovae.training._train_epoch

    def interrupted_in_epoch_two(*arguments, **options):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return epoch(*arguments, **options)

    monkeypatch.setattr(pyrovae.training, "_train_epoch", interrupted_in_epoch_two)
    assert main([*train(out, "--force", "--seed", "1"), "--epochs", "2"]) == 130
    printed = capsys.readouterr().out
    assert "--force: replacing the run" in printed and "model.pt" in printed
    assert (out / "model.pt").read_bytes() != old_model
    assert not (out / "history.csv").exists() and not (out / "history.jsonl").exists()
    assert not list(out.glob(".replaced-*"))  # removed once the first checkpoint was written
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "-q"]) == 0


def test_force_interrupted_before_its_first_checkpoint_keeps_the_old_run(tmp_path, monkeypatch):
    import pyrovae.training

    out = tmp_path / "run"
    assert main(train(out)) == 0
    old = {name: (out / name).read_bytes() for name in ("model.pt", "history.csv")}

    def interrupted(*arguments, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyrovae.training, "_train_epoch", interrupted)
    assert main(train(out, "--force")) == 130
    (aside,) = out.glob(".replaced-*")
    assert {name: (aside / name).read_bytes() for name in old} == old


# --------------------------------------------------------------------------- compare and gaps


def test_compare_refuses_different_likelihoods_unless_allowed(runs, capsys):
    models = [str(runs / "a"), str(runs / "normal")]
    argv = ["compare", *models, "--num-samples", "2", "--num-points", "4", "-q"]
    assert main([*argv, "--binarize", "threshold"]) == 2
    one_line(capsys.readouterr().err, "likelihood", "--allow-different-likelihoods")
    assert main([*argv, "--binarize", "threshold", "--allow-different-likelihoods"]) == 0


def test_compare_refuses_the_same_file_under_two_names(runs, tmp_path, capsys):
    link = tmp_path / "hard.pt"
    os.link(runs / "a" / "model.pt", link)
    assert main(["compare", str(runs / "a"), str(link), "--num-samples", "2", "-q"]) == 2
    one_line(capsys.readouterr().err, "given twice", "the same file")


def test_gaps_with_one_step_does_not_say_converged(runs, capsys):
    argv = ["gaps", "--model", str(runs / "a"), "--steps", "1", "--num-points", "2"]
    assert main([*argv, "--num-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "NOT converged" in printed and ": converged" not in printed


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--ais-chains", str(2**31 - 1)], "--ais-chains"),
        (["--bdmc", "--bdmc-points", str(2**31 - 1)], "--bdmc-points"),
    ],
)
def test_ais_settings_beyond_memory_are_one_line_with_what_fits(runs, capsys, extra, option):
    argv = ["evaluate", "--model", str(runs / "a"), "--method", "ais", "--num-points", "2"]
    assert main([*argv, *extra, "-q"]) == 2
    line = one_line(capsys.readouterr().err, option, "memory")
    largest = int(line.rsplit("that fits is ", 1)[1].split()[0])
    assert 0 < largest < 2**31 - 1


def test_a_long_ais_run_is_timed_and_estimated_first(runs, capsys, monkeypatch):
    import pyrovae.evaluation.ais as ais_module

    real = ais_module.ais

    def stop_after_the_pilot(*arguments, num_steps, **options):
        if num_steps != 10:
            raise KeyboardInterrupt
        return real(*arguments, num_steps=num_steps, **options)

    monkeypatch.setattr(ais_module, "ais", stop_after_the_pilot)
    argv = ["evaluate", "--model", str(runs / "a"), "--method", "ais", "--num-points", "1"]
    assert main([*argv, "--ais-steps", str(10**7), "--ais-chains", "2"]) == 130
    assert "estimated" in capsys.readouterr().out


# --------------------------------------------------------------------------- threads and history


def test_threads_default_to_one_for_a_small_model_and_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(train(tmp_path / "run", quiet=False)) == 0
    assert "threads: 1 (auto: 1 for a model of" in capsys.readouterr().out


def test_history_names_the_objective_it_holds(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(out, "--objective", "iwae", "--particles", "2")) == 0
    with open(out / "history.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["objective"] == "iwae" and "train_elbo" not in row
    assert float(row["train_objective"]) < 0
    assert "train iwae" in capsys.readouterr().out


def test_epoch_counts_after_a_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(out)) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "-q"]) == 0
    assert "trained 2 epochs (epochs 2 to 3; 1 before the resume)" in capsys.readouterr().out


def test_fit_defaults_to_one_thread_for_a_small_model_and_keeps_a_choice(
    tmp_path, capsys, monkeypatch
):
    import torch

    import pyrovae.training
    from pyrovae import VAE

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pyrovae.training, "_chosen_threads", None)
    monkeypatch.setattr(pyrovae.training, "_TORCH_DEFAULT_THREADS", torch.get_num_threads())
    seen, epoch = [], pyrovae.training._train_epoch

    def recording(*arguments, **options):
        seen.append(torch.get_num_threads())
        return epoch(*arguments, **options)

    monkeypatch.setattr(pyrovae.training, "_train_epoch", recording)
    before = torch.get_num_threads()
    VAE(num_features=4, latent_dim=1, hidden_sizes=(4,)).fit(
        torch.ones(8, 4), None, epochs=1, batch_size=4, progress=True
    )
    assert "threads: 1 (auto: 1 for a model of" in capsys.readouterr().out
    assert seen == [1] and torch.get_num_threads() == before
    assert main(train(tmp_path / "run", "--threads", "2")) == 0  # a choice is kept in fit
    assert seen[-1] == 2
