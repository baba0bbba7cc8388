"""Smoke test of the semi-supervised M2 study (experiments/ss_vae.py) on a few hundred images:
the balanced draw of the labels, the split of the labelled test images, and one small run of
two seeds for each guide (training, classification by q(y | x) or by the model's posterior,
IS log p(x), summaries), then a second call that reuses the model files."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def study():
    path = PROJECT_ROOT / "experiments" / "ss_vae.py"
    spec = importlib.util.spec_from_file_location("ss_vae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_balanced_labels_draw_count_over_ten_distinct_images_of_each_class(study):
    pool_y = torch.arange(300) % 10
    chosen = study.balanced_labels(pool_y, 40, seed=3)
    assert len(set(chosen.tolist())) == 40
    assert np.bincount(pool_y[chosen].numpy(), minlength=10).tolist() == [4] * 10
    assert torch.equal(chosen, study.balanced_labels(pool_y, 40, seed=3))
    assert not torch.equal(chosen, study.balanced_labels(pool_y, 40, seed=4))
    with pytest.raises(ValueError, match="multiple of 10"):
        study.balanced_labels(pool_y, 45, seed=0)
    with pytest.raises(ValueError, match="only 30 images of digit"):
        study.balanced_labels(pool_y, 400, seed=0)


def test_label_copies_repeat_the_labelled_images_only(study):
    pool = (torch.arange(100.0)[:, None].expand(100, 3), torch.arange(100) % 10)
    unlabelled = torch.full((7, 3), -1.0)
    x, y, labelled = study.training_set(pool, unlabelled, 20, seed=0, copies=3)
    assert len(x) == 67 and labelled.sum() == 60 and not labelled[60:].any()
    assert torch.equal(x[:20], x[20:40]) and torch.equal(y[:20], y[40:60])
    assert torch.equal(pool[1][x[:60, 0].long()], y[:60])  # each image keeps its label
    with pytest.raises(ValueError, match="at least 1"):
        study.training_set(pool, unlabelled, 20, seed=0, copies=0)


def test_pool_and_held_out_test_set_are_disjoint_halves_of_the_labelled_split(study, data_dir):
    pool, test, unlabelled = study.split_data(data_dir, 50)
    assert len(pool[0]) == len(test[0]) == 5000 and len(unlabelled) == 50
    rows = {tuple(r) for r in pool[0].to(torch.uint8).numpy().tolist()}
    overlap = sum(tuple(r) in rows for r in test[0][:500].to(torch.uint8).numpy().tolist())
    assert overlap <= 5  # only duplicated images could coincide
    assert np.bincount(test[1].numpy(), minlength=10).min() > 300


@pytest.mark.parametrize("guide", ["amortize", "enumerate"])
def test_tiny_study_runs_end_to_end_and_reuses_its_models(
    study, tmp_path, data_dir, capsys, guide
):
    small = [
        "--guide", guide,
        "--runs", "20:0,20:1", "--unlabelled", "200", "--epochs", "1", "--hidden", "16",
        "--latent", "4", "--test-points", "200", "--posterior-samples", "4", "--is-points", "20",
        "--is-samples", "8",
        "--models", str(tmp_path), "--data-dir", str(data_dir),
    ]
    rows = study.main(small)
    output = capsys.readouterr().out
    assert output.count("trained in") == 2
    assert len(rows) == 2 and all(0 <= r["error"] <= 1 for r in rows)
    assert all(-784 * np.log(2) * 2 < r["log_px"] < 0 for r in rows)
    summary = (r"summary labels 20: 2 seed\(s\), error [\d.]+% \(between-seed SE [\d.]+\),"
               r" log p\(x\) -[\d.]+ \(between-seed SE [\d.]+\)")
    assert re.search(summary, output)
    assert output.count("on its own labelled images with the labels hidden") == 2
    setup = "classifier q(y|x)" if guide == "amortize" else "classifier p(y|x) by IS"
    assert setup in output
    again = study.main(small)  # the model files are reused: same numbers
    assert capsys.readouterr().out.count("file reused, trained in") == 2
    assert [r["error"] for r in again] == [r["error"] for r in rows]
    assert [r["log_px"] for r in again] == [r["log_px"] for r in rows]
