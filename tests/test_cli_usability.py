"""The command line as a new user meets it (issue 16): help texts, defaults that work
together, every model family, runs that are never overwritten silently, evaluation data
preparation stated and equal to the Python API, output conventions, verbosity, threads and
diagnostics in words. Everything runs through ``pyrovae.cli.main`` as a user's arguments
would, plus one real subprocess."""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae import VAE, TrainConfig
from pyrovae.cli import RunLock, build_parser, main
from pyrovae.data import binarize, load_digits, threshold
from pyrovae.spec import save_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16", "--latent-dim", "2", "--epochs", "1", "--batch-size", "256"]


def train(out: Path, *extra: str) -> list[str]:
    """`pyrovae train` on the digits with a tiny network, one epoch."""
    return ["train", *SMALL, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One run trained by `pyrovae train` with every default but the network size."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(train(out, "--quiet")) == 0
    return out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["train", "evaluate", "sample", "plot"])
def test_help_shows_every_option_with_its_default(command, capsys):
    parser = subcommands()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.required or not action.option_strings:
            continue
        assert "(default:" in action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert shown.count("(default:") >= len(
        [a for a in parser._actions if a.option_strings and a.help and "(default:" in a.help]
    )
    assert "--threads N" in shown and "--quiet" in shown and "--verbose" in shown


def test_top_level_help_has_no_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    for command in ("train", "evaluate", "sample", "plot"):
        assert command in text


def test_train_help_reaches_every_model_family(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--likelihood", "--prior", "--prior-components", "--guide", "--guide-rank", "--flows",
        "--network", "--condition", "--top-latent-dim", "--top-hidden", "--spec", "--compile",
        "--resume", "--force", "--binarize", "--latent-dim", "--epochs", "--batch-size", "--lr",
        "--device",
    ):  # fmt: skip
        assert flag in text, flag
    assert "Adam step size (default: 0.001)" in " ".join(text.split())


# --------------------------------------------------------------------------- defaults and families


def test_default_settings_train_on_the_grey_level_digits(tmp_path, capsys):
    """The issue's command: `pyrovae train --dataset digits --epochs 1 --out runs/d`."""
    out = tmp_path / "d"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "binarized by a fresh Bernoulli draw of every minibatch (--binarize dynamic" in printed
    assert "trained 1 epoch in" in printed and "graph path, --compile auto" in printed
    vae = VAE.load(out / "model.pt")
    assert vae.train_config_.binarize == "dynamic" and vae.train_config_.compile == "auto"


def test_compile_auto_is_the_default_and_equals_eager(tmp_path, capsys):
    assert TrainConfig().compile == "auto"
    records = {}
    for mode in ("auto", "none"):
        out = tmp_path / mode
        assert main(train(out, "--compile", mode)) == 0
        printed = capsys.readouterr().out
        assert ("graph path" if mode == "auto" else "eager path") in printed
        records[mode] = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    for auto, eager in zip(records["auto"], records["none"], strict=True):
        # the same parameters; the per-step losses are summed in another order
        assert auto["valid_elbo"] == eager["valid_elbo"]
        assert auto["train_elbo"] == pytest.approx(eager["train_elbo"], rel=1e-6)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--prior", "mixture", "--prior-components", "3"], {"prior": "mixture"}),
        (["--prior", "vamp", "--guide", "full"], {"prior": "vamp", "guide": "full"}),
        (["--guide", "low-rank", "--guide-rank", "1"], {"guide": "low-rank", "guide_rank": 1}),
        (["--guide", "flow", "--flows", "1"], {"guide": "flow", "num_flows": 1}),
        (["--network", "conv"], {"network": "conv"}),
        (["--top-latent-dim", "2", "--top-hidden", "8"], {"top_latent_dim": 2}),
        (["--condition", "labels"], {"condition_dim": 10}),
        (["--likelihood", "continuous-bernoulli"], {"likelihood": "continuous-bernoulli"}),
    ],
)
def test_every_model_family_is_reachable(tmp_path, options, expected):
    out = tmp_path / "run"
    assert main(train(out, "--quiet", *options)) == 0
    config = VAE.load(out / "model.pt").config.to_dict()
    for field, value in expected.items():
        assert config[field] == value, field


def test_conditional_model_samples_and_evaluates(tmp_path, capsys):
    out = tmp_path / "cvae"
    assert main(train(out, "--quiet", "--condition", "labels")) == 0
    sample = ["sample", "--model", str(out), "--num", "4", "--label", "3"]
    assert main([*sample, "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["evaluate", "--model", str(out), "--num-samples", "2", "--ks", "1", "-q"]) == 0
    assert "log_px" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_spec_file_sets_the_model_and_flags_override_it(tmp_path, suffix):
    from pyrovae.config import VAEConfig

    spec = tmp_path / f"model{suffix}"
    save_spec(VAEConfig(num_features=64, latent_dim=3, hidden_sizes=(12,), prior="mixture",
                        prior_components=2, image_shape=(8, 8)), spec)  # fmt: skip
    out = tmp_path / "run"
    arguments = ["train", "--epochs", "1", "--batch-size", "256", "--spec", str(spec)]
    assert main([*arguments, "--latent-dim", "4", "--out", str(out), "--quiet"]) == 0
    config = VAE.load(out / "model.pt").config
    assert config.prior == "mixture" and config.prior_components == 2
    assert config.hidden_sizes == (12,)  # from the file: --hidden not given
    assert config.latent_dim == 4  # the command line wins


def test_spec_for_other_data_is_refused(tmp_path, capsys):
    from pyrovae.config import VAEConfig

    spec = tmp_path / "mnist.json"
    save_spec(VAEConfig(num_features=784, image_shape=(28, 28)), spec)
    assert main(train(tmp_path / "run", "--spec", str(spec))) == 2
    err = capsys.readouterr().err
    assert "num_features=784" in err and "digits" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- runs are kept


def test_a_run_is_not_replaced_without_resume_or_force(run_dir, capsys):
    before = (run_dir / "model.pt").read_bytes()
    assert main(train(run_dir)) == 2
    err = capsys.readouterr().err
    assert "already holds a trained model" in err and "--resume" in err and "--force" in err
    assert (run_dir / "model.pt").read_bytes() == before


def test_force_replaces_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train(out, "-q")) == 0
    assert main(train(out, "-q", "--force", "--seed", "1")) == 0
    assert VAE.load(out / "model.pt").train_config_.seed == 1
    # --resume keeps the run's own settings where the command line says nothing
    assert main(["train", "--out", str(out), "--epochs", "2", "--resume", "-q"]) == 0
    resumed = VAE.load(out / "model.pt")
    assert len(resumed.history_) == 2 and resumed.train_config_.seed == 1
    assert resumed.config.hidden_sizes == (16,)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # --resume and --force together make no sense
        main(train(out, "--resume", "--force"))


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        assert main(train(out)) == 2
        err = capsys.readouterr().err
        assert f"in use by process {os.getpid()}" in err and str(lock.path) in err
        assert not (out / "model.pt").exists()
    assert not lock.path.exists()
    assert main(train(out, "-q")) == 0


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    lock = tmp_path / "run.lock"
    lock.write_text(f"{dead.pid} somehost\n")
    assert main(train(out)) == 0
    assert f"took over the stale lock {lock} of process {dead.pid}" in capsys.readouterr().out
    assert not lock.exists() and (out / "model.pt").is_file()


# --------------------------------------------------------------------------- evaluation data


def evaluate_csv(model: Path, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.csv"
    arguments = ["evaluate", "--model", str(model), "--num-samples", "8", "--ks", "1,4"]
    assert main([*arguments, "--out", str(out), "-q", *extra]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}, str(out)


@pytest.mark.parametrize("mode", ["threshold", "sample"])
def test_cli_and_python_give_the_same_numbers(run_dir, tmp_path, capsys, mode):
    cli, _ = evaluate_csv(run_dir / "model.pt", tmp_path, "--binarize", mode, "--seed", "3")
    printed = capsys.readouterr().out
    test = load_digits().test
    if mode == "threshold":
        x = threshold(test)
        assert "thresholded at 0.5 (--binarize threshold" in printed
    else:
        x = binarize(test, generator=torch.Generator().manual_seed(3))
        assert "one Bernoulli draw seeded with 3 (--binarize sample" in printed
    api = VAE.load(run_dir / "model.pt").evaluate(x, num_samples=8, ks=(1, 4), seed=3)
    for name in ("log_px", "elbo", "elbo_analytic", "iwae_4"):
        np.testing.assert_allclose(cli[name], api.per_datapoint[name], atol=2e-6, err_msg=name)


def test_evaluation_states_the_default_preparation(run_dir, tmp_path, capsys):
    default, _ = evaluate_csv(run_dir / "model.pt", tmp_path)
    assert "auto: the model was trained with --binarize dynamic" in capsys.readouterr().out
    sampled, _ = evaluate_csv(run_dir / "model.pt", tmp_path, "--binarize", "sample")
    np.testing.assert_array_equal(default["log_px"], sampled["log_px"])
    # grey levels under a Bernoulli likelihood: refused in words, not scored
    code = main(["evaluate", "--model", str(run_dir), "--num-samples", "2", "--binarize", "none"])
    assert code == 2
    assert "support" in capsys.readouterr().err


def test_evaluate_says_which_bounds_and_diagnostics_too_few_draws_leave_out(run_dir, capsys):
    assert main(["evaluate", "--model", str(run_dir), "--num-samples", "10", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "iwae_50" not in printed.split("note:")[0]
    assert "IWAE_k for k = 50 not computed" in printed and "--num-samples" in printed
    assert "k-hat" in printed.split("note:", 1)[1] and "K = 10" in printed


# --------------------------------------------------------------------------- files written


def test_sample_adds_a_suffix_only_when_none_is_given(run_dir, tmp_path, capsys):
    model = str(run_dir / "model.pt")
    assert main(["sample", "--model", model, "--num", "4", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]
    assert main(["sample", "--model", model, "--num", "4", "--out", str(tmp_path / "t.pdf")]) == 0
    assert (tmp_path / "t.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "t.pdf"]
    assert f"wrote {tmp_path / 't.pdf'}" in capsys.readouterr().out


def test_plot_writes_only_the_file_asked_for(run_dir, tmp_path, capsys):
    model = str(run_dir / "model.pt")
    assert main(["plot", "curves", "--model", model, "--out", str(tmp_path / "c.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]
    both = ["plot", "samples", "--model", model, "--out", str(tmp_path / "x.pdf")]
    assert main([*both, "--formats", "pdf", "png"]) == 0
    assert {"x.pdf", "x.png"} <= {p.name for p in tmp_path.iterdir()}
    conflict = ["plot", "samples", "--model", model, "--out", str(tmp_path / "y.png")]
    assert main([*conflict, "--formats", "pdf"]) == 2
    assert "--formats" in capsys.readouterr().err


def test_plot_errors_speak_in_cli_kinds(tmp_path, capsys):
    out = tmp_path / "run8"
    arguments = ["train", "--hidden", "16", "--latent-dim", "8", "--epochs", "1"]
    assert main([*arguments, "--batch-size", "256", "--out", str(out), "-q"]) == 0
    assert main(["plot", "manifold", "--model", str(out), "--out", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "latent_dim=8" in err and "pyrovae plot latent" in err
    assert "_figure" not in err
    assert not (tmp_path / "m.png").exists()


# --------------------------------------------------------------------------- output levels


def test_default_output_has_epoch_lines_and_no_bars(tmp_path, capsys):
    assert main(train(tmp_path / "a", "--epochs", "2")) == 0
    captured = capsys.readouterr()
    assert "epoch    1/2: train ELBO" in captured.out and "epoch    2/2" in captured.out
    assert "\r" not in captured.err and "it/s" not in captured.err


def test_quiet_prints_only_the_summary_and_verbose_the_settings(tmp_path, capsys):
    assert main(train(tmp_path / "q", "--quiet")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith("trained 1 epoch in")
        and lines[1].startswith("wrote")
    )
    assert main(train(tmp_path / "v", "--verbose")) == 0
    printed = capsys.readouterr().out
    assert "model: {" in printed and '"compile": "auto"' in printed and "epoch    1/1" in printed


@pytest.mark.parametrize("command", ["train", "evaluate", "sample", "plot"])
def test_threads_is_an_option_of_every_command(run_dir, tmp_path, monkeypatch, command):
    calls = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or original(n))
    before = torch.get_num_threads()
    arguments = {
        "train": train(tmp_path / "t", "-q"),
        "evaluate": ["evaluate", "--model", str(run_dir), "--num-samples", "2", "--ks", "1", "-q"],
        "sample": ["sample", "--model", str(run_dir), "--out", str(tmp_path / "s.png")],
        "plot": ["plot", "curves", "--model", str(run_dir), "--out", str(tmp_path / "c.png")],
    }[command]
    assert main([*arguments, "--threads", "3"]) == 0
    assert calls[0] == 3 and torch.get_num_threads() == before  # restored afterwards


# --------------------------------------------------------------------------- as a user runs it


def test_pyrovae_in_a_subprocess_two_writers_and_a_log_without_bars(tmp_path):
    """`python -m pyrovae.cli train` with its output in files (not a terminal): epoch lines,
    no bar redraws; a second writer on the same --out is refused with the first one's PID."""
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "pyrovae.cli",
        *train(out, "--epochs", "300", "--threads", "1"),
    ]
    with open(tmp_path / "log", "w") as log, open(tmp_path / "err", "w") as err:
        first = subprocess.Popen(command, stdout=log, stderr=err, env=environment)
        try:
            lock = tmp_path / "run.lock"
            for _ in range(600):  # the lock is taken first; wait for an epoch line too
                if lock.exists() and "epoch    1/300" in (tmp_path / "log").read_text():
                    break
                assert first.poll() is None, (tmp_path / "err").read_text()
                subprocess.run(["sleep", "0.1"])
            second = subprocess.run(
                [*command[:-2], "--epochs", "1", "--force"],
                env=environment, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        finally:
            first.terminate()
            first.wait(timeout=60)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"in use by process {first.pid}" in lines[0]
    log_text, err_text = (tmp_path / "log").read_text(), (tmp_path / "err").read_text()
    assert "epoch    1/300: train ELBO" in log_text
    assert "\r" not in err_text and "it/s" not in err_text
