"""Tests of pyrovae.evaluation.comparison: paired differences and standard errors by hand, the
refusal of results on different points, and two linear-Gaussian models with exact log p(x)."""

import json
import math

import numpy as np
import pytest
import torch

from pyrovae.evaluation.comparison import Comparison, compare
from pyrovae.evaluation.importance import EvaluationResult, data_fingerprint
from pyrovae.models.latent_variable import LatentVariableModel
from pyrovae.models.linear_gaussian import LinearGaussianGuide, LinearGaussianModel

A = np.array([-10.0, -20.0, -30.0, -40.0])
B = np.array([-11.0, -20.5, -32.0, -40.5])  # A - B = 1, 0.5, 2, 0.5
C = np.array([-10.0, -21.0, -29.0, -42.0])  # A - C = 0, 1, -1, 2


def _result(values, fingerprint="abc", quantity="log_px"):
    columns = {quantity: np.asarray(values, dtype=np.float64), "elbo": np.asarray(values) - 1}
    return EvaluationResult(columns, num_samples=10, ks=(), data_fingerprint=fingerprint)


def test_paired_and_unpaired_standard_errors_by_hand():
    comparison = compare({"b": B, "a": A})
    assert isinstance(comparison, Comparison)
    assert [row["model"] for row in comparison.ranking()] == ["a", "b"]  # mean -25 > -26
    (row,) = comparison.differences()
    differences = np.array([1.0, 0.5, 2.0, 0.5])  # mean 1, sample variance 0.5
    assert row["first"] == "a" and row["second"] == "b"
    assert row["difference"] == pytest.approx(1.0, abs=1e-15)
    assert row["paired_se"] == pytest.approx(math.sqrt(0.5 / 4), rel=1e-14)
    assert row["paired_se"] == pytest.approx(differences.std(ddof=1) / 2, rel=1e-14)
    se_a, se_b = A.std(ddof=1) / 2, B.std(ddof=1) / 2
    assert row["unpaired_se"] == pytest.approx(math.sqrt(se_a**2 + se_b**2), rel=1e-14)
    assert row["unpaired_se"] > 15 * row["paired_se"]  # the point of pairing
    assert row["z"] == pytest.approx(1.0 / math.sqrt(0.125), rel=1e-14)


def test_several_models_against_the_best_and_all_pairs():
    models = {"c": C, "b": B, "a": A}  # means -25.5, -26, -25
    best = compare(models)
    assert [row["model"] for row in best.ranking()] == ["a", "c", "b"]
    assert best.best == "a"
    assert [(r["first"], r["second"]) for r in best.differences()] == [("a", "c"), ("a", "b")]
    a_minus_c = best.differences()[0]
    assert a_minus_c["difference"] == pytest.approx(0.5, abs=1e-15)
    # A - C = 0, 1, -1, 2: sample variance 5/3.
    assert a_minus_c["paired_se"] == pytest.approx(math.sqrt(5 / 3 / 4), rel=1e-14)
    everything = compare(models, pairs="all")
    pairs = [(r["first"], r["second"]) for r in everything.differences()]
    assert pairs == [("a", "c"), ("a", "b"), ("c", "b")]
    c_minus_b = everything.differences()[2]
    assert c_minus_b["difference"] == pytest.approx(0.5, abs=1e-15)  # -25.5 - (-26)

    table = everything.table()
    lines = table.splitlines()
    assert lines[1].startswith("a") and lines[2].startswith("c") and lines[3].startswith("b")
    assert "paired se" in table and "unpaired se" in table and "a - c" in table
    payload = json.loads(json.dumps(everything.to_dict()))
    assert payload["ranking"][0]["model"] == "a" and len(payload["differences"]) == 3


def test_identical_models_have_zero_difference():
    row = compare({"a": A, "again": A.copy()}).differences()[0]
    assert row["difference"] == 0.0 and row["paired_se"] == 0.0 and math.isnan(row["z"])


def test_results_on_different_points_are_refused():
    with pytest.raises(ValueError, match="different numbers of points.*N=4.*N=3"):
        compare({"a": _result(A), "b": _result(B[:3])})
    with pytest.raises(ValueError, match="different data points.*fingerprints differ"):
        compare({"a": _result(A, "abc"), "b": _result(B, "abd")})
    x = torch.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError, match="the data passed"):
        compare({"a": _result(A, "abc"), "b": _result(B, "abc")}, x)
    # The right fingerprint passes; a plain array has none and is named as unchecked.
    good = data_fingerprint(x)
    comparison = compare({"a": _result(A, good), "b": _result(B, good), "c": C}, x)
    assert comparison.fingerprint == good and comparison.unchecked == ("c",)
    assert "data fingerprint unknown for c" in comparison.table()


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="at least two models"):
        compare({"a": A})
    with pytest.raises(ValueError, match="pairs must be one of best, all"):
        compare({"a": A, "b": B}, pairs="some")
    with pytest.raises(ValueError, match=r"'a' has no column 'iwae_5' \(it has: elbo, log_px\)"):
        compare({"a": _result(A), "b": _result(B)}, quantity="iwae_5")
    with pytest.raises(ValueError, match="not all finite"):
        compare({"a": A, "b": np.array([0.0, np.nan, 1.0, 2.0])})


def test_other_quantities_are_compared():
    comparison = compare({"a": _result(A), "b": _result(B)}, quantity="elbo")
    assert comparison.differences()[0]["difference"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def two_factor_models():
    """The model that generated the data and one with noise 1.5 times larger, each with its
    best diagonal guide; 60 points from the first, with their exact log p(x) under both."""
    true = LinearGaussianModel.random(5, 2, seed=3)
    noisy = LinearGaussianModel(true.weight, true.bias, 1.5 * true.noise_scale)
    x = true.sample_data(60, seed=4)
    fitted = {
        name: LatentVariableModel(model, LinearGaussianGuide.optimal_for(model).perturbed(1.2))
        for name, model in (("true", true), ("noisy", noisy))
    }
    with torch.no_grad():
        exact = {"true": true.log_marginal(x).numpy(), "noisy": noisy.log_marginal(x).numpy()}
    return fitted, x, exact


def test_two_linear_gaussian_models(two_factor_models):
    fitted, x, exact = two_factor_models
    comparison = compare(fitted, x, num_samples=200, seed=0)
    assert comparison.best == "true" and comparison.unchecked == ()
    assert comparison.fingerprint == data_fingerprint(x)
    (row,) = comparison.differences()
    expected = float((exact["true"] - exact["noisy"]).mean())
    # Importance-sampling error per point is far smaller than the spread between points:
    # the difference matches the exact one within 4 paired standard errors.
    assert abs(row["difference"] - expected) < 4 * row["paired_se"]
    assert row["paired_se"] < 0.5 * row["unpaired_se"]
    # The exact per-point values give exactly the exact difference.
    exact_row = compare(exact).differences()[0]
    assert exact_row["difference"] == pytest.approx(expected, rel=1e-12)
    # Mixing an evaluated model with exact arrays: the arrays are unchecked.
    mixed = compare({"true": fitted["true"], "noisy exact": exact["noisy"]}, x, num_samples=50)
    assert mixed.unchecked == ("noisy exact",)
    # An IWAE bound is evaluated on request.
    iwae = compare(fitted, x, quantity="iwae_5", num_samples=20, seed=0)
    assert iwae.best == "true"


def test_models_evaluated_on_other_points_are_refused(two_factor_models):
    fitted, x, _ = two_factor_models
    result = fitted["true"].evaluate(x[:30], num_samples=10, ks=(1,), latent_diagnostics=False)
    other = fitted["noisy"].evaluate(x[30:], num_samples=10, ks=(1,), latent_diagnostics=False)
    with pytest.raises(ValueError, match="fingerprints differ"):
        compare({"true": result, "noisy": other})
    with pytest.raises(ValueError, match="fingerprints differ"):
        compare({"true": result, "noisy": fitted["noisy"]}, x[30:], num_samples=10)
