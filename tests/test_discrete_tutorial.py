"""The discrete-latent tutorial (docs/tutorials/discrete_global.*): its statements hold on a
fresh run, within four standard errors, and its stored output has the printed lines."""

import importlib.util
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials"


@pytest.fixture(scope="module")
def tutorial():
    previous = torch.get_default_dtype()
    spec = importlib.util.spec_from_file_location("discrete_global", PAGE / "discrete_global.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # sets float64 for its models
    yield module
    torch.set_default_dtype(previous)


def test_the_mixture_log_likelihood_matches_the_closed_form(tutorial):
    numbers = tutorial.mixture_study()
    assert abs(numbers["difference"]) < 4 * numbers["difference_se"] + 1e-4
    assert numbers["elbo"] < numbers["exact"]


def test_m2_matches_the_brute_force_sums_over_labels(tutorial):
    numbers = tutorial.m2_study()
    assert numbers["guided_sites"] == ["z"]
    assert abs(numbers["difference_unlabelled"]) < 4 * numbers["se_unlabelled"] + 1e-4
    assert abs(numbers["difference_labelled"]) < 4 * numbers["se_labelled"] + 1e-4


def test_the_stored_output_has_every_printed_line():
    stored = (PAGE / "discrete_global.output.txt").read_text()
    for start in (
        "1. Gaussian mixture",
        "exact log p(x):",
        "IS log p_hat(x):",
        "difference:",
        "2. M2 with half the labels",
        "unlabelled: log p_hat(x) - exact",
        "labelled:   log p_hat(x, y) - exact",
    ):
        assert start in stored, start
