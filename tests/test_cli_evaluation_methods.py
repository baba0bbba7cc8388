"""`pyrovae evaluate --method ais [--bdmc]`, `pyrovae compare` and `pyrovae gaps` (issue 15,
item 5): run through ``pyrovae.cli.main`` on tiny digits models trained once per module, the
numbers checked against the Python API on the same prepared points, and every expected
failure one line ``error: ...`` with exit status 2."""

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest

from pyrovae import VAE
from pyrovae.cli import AIS_DEFAULT_POINTS, build_parser, evaluation_data, main
from pyrovae.evaluation.ais import ais

SMALL = ["--hidden", "16", "--latent-dim", "2", "--batch-size", "256", "--quiet"]
AIS_FAST = ["--method", "ais", "--ais-steps", "8", "--ais-chains", "4"]


def trained(root: Path, name: str, *extra: str) -> Path:
    out = root / name
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two digits models of the same data (different seeds and lengths of training)."""
    root = tmp_path_factory.mktemp("methods")
    first = trained(root, "a", "--epochs", "2")
    second = trained(root, "b", "--seed", "1")
    return first, second


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def failure(capsys, argv: list[str]) -> str:
    """Run a command that must fail: exit status 2, one line 'error: ...', nothing else."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


# --------------------------------------------------------------------------- evaluate --method ais


def test_evaluate_ais_prints_a_lower_bound_and_writes_one_row_per_point(runs, tmp_path, capsys):
    run, _ = runs
    table = tmp_path / "ais.csv"
    argv = ["evaluate", "--model", str(run), *AIS_FAST, "--num-points", "12", "--out", str(table)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "the first 12 of 250 data points (--num-points)" in printed
    assert "AIS: 8 annealing steps (--ais-steps), 4 chains per data point" in printed
    assert "stochastic lower bound" in printed and "chains=4, steps=8" in printed
    rows = read_csv(table)
    assert len(rows) == 12 and list(rows[0])[:3] == ["data_point", "log_px", "log_px_se"]
    # the same numbers as the Python API on the same prepared points and seed
    vae = VAE.load(run / "model.pt")
    x = evaluation_data(vae, "digits", None, "test", seed=0)[:12]
    expected = ais(vae.model, vae.guide, x, num_steps=8, num_chains=4, seed=0)
    np.testing.assert_allclose([float(r["log_px"]) for r in rows], expected.log_px, atol=1e-5)


def test_evaluate_ais_takes_the_first_points_by_default(runs, capsys):
    run, _ = runs
    argv = ["evaluate", "--model", str(run), "--method", "ais", "--ais-steps", "2"]
    assert main([*argv, "--ais-chains", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"the first {AIS_DEFAULT_POINTS} of 250 data points" in printed
    assert f"N={AIS_DEFAULT_POINTS}, chains=2, steps=2" in printed


def test_evaluate_bdmc_prints_the_sandwich_width(runs, capsys):
    run, _ = runs
    argv = ["evaluate", "--model", str(run), *AIS_FAST, "--num-points", "4", "--bdmc"]
    assert main([*argv, "--bdmc-points", "5"]) == 0
    printed = capsys.readouterr().out
    assert "BDMC" in printed and "5 data points simulated from the model" in printed
    assert "mean width of the sandwich:" in printed
    assert "raise --ais-steps" in printed


# --------------------------------------------------------------------------- compare


def test_compare_prints_paired_differences_of_the_per_point_values(runs, tmp_path, capsys):
    first, second = runs
    table = tmp_path / "comparison.csv"
    argv = ["compare", str(first), str(second), "--num-samples", "50", "--num-points", "40"]
    assert main([*argv, "--out", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "paired se" in printed and "unpaired se" in printed and "N=40" in printed
    assert "50 draws per data point" in printed
    rows = read_csv(table)
    models = {row["first"]: float(row["mean"]) for row in rows if row["kind"] == "model"}
    (difference,) = [row for row in rows if row["kind"] == "difference"]
    assert float(rows[0]["mean"]) >= float(rows[1]["mean"])  # sorted by the estimate
    # the per-point log p(x) of each model, from the Python API on the same points
    x = evaluation_data(VAE.load(first / "model.pt"), "digits", None, "test", seed=0)[:40]
    values = {}
    for run in runs:
        result = VAE.load(run / "model.pt").evaluate(
            x, num_samples=50, ks=(1,), seed=0, latent_diagnostics=False
        )
        values[str(run)] = result.per_datapoint["log_px"]
        assert models[str(run)] == pytest.approx(values[str(run)].mean(), abs=1e-5)
    per_point = values[difference["first"]] - values[difference["second"]]
    assert float(difference["mean"]) == pytest.approx(per_point.mean(), abs=1e-5)
    paired = per_point.std(ddof=1) / np.sqrt(len(per_point))
    assert float(difference["se"]) == pytest.approx(paired, abs=1e-5)
    assert float(difference["mean"]) >= 0  # best minus the other


def test_compare_with_ais(runs, capsys):
    first, second = runs
    assert main(["compare", str(first), str(second), *AIS_FAST, "--num-points", "6"]) == 0
    printed = capsys.readouterr().out
    assert "AIS: 8 annealing steps" in printed and "N=6" in printed
    assert "paired se" in printed and "stochastic lower bound" in printed


def test_compare_refuses_models_of_other_data(runs, tmp_path, capsys):
    other = tmp_path / "twelve.pt"
    VAE(num_features=12, latent_dim=2, hidden_sizes=(8,)).save(other, {"dataset": "digits"})
    line = failure(capsys, ["compare", str(runs[0]), str(other)])
    assert "different numbers of features" in line and "64" in line and "12" in line


def test_compare_refuses_data_prepared_differently(runs, tmp_path, capsys):
    static = trained(tmp_path, "static", "--binarize", "static")
    line = failure(capsys, ["compare", str(runs[0]), str(static)])
    assert "--binarize sample" in line and "--binarize threshold" in line
    assert "pass --binarize threshold, sample or none" in line
    argv = ["compare", str(runs[0]), str(static), "--binarize", "threshold"]
    assert main([*argv, "--num-samples", "5", "--num-points", "5", "--quiet"]) == 0


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--quantity", "elbo", "--method", "ais"], "--method ais estimates log_px only"),
        (["--quantity", "iwae_100", "--num-samples", "50"], "raise --num-samples to 100"),
        (["--quantity", "likelihood"], "use log_px, elbo, elbo_analytic or iwae_<k>"),
        (["--method", "ais", "--num-samples", "5"], "--num-samples applies to --method is"),
        (["--ais-chains", "3"], "--ais-chains applies to --method ais"),
        (["--num-points", "251"], "--num-points 251: the split has only 250 data points"),
    ],
)
def test_compare_refuses_bad_options(runs, extra, expected, capsys):
    line = failure(capsys, ["compare", *map(str, runs), *extra])
    assert expected in line


def test_compare_refuses_one_model_or_the_same_model_twice(runs, capsys):
    first, _ = runs
    assert "two or more models" in failure(capsys, ["compare", str(first)])
    twice = failure(capsys, ["compare", str(first), str(first / "model.pt")])
    assert "given twice" in twice


# --------------------------------------------------------------------------- evaluate errors


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--ais-steps", "10"], "--ais-steps applies to --method ais"),
        (["--bdmc"], "--bdmc applies to --method ais"),
        (["--method", "ais", "--ks", "1,5"], "--ks applies to --method is"),
        (["--method", "ais", "--bdmc-points", "5"], "--bdmc-points applies with --bdmc"),
        (["--num-points", "1000"], "the split has only 250 data points"),
        (["--method", "ais", "--ais-steps", "0"], "expected a positive integer"),
    ],
)
def test_evaluate_refuses_options_the_method_ignores(runs, extra, expected, capsys):
    if "0" in extra:  # argparse's own usage error
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--model", str(runs[0]), *extra])
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err
        return
    assert expected in failure(capsys, ["evaluate", "--model", str(runs[0]), *extra])


def test_bdmc_refuses_a_conditional_model(tmp_path, capsys):
    run = trained(tmp_path, "conditional", "--condition", "labels")
    argv = ["evaluate", "--model", str(run), *AIS_FAST, "--bdmc"]
    assert "conditional model" in failure(capsys, argv)
    assert main(["evaluate", "--model", str(run), *AIS_FAST, "--num-points", "3", "-q"]) == 0


# --------------------------------------------------------------------------- gaps


def test_gaps_prints_the_decomposition(runs, tmp_path, capsys):
    table = tmp_path / "gaps.csv"
    argv = ["gaps", "--model", str(runs[0]), "--num-points", "8", "--num-samples", "20"]
    assert main([*argv, "--steps", "20", "--out", str(table)]) == 0
    printed = capsys.readouterr().out
    for name in ("approximation_gap", "amortization_gap", "inference_gap", "Adam steps"):
        assert name in printed, name
    rows = read_csv(table)
    assert len(rows) == 8
    for row in rows:
        total = float(row["approximation_gap"]) + float(row["amortization_gap"])
        assert total == pytest.approx(float(row["inference_gap"]), abs=1e-5)


def test_gaps_with_ais_log_px(runs, capsys):
    argv = ["gaps", "--model", str(runs[0]), "--num-points", "4", "--steps", "10", *AIS_FAST]
    assert main([*argv, "--num-samples", "10"]) == 0
    assert "log_px: AIS with 8 steps and 4 chains" in capsys.readouterr().out


def test_gaps_refuses_an_unsupported_guide(tmp_path, capsys):
    run = trained(tmp_path, "full", "--guide", "full")
    line = failure(capsys, ["gaps", "--model", str(run)])
    assert "guide 'full'" in line and "diagonal" in line


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["evaluate", "compare", "gaps"])
def test_help_shows_every_option_with_its_default(command, capsys):
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in commands.choices[command]._actions:
        if isinstance(action, argparse._HelpAction) or action.required or not action.option_strings:
            continue
        assert "(default:" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    if command != "gaps":
        assert f"the first {AIS_DEFAULT_POINTS} with --method ais" in shown
    assert "--method {is,ais}" in shown
