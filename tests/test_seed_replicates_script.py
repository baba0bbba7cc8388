"""Smoke test of the seed-replicate study (experiments/seed_replicates.py) on a few hundred
images: two seeds of each objective, IS, the seed comparison, AIS from the guide and the
prior with bootstrap intervals, the gap check and the provenance lines; a second call reuses
the model files instead of training again."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def study():
    path = PROJECT_ROOT / "experiments" / "seed_replicates.py"
    spec = importlib.util.spec_from_file_location("seed_replicates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n(study):
    import numpy as np

    values = np.random.default_rng(0).standard_exponential(400)
    low, high = study.bootstrap_interval(values)
    assert low < values.mean() < high
    narrow = study.bootstrap_interval(np.tile(values, 4))
    assert narrow[1] - narrow[0] < (high - low) * 0.6  # about half for 4 times the points


@pytest.mark.slow
def test_study_runs_end_to_end_and_reuses_its_models(study, tmp_path, data_dir, capsys):
    small = [
        "--models", str(tmp_path), "--seeds", "0,1", "--epochs", "1", "--hidden", "16",
        "--latent", "4", "--train-points", "300", "--valid-points", "100",
        "--test-points", "20", "--is-samples", "50", "--ais-points", "4", "--ais-steps", "10",
        "--data-dir", str(data_dir),
    ]
    study.main(small)
    output = capsys.readouterr().out
    assert output.count("trained ") == 4
    assert re.search(r"IWAE - VAE: [-+][\d.]+, between-seed SE [\d.]+ \(2 independent", output)
    assert output.count("95% bootstrap") == 1
    assert len(re.findall(r"\[[-+][\d.]+, [-+][\d.]+\]", output)) == 4
    assert "guide - prior start (paired)" in output
    assert re.search(r"^\s+1000\s+[\d.-]+\s+[\d.-]+ ± [\d.]+", output, re.M)
    assert len(re.findall(r"sha256 [0-9a-f]{64}", output)) == 5  # data and four models
    study.main(small)  # the model files are reused: same numbers, no training
    again = capsys.readouterr().out
    assert "trained " not in again
    def seed_table(text: str) -> str:  # the timings of the AIS table differ between runs
        return text.split("## IWAE k=5")[1].split("## AIS")[0]

    assert seed_table(again) == seed_table(output)
