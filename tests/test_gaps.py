"""Tests of pyrovae.evaluation.gaps: the approximation/amortization gap decomposition, exact on
the linear-Gaussian model, and its refusals."""

import numpy as np
import pytest
import torch

from pyrovae import VAE
from pyrovae.evaluation.gaps import (
    SUPPORTED_FAMILIES,
    decompose_gaps,
    gap_decomposition,
    local_guide,
)
from pyrovae.evaluation.importance import evaluate
from pyrovae.models.linear_gaussian import (
    LinearGaussianGuide,
    LinearGaussianModel,
    exact_posterior_kl,
    gaussian_kl,
    importance_weight_variance,
)


@pytest.fixture(scope="module")
def linear_gaussian():
    """A factor-analysis model (D=6, L=2, heteroscedastic noise: its posterior covariance is
    not diagonal, so the best diagonal Gaussian keeps a KL > 0), 20 points from it, and an
    amortized guide that is wider than the best diagonal one and shifted."""
    model = LinearGaussianModel.random(6, 2, seed=0)
    x = model.sample_data(20, seed=1)
    best = LinearGaussianGuide.optimal_for(model)
    guide = best.perturbed(scale_factor=1.4, shift=torch.tensor([0.3, -0.2], dtype=torch.float64))
    return model, x, best, guide


@pytest.fixture(scope="module")
def exact_gaps(linear_gaussian):
    """The decomposition with the exact log p(x), and the closed-form KLs it must recover."""
    model, x, best, guide = linear_gaussian
    with torch.no_grad():
        log_px = model.log_marginal(x)
        kl_amortized = exact_posterior_kl(model, guide, x).numpy()
        kl_best = exact_posterior_kl(model, best, x).numpy()
    result = gap_decomposition(
        model, guide, x, log_px=log_px, num_samples=1000, steps=250, draws=8, seed=0
    )
    return result, kl_amortized, kl_best


def _mean_within(values: np.ndarray, expected: np.ndarray, slack: float) -> None:
    """mean(values - expected) is 0 within 4 standard errors (over points) plus ``slack``."""
    deviation = values - expected
    se = deviation.std(ddof=1) / np.sqrt(len(deviation))
    assert abs(deviation.mean()) < 4 * se + slack, (deviation.mean(), se)


def test_amortization_gap_is_the_difference_of_exact_kls(exact_gaps):
    result, kl_amortized, kl_best = exact_gaps
    columns = result.per_datapoint
    # log p(x) - ELBO(q) = KL(q || p(z|x)), hence ELBO(q*) - ELBO(q) = KL(q) - KL(q*).
    assert (kl_amortized - kl_best).mean() > 0.5  # the test discriminates: a large gap
    _mean_within(columns["amortization_gap"], kl_amortized - kl_best, slack=0.01)
    # The approximation gap is KL(q* || p(z|x)) = 0.5 (sum log Lambda_ll - log det Lambda),
    # the same for every x and > 0 since the posterior covariance is not diagonal.
    assert kl_best.min() > 0.05 and np.ptp(kl_best) < 1e-9
    _mean_within(columns["approximation_gap"], kl_best, slack=0.01)
    # The two gaps add up to the inference gap exactly, and it is KL(q || p(z|x)).
    np.testing.assert_allclose(
        columns["approximation_gap"] + columns["amortization_gap"],
        columns["inference_gap"],
        atol=1e-9,
    )
    _mean_within(columns["inference_gap"], kl_amortized, slack=0.0)
    assert result.convergence.converged
    assert result.convergence.final_elbo > result.convergence.initial_elbo


def test_optimized_parameters_are_the_best_diagonal_gaussian(exact_gaps, linear_gaussian):
    """The optimizer itself, without Monte Carlo noise in the check: the exact KL of the q*_x
    it found exceeds the optimum's by at most 0.01 nats per point."""
    result, _, kl_best = exact_gaps
    model, x, best, _ = linear_gaussian
    loc = torch.from_numpy(result.optimal_loc)
    covariance = torch.diag_embed(torch.from_numpy(result.optimal_scale) ** 2)
    with torch.no_grad():
        kl_found = gaussian_kl(
            loc, covariance, model.posterior_mean(x), model.posterior_covariance()
        ).numpy()
    excess = kl_found - kl_best
    assert excess.min() > -1e-9  # nothing beats the closed-form optimum
    assert excess.max() < 0.01, excess.max()
    torch.testing.assert_close(
        torch.from_numpy(result.optimal_scale),
        best.scale.detach().expand(20, 2),
        rtol=0.1,
        atol=0.0,
    )


def test_gap_result_exports(exact_gaps):
    result, _, _ = exact_gaps
    names = [row["quantity"] for row in result.summary()]
    assert names == [
        "log_px",
        "elbo_amortized",
        "elbo_optimal",
        "inference_gap",
        "approximation_gap",
        "amortization_gap",
    ]
    table = result.table()
    assert "amortization_gap" in table and "given by the caller" in table
    assert "converged" in table
    payload = result.to_dict()
    assert payload["convergence"]["converged"] is True
    assert len(payload["per_datapoint"]["elbo_optimal"]) == 20


def test_importance_sampled_log_px_by_default(linear_gaussian):
    model, x, best, _ = linear_gaussian
    wide = best.perturbed(scale_factor=1.4)
    result = gap_decomposition(model, wide, x[:8], num_samples=500, steps=60, seed=1)
    assert "importance sampling" in result.log_px_source
    # The same numbers as evaluate() with the same seed and settings.
    direct = evaluate(
        model,
        wide,
        x[:8],
        num_samples=500,
        ks=(1,),
        seed=1,
        max_pairs=2**14,
        latent_diagnostics=False,
    )
    np.testing.assert_array_equal(result.per_datapoint["log_px"], direct.per_datapoint["log_px"])
    np.testing.assert_array_equal(
        result.per_datapoint["elbo_amortized"], direct.per_datapoint["elbo_analytic"]
    )
    # Within 4 exact Monte Carlo standard errors sqrt(V / K) of log p(x) (bias V / 2K).
    with torch.no_grad():
        exact = model.log_marginal(x[:8]).numpy()
        variance = importance_weight_variance(model, wide, x[:8]).numpy()
    deviation = np.abs(result.per_datapoint["log_px"] - exact)
    assert (deviation < 4 * np.sqrt(variance / 500) + variance / 1000).all()


def test_given_log_px_is_checked(linear_gaussian):
    model, x, _, guide = linear_gaussian
    with pytest.raises(ValueError, match=r"one value per data point, shape \(20,\)"):
        gap_decomposition(model, guide, x, log_px=np.zeros(3), steps=1, num_samples=2)


@pytest.mark.parametrize(
    ("options", "found"),
    [
        ({"guide": "full"}, "MultivariateNormal"),
        ({"guide": "low-rank", "guide_rank": 1}, "LowRankMultivariateNormal"),
        ({"guide": "flow"}, "TransformedDistribution"),
        ({"top_latent_dim": 2}, "2 latent sites"),
    ],
)
def test_unsupported_guides_are_refused_by_name(options, found):
    vae = VAE(num_features=8, latent_dim=2, hidden_sizes=(8,), likelihood="bernoulli", **options)
    x = torch.bernoulli(torch.full((4, 8), 0.5))
    with pytest.raises(ValueError) as error:
        decompose_gaps(vae, x, steps=1, num_samples=2)
    assert found in str(error.value)
    assert SUPPORTED_FAMILIES in str(error.value)


def test_vae_diagonal_guide(tmp_path):
    """Untrained VAE: optimizing each point's q from the encoder's output gains a lot."""
    vae = VAE(num_features=8, latent_dim=2, hidden_sizes=(8,), likelihood="bernoulli", seed=0)
    x = torch.bernoulli(torch.full((6, 8), 0.5), generator=torch.Generator().manual_seed(0))
    local = local_guide(vae.guide, x)
    loc, scale = vae.guide.encoder(x)
    torch.testing.assert_close(local.loc, loc.detach())
    torch.testing.assert_close(local.scale, scale.detach())
    result = decompose_gaps(vae, x, steps=40, draws=4, num_samples=200, seed=0)
    columns = result.per_datapoint
    assert all(values.shape == (6,) for values in columns.values())
    assert columns["amortization_gap"].mean() > 0
    assert result.optimal_loc.shape == (6, 2)
