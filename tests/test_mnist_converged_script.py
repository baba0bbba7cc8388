"""Smoke test of the converged-MNIST study script (experiments/mnist_converged.py) on a few
hundred images: train with the plateau schedule, resume, evaluate every stage, compare."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def study():
    path = PROJECT_ROOT / "experiments" / "mnist_converged.py"
    spec = importlib.util.spec_from_file_location("mnist_converged", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_study_trains_resumes_evaluates_and_compares(study, tmp_path, data_dir, capsys):
    small = ["--train-points", "300", "--valid-points", "100", "--compile", "none", "--quiet"]
    common = [*small, "--data-dir", str(data_dir)]
    vae, iwae = str(tmp_path / "vae"), str(tmp_path / "iwae")
    study.main(["train", "--max-epochs", "1", *common, "--out", vae])
    study.main(["train", "--max-epochs", "2", *common, "--out", vae])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs"] == 2  # resumed, not restarted
    study.main(
        [
            "train",
            "--objective",
            "iwae",
            "--particles",
            "2",
            "--max-epochs",
            "1",
            *common,
            "--out",
            iwae,
        ]
    )
    evaluation = [
        "--is-points",
        "12",
        "--is-samples",
        "60",
        "--block",
        "6",
        "--ais-points",
        "4",
        "--ais-block",
        "2",
        "--ais-steps",
        "5",
        "--ais-chains",
        "2",
        "--data-dir",
        str(data_dir),
    ]
    study.main(
        [
            "evaluate",
            "--run",
            vae,
            *evaluation,
            "--bdmc-points",
            "3",
            "--bdmc-steps",
            "3,6",
            "--gap-points",
            "4",
        ]
    )
    study.main(["evaluate", "--run", iwae, *evaluation, "--stages", "is,ais"])
    assert len(np.load(tmp_path / "vae" / "is.npz")["log_px"]) == 12
    assert json.loads((tmp_path / "vae" / "gaps.json").read_text())["log_px_from"] == "ais"
    assert set(json.loads((tmp_path / "vae" / "bdmc.json").read_text())["by_steps"]) == {"3", "6"}
    capsys.readouterr()
    study.main(["compare", vae, iwae])
    table = capsys.readouterr().out
    assert "12 common test points" in table and "4 common test points" in table
