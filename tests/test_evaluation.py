"""Tests of pyrovae.evaluation: the bounds, PSIS k-hat, the traced path, chunking, input
checks, the result object and the latent-use diagnostics."""

import copy
import csv
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from pyrovae import VAE
from pyrovae.data import load_digits, threshold
from pyrovae.evaluation.arviz_compat import arviz_major_version, pareto_khat, to_arviz
from pyrovae.evaluation.bounds import elbo, importance_estimate, iwae_bound, log_mean_exp
from pyrovae.evaluation.importance import EvaluationResult, evaluate
from pyrovae.evaluation.latents import latent_use
from pyrovae.evaluation.traces import particle_terms

LATENT_DIM = 2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return threshold(data.train), threshold(data.valid), threshold(data.test)


@pytest.fixture(scope="module")
def trained_vae(digits):
    """A small Bernoulli VAE trained for a few epochs on thresholded 8x8 digits."""
    train, valid, _ = digits
    vae = VAE(num_features=64, latent_dim=LATENT_DIM, hidden_sizes=(32,), likelihood="bernoulli")
    history = vae.fit(
        train, valid, epochs=8, batch_size=64, learning_rate=3e-3, progress=False, seed=0
    )
    # Trained: the ELBO improved over the first epoch's (a guard against testing a stub).
    assert history.records[-1]["valid_elbo"] > history.records[0]["valid_elbo"] + 3
    vae.eval()
    return vae


def hand_log_weights(vae, x, z):
    """log p(z) + log p(x | z) - log q(z | x) for draws z of shape (K, N, L), in plain torch."""
    loc, scale = vae.guide.encoder(x)
    logits = vae.model.likelihood.logits(vae.model.decoder(z))
    log_lik = Bernoulli(logits=logits).log_prob(x).sum(-1)
    log_prior = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    return log_lik, log_prior, log_q


def gaussian_model(x):
    """z ~ N(0, I), x | z ~ N(z, 0.5^2 I) inside the plate "data"."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)


def exact_posterior_guide(x):
    """q(z | x) = p(z | x) for :func:`gaussian_model`: N(0.8 x, 0.2 I)."""
    variance = 1.0 / (1.0 + 1.0 / 0.25)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x * variance / 0.25, variance**0.5).to_event(1))


def prior_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))


# --------------------------------------------------------------------------- bounds


def test_importance_estimate_matches_hand_computation():
    log_weights = torch.tensor(
        [[0.0, -1.0, 2.0], [math.log(2.0), -1.0, -3.0], [math.log(3.0), -1.0, 0.5]],
        dtype=torch.float64,
    )
    log_px, se, ess = importance_estimate(log_weights)
    weights = log_weights.exp().numpy()
    count = weights.shape[0]
    expected_log_px = np.log(weights.mean(0))
    expected_ess = weights.sum(0) ** 2 / (weights**2).sum(0)
    # Delta method: sd(w) / (sqrt(K) mean(w)), equal to sqrt((K / ESS - 1) / (K - 1)).
    expected_se = weights.std(0, ddof=1) / np.sqrt(count) / weights.mean(0)
    np.testing.assert_allclose(log_px.numpy(), expected_log_px, rtol=1e-12)
    np.testing.assert_allclose(ess.numpy(), expected_ess, rtol=1e-12)
    np.testing.assert_allclose(se.numpy(), expected_se, rtol=1e-10)
    np.testing.assert_allclose(
        se.numpy(), np.sqrt((count / expected_ess - 1) / (count - 1)), rtol=1e-10, atol=1e-7
    )
    # Column 0: weights 1, 2, 3 -> log 2; ESS 36 / 14.
    assert log_px[0].item() == pytest.approx(math.log(2.0), abs=1e-14)
    assert ess[0].item() == pytest.approx(36 / 14, rel=1e-12)
    # Column 1: equal weights -> log p_hat = the weight, ESS = K and zero standard error
    # (up to the rounding of exp(2 log S - log sum w^2) near K: sqrt(eps)-sized).
    assert log_px[1].item() == pytest.approx(-1.0, abs=1e-14)
    assert ess[1].item() == pytest.approx(count, rel=1e-12)
    assert se[1].item() <= 1e-7
    assert log_px.dtype == se.dtype == ess.dtype == torch.float64


def test_importance_estimate_dominant_weight_and_equal_weights():
    count = 1000
    log_weights = torch.full((count, 2), -50.0, dtype=torch.float64)
    log_weights[17, 0] = 0.0  # one weight e^50 times larger than the others
    log_weights[:, 1] = 0.25
    log_px, se, ess = importance_estimate(log_weights)
    assert ess[0].item() == pytest.approx(1.0, abs=1e-15 * count + 1e-12)
    assert ess[1].item() == pytest.approx(count, rel=1e-12)
    # ESS ~ 1 -> relative variance (K - 1) / (K - 1) = 1.
    assert se[0].item() == pytest.approx(1.0, rel=1e-9)
    assert se[1].item() <= 1e-7
    assert log_px[0].item() == pytest.approx(-math.log(count), rel=1e-12)
    assert log_px[1].item() == pytest.approx(0.25, abs=1e-14)


def test_iwae_bound_uses_disjoint_groups():
    generator = torch.Generator().manual_seed(1)
    log_weights = torch.randn(6, 4, generator=generator, dtype=torch.float64) * 3
    first = torch.logsumexp(log_weights[:3], 0) - math.log(3)
    second = torch.logsumexp(log_weights[3:], 0) - math.log(3)
    torch.testing.assert_close(iwae_bound(log_weights, 3), (first + second) / 2)
    torch.testing.assert_close(iwae_bound(log_weights, 1), log_weights.mean(0))
    torch.testing.assert_close(iwae_bound(log_weights, 6), importance_estimate(log_weights)[0])
    # K = 6, k = 4: one group of the first 4 draws (the last 2 are dropped).
    torch.testing.assert_close(
        iwae_bound(log_weights, 4), torch.logsumexp(log_weights[:4], 0) - math.log(4)
    )
    # Jensen: the bounds increase with k on the same draws (k dividing K).
    assert bool((iwae_bound(log_weights, 1) <= iwae_bound(log_weights, 2) + 1e-12).all())
    assert bool((iwae_bound(log_weights, 2) <= iwae_bound(log_weights, 6) + 1e-12).all())


@pytest.mark.parametrize("k", [0, 7, -1, 2.5, True])
def test_iwae_bound_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer between 1 and K=6"):
        iwae_bound(torch.zeros(6, 2), k)


def test_elbo_is_the_mean_log_weight():
    log_weights = torch.tensor([[1.0, -2.0], [3.0, -4.0], [-1.0, 0.0]])
    torch.testing.assert_close(elbo(log_weights), torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert elbo(log_weights).dtype == torch.float64


def test_bounds_reject_bad_shapes():
    for bad in (torch.zeros(5), torch.zeros(0, 3), torch.zeros(2, 3, 4)):
        with pytest.raises(ValueError, match=r"shape \(K, N\)"):
            importance_estimate(bad)


def test_extreme_log_weights_stay_finite():
    # Column 0: weights e^-1e4 and 1 -> log((e^-1e4 + 1) / 2) = -log 2, ESS 1.
    log_weights = torch.tensor([[-1e4, -1e4 + 3.0], [0.0, -1e4 - 2.0]], dtype=torch.float64)
    log_px, se, ess = importance_estimate(log_weights)
    assert bool(torch.isfinite(log_px).all() and torch.isfinite(se).all())
    assert log_px[0].item() == pytest.approx(-math.log(2.0), abs=1e-14)
    assert ess[0].item() == pytest.approx(1.0, abs=1e-12)
    # Column 1: -1e4 + log((e^3 + e^-2) / 2).
    expected = -1e4 + math.log((math.exp(3.0) + math.exp(-2.0)) / 2)
    assert log_px[1].item() == pytest.approx(expected, rel=1e-15, abs=1e-10)
    assert iwae_bound(log_weights, 1)[0].item() == pytest.approx(-5e3)
    assert bool(torch.isfinite(log_mean_exp(log_weights)).all())


def test_float32_log_weights_near_minus_1e4_use_float64():
    # -1e4, -9999, -9998 are exact in float32; exp() of them underflows in any dtype.
    log_weights = torch.tensor([[-1e4], [-9999.0], [-9998.0]], dtype=torch.float32)
    log_px, se, ess = importance_estimate(log_weights)
    e = math.e
    assert log_px.dtype == torch.float64
    assert log_px.item() == pytest.approx(-1e4 + math.log((1 + e + e**2) / 3), abs=1e-10)
    expected_ess = (1 + e + e**2) ** 2 / (1 + e**2 + e**4)
    # Log-domain rounding of ~1e4 * 2.2e-16 nats -> relative errors of a few 1e-12.
    assert ess.item() == pytest.approx(expected_ess, rel=1e-10)
    assert se.item() == pytest.approx(math.sqrt((3 / expected_ess - 1) / 2), rel=1e-9)
    assert iwae_bound(log_weights, 3).item() == pytest.approx(log_px.item(), abs=1e-10)


def test_nan_log_weight_names_the_data_point():
    log_weights = torch.zeros(4, 5)
    log_weights[2, 3] = float("nan")
    for function in (importance_estimate, elbo, lambda w: iwae_bound(w, 2)):
        with pytest.raises(ValueError, match="NaN log importance weight for data point 3"):
            function(log_weights)


# --------------------------------------------------------------------------- Pareto k-hat


def _normal_ratio_log_weights(sigma_q: float, rows: int, draws: int, seed: int) -> np.ndarray:
    """log N(z; 0, 1) - log N(z; 0, sigma_q^2) for z ~ N(0, sigma_q^2), shape (rows, draws)."""
    z = np.random.default_rng(seed).normal(0.0, sigma_q, size=(rows, draws))
    return -0.5 * z**2 + 0.5 * (z / sigma_q) ** 2 + np.log(sigma_q)


def test_pareto_khat_recovers_known_tail_index():
    # Proposal N(0, 0.5^2) narrower than the target N(0, 1): w = c exp(1.5 z^2), whose tail
    # P(w > t) ~ t^(-1/k) (log t)^(-1/2) has index k = 1 - sigma_q^2 / sigma_p^2 = 0.75.
    rows = 40
    khat = pareto_khat(_normal_ratio_log_weights(0.5, rows, 5000, seed=0))
    assert khat.shape == (rows,)
    assert bool(np.isfinite(khat).all())
    standard_error = khat.std(ddof=1) / np.sqrt(rows)
    # Spread-based SE of the mean is ~0.02; the slowly varying (log t)^(-1/2) factor biases the
    # GPD fit low by ~0.05-0.07 at K = 5000. Tolerance 0.1 ~ bias + 2 SE.
    assert standard_error < 0.03
    assert abs(khat.mean() - 0.75) < 0.1
    # Far above the finite-variance limit 0.5 in most rows.
    assert np.mean(khat > 0.5) > 0.9


def test_pareto_khat_bounded_weights_are_below_one_half():
    # Proposal N(0, 2^2) wider than the target: w <= 2 is bounded (k = -inf in theory).
    khat = pareto_khat(_normal_ratio_log_weights(2.0, 10, 2000, seed=1))
    assert khat.shape == (10,)
    assert bool((khat < 0.5).all())


def test_pareto_khat_shapes_and_arviz_version():
    assert arviz_major_version() == 0
    log_weights = np.random.default_rng(2).normal(size=(3, 200))
    assert pareto_khat(log_weights).shape == (3,)
    assert pareto_khat(log_weights[:1]).shape == (1,)
    assert pareto_khat(torch.from_numpy(log_weights)).shape == (3,)
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        pareto_khat(np.zeros(10))


def test_to_arviz_has_evaluation_group():
    import xarray

    dataset = xarray.Dataset({"log_px": ("data_point", np.arange(3.0))})
    container = to_arviz(dataset)
    assert "evaluation" in container.groups()
    np.testing.assert_array_equal(container.evaluation["log_px"].values, np.arange(3.0))


# --------------------------------------------------------------------------- traced path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_particle_terms_equal_hand_computation_on_trained_vae(trained_vae, digits, dtype):
    vae = copy.deepcopy(trained_vae).to(dtype)
    x = digits[2][:40].to(dtype)
    count, seed = 16, 11
    recorded = []
    vae.guide.register_forward_hook(lambda module, args, output: recorded.append(output))

    pyro.set_rng_seed(seed)
    terms = particle_terms(vae.model, vae.guide, x, num_particles=count, max_plate_nesting=1)
    (z,) = recorded
    assert z.shape == (count, 40, LATENT_DIM)

    with torch.no_grad():
        # Pyro's draw: the guide's Normal broadcast by the particle plate to batch shape
        # (K, N), rsample() = loc + scale * eps with eps a (K, N, L) standard normal.
        loc, scale = vae.guide.encoder(x)
        pyro.set_rng_seed(seed)
        eps = torch.randn(count, 40, LATENT_DIM, dtype=dtype)
        torch.testing.assert_close(z, loc + scale * eps, rtol=0, atol=0)
        log_lik, log_prior, log_q = hand_log_weights(vae, x, z)
        kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)

    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, expected in [
        ("log_p_obs", log_lik),
        ("log_p_latent", log_prior),
        ("log_q", log_q),
        ("log_weights", log_lik + log_prior - log_q),
    ]:
        value = getattr(terms, name)
        assert value.shape == (count, 40) and value.dtype == dtype, name
        torch.testing.assert_close(value, expected, rtol=rtol, atol=rtol * 10, msg=name)
    torch.testing.assert_close(terms.kl, kl.expand(count, 40), rtol=rtol, atol=rtol)
    assert terms.all_analytic


def test_evaluate_equals_hand_computation_for_the_same_draws(trained_vae, digits, float64):
    vae = copy.deepcopy(trained_vae).double()
    x = digits[2][:30].double()
    count = 12
    recorded = []
    vae.guide.register_forward_hook(lambda module, args, output: recorded.append(output))
    result = vae.evaluate(
        x, num_samples=count, ks=(1, 3, 12), seed=5, max_pairs=100, latent_diagnostics=False
    )
    # max_pairs=100 < K N: 8 data points per chunk; keep the draws of the K-particle passes
    # (not those of the memory probe, 32 draws of one point).
    assert result.pairs_per_pass == 100
    draws = [z for z in recorded if z.dim() == 3 and z.shape[0] == count]
    assert sum(z.shape[1] for z in draws) == 30
    z = torch.cat(draws, dim=1)
    assert z.shape == (count, 30, LATENT_DIM)
    with torch.no_grad():
        log_lik, log_prior, log_q = hand_log_weights(vae, x, z)
        loc, scale = vae.guide.encoder(x)
        kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)
    log_weights = log_lik + log_prior - log_q
    hand_log_px = torch.logsumexp(log_weights, 0) - math.log(count)
    columns = result.per_datapoint
    np.testing.assert_allclose(columns["log_px"], hand_log_px.numpy(), rtol=1e-12)
    np.testing.assert_allclose(columns["elbo"], log_weights.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(columns["elbo_analytic"], (log_lik.mean(0) - kl).numpy(), rtol=1e-12)
    groups = log_weights.reshape(4, 3, 30)
    np.testing.assert_allclose(
        columns["iwae_3"],
        (torch.logsumexp(groups, 1) - math.log(3)).mean(0).numpy(),
        rtol=1e-12,
    )
    np.testing.assert_allclose(columns["iwae_12"], columns["log_px"], rtol=1e-12)
    np.testing.assert_allclose(columns["gap"], columns["log_px"] - columns["elbo"], atol=1e-12)
    weights = torch.exp(log_weights - log_weights.max(0).values)
    ess = weights.sum(0) ** 2 / (weights**2).sum(0)
    np.testing.assert_allclose(columns["ess"], ess.numpy(), rtol=1e-10)
    # Sanity of the bounds on a trained model: ELBO <= log p_hat, every column length N.
    assert all(len(values) == 30 for values in columns.values())
    assert bool((columns["elbo"] <= columns["log_px"] + 1e-12).all())


def test_evaluate_recovers_exact_marginal_with_exact_posterior(float64):
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    result = evaluate(gaussian_model, exact_posterior_guide, x, num_samples=50, ks=(1, 5), seed=0)
    # With q = p(z | x) every weight equals p(x): all bounds are exact, ESS = K.
    marginal = Normal(0.0, math.sqrt(1.25)).log_prob(x).sum(-1).numpy()
    for name in ("log_px", "elbo", "iwae_1", "iwae_5"):
        np.testing.assert_allclose(result.per_datapoint[name], marginal, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(result.per_datapoint["ess"], 50.0, rtol=1e-12)
    assert result.per_datapoint["log_px_se"].max() < 1e-7
    # Analytic-KL ELBO: its log-likelihood term is still Monte Carlo; unbiased for log p(x).
    deviation = result.per_datapoint["elbo_analytic"] - marginal
    assert abs(deviation.mean()) < 4 * deviation.std(ddof=1) / np.sqrt(len(deviation)) + 1e-12


def test_exact_posterior_is_not_flagged_high_khat(float64):
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    result = evaluate(gaussian_model, exact_posterior_guide, x, num_samples=50, ks=(1,), seed=0)
    assert result.share_high_khat == 0.0
    # equal weights have no tail at all: reported as -inf, never as unreliable
    assert bool((result.per_datapoint["khat"] <= 0.5).all())


# --------------------------------------------------------------------------- chunking


def _delta_guide_for(vae):
    """Deterministic guide z = mu_phi(x): the log weights are free of Monte Carlo noise."""

    def guide(x):
        loc, _ = vae.guide.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(loc, event_dim=1))

    return guide


def test_chunking_does_not_change_deterministic_terms(trained_vae, digits, float64):
    vae = copy.deepcopy(trained_vae).double()
    x = digits[2][:13].double()
    guide = _delta_guide_for(vae)
    count = 5
    whole = particle_terms(vae.model, guide, x, num_particles=count, max_pairs=10_000)
    # max_pairs=3 < K: one data point per chunk and particle chunks of 3 and 2.
    chunked = particle_terms(vae.model, guide, x, num_particles=count, max_pairs=3)
    middle = particle_terms(vae.model, guide, x, num_particles=count, max_pairs=12)
    with torch.no_grad():
        loc, _ = vae.guide.encoder(x)
        log_lik, log_prior, _ = hand_log_weights(vae, x, loc.expand(count, -1, -1))
    for terms in (whole, chunked, middle):
        assert terms.log_weights.shape == (count, 13)
        torch.testing.assert_close(terms.log_weights, log_lik + log_prior, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms.log_q, torch.zeros(count, 13))
    # The stochastic guide's closed-form KL is deterministic too: same column order everywhere.
    kls = [
        particle_terms(vae.model, vae.guide, x, num_particles=count, max_pairs=pairs).kl
        for pairs in (3, 12, 10_000)
    ]
    for kl in kls[1:]:
        torch.testing.assert_close(kl, kls[0], rtol=1e-12, atol=1e-12)


def test_chunks_draw_fresh_particles_and_agree_statistically(trained_vae, digits):
    x = digits[2][:20]
    count = 100
    pyro.set_rng_seed(0)
    whole = particle_terms(trained_vae.model, trained_vae.guide, x, num_particles=count)
    pyro.set_rng_seed(0)
    chunked = particle_terms(
        trained_vae.model, trained_vae.guide, x, num_particles=count, max_pairs=30
    )
    # Particle chunks must not replay the same draws: all K N log q values distinct.
    assert torch.unique(chunked.log_q).numel() == count * 20
    # Per-datapoint ELBO estimates agree within Monte Carlo error (independent draws).
    difference = (whole.log_weights.mean(0) - chunked.log_weights.mean(0)).double()
    variance = (whole.log_weights.var(0) + chunked.log_weights.var(0)).double() / count
    z_scores = difference / variance.sqrt()
    assert float(z_scores.abs().max()) < 4.5  # 20 near-normal z-scores
    assert abs(float(z_scores.mean())) * math.sqrt(20) < 4


def test_evaluate_with_max_pairs_below_k(trained_vae, digits, float64):
    vae = copy.deepcopy(trained_vae).double()
    x = digits[2][:5].double()
    guide = _delta_guide_for(vae)
    result = evaluate(
        vae.model, guide, x, num_samples=20, ks=(1, 4, 20), max_pairs=7, latent_diagnostics=False
    )
    with torch.no_grad():
        loc, _ = vae.guide.encoder(x)
        log_lik, log_prior, _ = hand_log_weights(vae, x, loc)
    expected = (log_lik + log_prior).numpy()
    for name in ("log_px", "elbo", "elbo_analytic", "iwae_1", "iwae_4", "iwae_20"):
        np.testing.assert_allclose(result.per_datapoint[name], expected, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(result.per_datapoint["ess"], 20.0, rtol=1e-12)
    # Stochastic guide, same budget: N values per column, all finite.
    stochastic = vae.evaluate(x, num_samples=20, ks=(1, 4), max_pairs=7, seed=0)
    for name, values in stochastic.per_datapoint.items():
        assert values.shape == (5,), name
        if name != "khat":
            assert bool(np.isfinite(values).all()), name


# --------------------------------------------------------------------------- bad input


def test_mismatched_site_names_are_refused():
    def guide_w(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(x, 1.0).to_event(1))

    with pytest.raises(ValueError, match="'z'"):
        particle_terms(gaussian_model, guide_w, torch.zeros(4, 2), num_particles=2)


def test_mismatched_site_names_message_names_both_sites():
    def guide_w(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(x, 1.0).to_event(1))

    with pytest.raises(ValueError) as error:
        particle_terms(gaussian_model, guide_w, torch.zeros(4, 2), num_particles=2)
    assert "'z'" in str(error.value) and "'w'" in str(error.value)


def test_guide_missing_a_latent_site_is_named():
    def two_latents(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            scale = pyro.sample("s", dist.LogNormal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(0.0, scale.unsqueeze(-1)).to_event(1), obs=x)

    with pytest.raises(ValueError, match="does not sample the model's latent site.*'s'"):
        particle_terms(two_latents, prior_guide, torch.ones(4, 2), num_particles=2)


def test_guide_extra_site_is_named():
    def guide_extra(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("extra", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    with pytest.raises(ValueError, match="'extra'.*not latent.*z"):
        particle_terms(gaussian_model, guide_extra, torch.ones(4, 2), num_particles=2)


def test_model_without_data_plate_lists_found_plates():
    def model(x):
        with pyro.plate("points", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("points", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"no plate named 'data' \(plates found: points\)"):
        particle_terms(model, guide, torch.ones(4, 2), num_particles=2)
    with pytest.raises(ValueError, match="no plate named 'data'"):
        evaluate(model, guide, torch.ones(4, 2), num_samples=2, ks=(1,))
    # The same model works when its plate is named.
    terms = particle_terms(model, guide, torch.ones(4, 2), num_particles=2, data_plate="points")
    assert terms.log_weights.shape == (2, 4)


def test_global_latent_is_refused_by_name():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            loc = mu[..., None] * torch.ones(x.shape[-1])
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))

    with pytest.raises(ValueError, match="site 'mu' is not inside the data plate 'data'"):
        particle_terms(model, guide, torch.ones(4, 2), num_particles=2)


@pytest.mark.parametrize("count", [0, -3, 2.5, True])
def test_bad_number_of_samples(count):
    x = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"num_samples \(K\) must be a positive integer"):
        evaluate(gaussian_model, prior_guide, x, num_samples=count, ks=(1,))
    with pytest.raises(ValueError, match=r"num_particles \(K\) must be a positive integer"):
        particle_terms(gaussian_model, prior_guide, x, num_particles=count)


def test_bad_number_of_samples_through_vae(trained_vae, digits):
    with pytest.raises(ValueError, match=r"num_samples \(K\)"):
        trained_vae.evaluate(digits[2][:3], num_samples=0, ks=())


@pytest.mark.parametrize("ks", [(1, 11), (0,), (2.0,)])
def test_ks_outside_one_to_k_are_refused(ks):
    with pytest.raises(ValueError, match=r"each k must be an integer in \[1, K=10\]"):
        evaluate(gaussian_model, prior_guide, torch.ones(4, 2), num_samples=10, ks=ks)


def _nan_model(x):
    """Gaussian model whose likelihood is NaN where x == 0 (0 / 0 in the mean)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z * (x / x), 1.0, validate_args=False).to_event(1), obs=x)


def test_nan_log_likelihood_is_refused_naming_the_point():
    x = torch.ones(8, 2)
    x[5, 1] = 0.0
    with pytest.raises(ValueError, match="NaN log importance weight for data point 5"):
        evaluate(_nan_model, prior_guide, x, num_samples=10, ks=(1,))


def test_nan_error_names_the_global_data_point_when_chunked():
    x = torch.ones(8, 2)
    x[5, 1] = 0.0
    with pytest.raises(ValueError, match="NaN log importance weight for data point 5"):
        evaluate(_nan_model, prior_guide, x, num_samples=10, ks=(1,), max_pairs=20)


# --------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def digit_result(trained_vae, digits):
    return trained_vae.evaluate(digits[2], num_samples=20, ks=(1, 5), seed=0)


def test_result_summary_table_and_exports(digit_result, tmp_path):
    result = digit_result
    assert isinstance(result, EvaluationResult)
    assert result.num_points == 250 and result.num_samples == 20 and result.ks == (1, 5)
    summary = result.summary()
    names = [row["quantity"] for row in summary]
    assert names == ["elbo", "elbo_analytic", "iwae_1", "iwae_5", "log_px", "gap"]
    for row in summary:
        assert set(row) == {"quantity", "mean", "se"}
        values = result.per_datapoint[row["quantity"]]
        assert row["mean"] == pytest.approx(values.mean())
        assert row["se"] == pytest.approx(values.std(ddof=1) / np.sqrt(250))
    # On the same draws: ELBO = IWAE_1 <= IWAE_5 <= log p_hat (averages over the points).
    means = {row["quantity"]: row["mean"] for row in summary}
    assert means["elbo"] == pytest.approx(means["iwae_1"])
    assert means["iwae_1"] <= means["iwae_5"] <= means["log_px"]
    assert means["gap"] >= 0

    table = result.table()
    for name in names:
        assert name in table
    assert "N=250" in table and "K=20" in table and "latent site 'z'" in table

    path = result.to_csv(tmp_path / "sub" / "eval.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 250
    for column in ("data_point", "log_px", "log_px_se", "ess", "khat", "iwae_1", "iwae_5"):
        assert column in rows[0]
    assert float(rows[7]["log_px"]) == pytest.approx(result.per_datapoint["log_px"][7], abs=1e-6)

    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["num_samples"] == 20 and payload["ks"] == [1, 5]
    assert len(payload["per_datapoint"]["log_px"]) == 250
    assert payload["latent"]["z"]["active_units"] == result.latent["z"].active_units

    assert 0.0 <= result.share_high_khat <= 1.0
    assert result.share_high_khat == pytest.approx(np.mean(result.per_datapoint["khat"] > 0.7))

    container = result.to_arviz()
    assert "evaluation" in container.groups()
    assert container.evaluation["log_px"].shape == (250,)


def test_result_latent_diagnostics(digit_result, trained_vae, digits):
    use = digit_result.latent["z"]
    assert 0 <= use.active_units <= LATENT_DIM
    assert use.mean_variance.shape == (LATENT_DIM,)
    assert use.kl_per_dim.shape == (LATENT_DIM,)
    assert bool((use.kl_per_dim >= 0).all())
    with torch.no_grad():
        loc, scale = trained_vae.encode(digits[2])  # all 250 points (< max_points)
    kl = kl_divergence(Normal(loc.double(), scale.double()), Normal(0.0, 1.0))
    np.testing.assert_allclose(use.kl_per_dim, kl.mean(0).numpy(), rtol=1e-5)
    assert use.kl_per_dim.sum() == pytest.approx(float(kl.sum(-1).mean()), rel=1e-5)
    np.testing.assert_allclose(use.mean_variance, loc.double().var(0).numpy(), rtol=1e-5)
    assert use.active_units == int((use.mean_variance > 0.01).sum())
    assert 0.0 <= use.mutual_information <= math.log(250)


# --------------------------------------------------------------------------- latent use


def test_latent_use_of_a_guide_that_ignores_x():
    mean, sd = torch.tensor([0.3, -1.0, 0.0]), torch.tensor([0.5, 1.0, 2.0])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def constant_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, sd).to_event(1))

    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    use = latent_use(model, constant_guide, x)["z"]
    assert use.active_units == 0
    np.testing.assert_array_equal(use.mean_variance, 0.0)
    # q(z | x_m) is the same for every m: every term of the estimate is exactly 0.
    assert abs(use.mutual_information) < 1e-6
    expected_kl = kl_divergence(Normal(mean, sd), Normal(0.0, 1.0)).double().numpy()
    np.testing.assert_allclose(use.kl_per_dim, expected_kl, rtol=1e-6)


def test_latent_use_of_a_guide_that_copies_x():
    # Model z ~ N(0, I), x | z ~ N(z, 0.01^2 I); guide q(z | x) = N(x, 0.01^2 I). Points drawn
    # from N(0, 4 I) in 2-D are far apart relative to 0.01, so I(x; z) ~ log M.
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.01).to_event(1), obs=x)

    def copy_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 0.01).to_event(1))

    x = 2 * torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    use = latent_use(model, copy_guide, x, max_points=300, seed=4)["z"]
    assert use.active_units == 2
    assert 0.0 <= use.mutual_information <= math.log(300)
    assert use.mutual_information > math.log(300) - 0.05
    # The subset of 300 points: its variance is near Var(x) = 4 in each dimension.
    assert bool((np.abs(use.mean_variance - 4.0) < 1.0).all())
    # KL(N(x, 0.01^2) || N(0, 1)) = (x^2 + 1e-4 - 1) / 2 - log 0.01, averaged over the subset.
    assert bool((use.kl_per_dim > 4.0).all())
