"""The VAE's model, guide and per-datapoint ELBO: closed-form KL, agreement of the Monte Carlo
and analytic-KL objectives in expectation, shapes and ranges, isolation of parameters, and
input validation that happens before any state changes.

Statistical comparisons run in float64 with fixed seeds; every tolerance is a multiple of a
Monte Carlo standard error computed from the per-draw spread of the same estimate. A test
passes at 4 standard errors with probability > 0.9999 per comparison when the estimators
agree in expectation (and, the seeds being fixed, it then passes deterministically).
"""

import dataclasses
import math
import re

import numpy as np
import pyro
import pytest
import torch
from torch.distributions import kl_divergence

from pyrovae import VAE, VAEConfig
from pyrovae.data import binarize, load_digits
from pyrovae.evaluation.traces import particle_terms
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import MIN_SCALE
from pyrovae.objectives import make_objective

NUM_SE = 4.0
"""Tolerance, in standard errors of the difference, for Monte Carlo comparisons."""

SMALL = VAEConfig(num_features=64, latent_dim=3, hidden_sizes=(16,))


@pytest.fixture(scope="module")
def binary_digits() -> torch.Tensor:
    """The 1297 training digits, binarized once with a fixed generator (float32, {0, 1})."""
    digits = load_digits()
    return binarize(digits.train, generator=torch.Generator().manual_seed(123))


def snapshot(vae: VAE) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in vae.state_dict().items()}


def assert_same_state(vae: VAE, before: dict[str, torch.Tensor]) -> None:
    after = vae.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"parameter {name} changed"


def perturb_encoder(vae: VAE) -> None:
    """Move the encoder away from its initialisation so that mu and s vary over a wide range."""
    with torch.no_grad():
        vae.guide.encoder.loc.bias.copy_(torch.linspace(-1.5, 1.0, vae.config.latent_dim))
        vae.guide.encoder.raw_scale.bias.copy_(torch.linspace(-2.0, 1.5, vae.config.latent_dim))


# --------------------------------------------------------------------------- KL and ELBO


def test_analytic_kl_matches_closed_form(float64, binary_digits):
    vae = VAE(SMALL)
    perturb_encoder(vae)
    x = binary_digits[:12].double()
    with torch.no_grad():
        mu, s = vae.guide.encoder(x)
        closed = 0.5 * (s**2 + mu**2 - 1.0 - 2.0 * torch.log(s)).sum(-1)
        prior = vae.model.prior(x).expand([x.shape[0]])
        torch_kl = kl_divergence(vae.guide.posterior(x), prior)
    assert mu.dtype == torch.float64 and s.shape == (12, SMALL.latent_dim)
    assert bool((s > 0).all())
    # The perturbation makes the KL clearly non-trivial (it is 0 only when mu=0, s=1).
    assert float(closed.min()) > 0.1
    assert torch_kl.shape == (12,)
    # Both are exact formulas in float64: they may differ only by rounding.
    torch.testing.assert_close(torch_kl, closed, rtol=1e-12, atol=1e-12)

    for num_particles in (1, 3):
        terms = particle_terms(vae.model, vae.guide, x, num_particles=num_particles)
        assert terms.all_analytic is True
        assert terms.kl.shape == (num_particles, 12)
        for row in terms.kl:
            torch.testing.assert_close(row, closed, rtol=1e-12, atol=1e-12)


def test_monte_carlo_kl_is_unbiased_for_the_closed_form(float64, binary_digits):
    """E_q[log q(z|x) - log p(z)] over many draws matches the closed-form KL within MC error."""
    vae = VAE(SMALL)
    perturb_encoder(vae)
    x = binary_digits[:12].double()
    num_draws = 2000
    pyro.set_rng_seed(7)
    terms = particle_terms(vae.model, vae.guide, x, num_particles=num_draws)
    mc_kl = terms.log_q - terms.log_p_latent
    estimate = mc_kl.mean(0)
    standard_error = mc_kl.std(0) / math.sqrt(num_draws)
    closed = terms.kl[0]
    assert bool((standard_error > 0).all())
    assert bool(((estimate - closed).abs() < NUM_SE * standard_error).all())


def test_trace_elbo_and_meanfield_elbo_agree_in_expectation(float64, binary_digits):
    vae = VAE(SMALL)
    perturb_encoder(vae)
    x = binary_digits[:16].double()
    num_draws = 2000

    # pyrovae's per-datapoint estimates, and the per-draw terms behind them (same seeds, same
    # plate nesting, hence the same draws).
    mc = vae.elbo(x, num_samples=num_draws, analytic_kl=False, seed=1)
    analytic = vae.elbo(x, num_samples=num_draws, analytic_kl=True, seed=2)
    pyro.set_rng_seed(1)
    mc_terms = particle_terms(vae.model, vae.guide, x, num_particles=num_draws, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    an_terms = particle_terms(vae.model, vae.guide, x, num_particles=num_draws, max_plate_nesting=1)
    assert an_terms.all_analytic
    mc_draws = mc_terms.log_weights  # (K, N)
    an_draws = an_terms.log_p_obs - an_terms.kl
    assert torch.equal(mc, mc_draws.mean(0))
    assert torch.equal(analytic, an_draws.mean(0))

    # Per data point: independent seeds, so the variances of the two means add.
    se_mc = mc_draws.std(0) / math.sqrt(num_draws)
    se_an = an_draws.std(0) / math.sqrt(num_draws)
    assert bool((se_mc > 0).all()) and bool((se_an > 0).all())
    z_scores = (mc - analytic) / torch.sqrt(se_mc**2 + se_an**2)
    assert bool((z_scores.abs() < NUM_SE).all()), z_scores

    # Pyro's own losses: minus the ELBO summed over data points, averaged over K particles.
    # The standard error of that average is the spread over particles of the per-particle sum.
    losses = {}
    for seed, name in ((3, "trace_elbo"), (4, "trace_meanfield_elbo")):
        objective = make_objective(name, num_particles=num_draws)(vae.model, vae.guide)
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            losses[name] = float(objective(x))
    se_sum_mc = float(mc_draws.sum(1).std()) / math.sqrt(num_draws)
    se_sum_an = float(an_draws.sum(1).std()) / math.sqrt(num_draws)
    pyro_mc, pyro_an = -losses["trace_elbo"], -losses["trace_meanfield_elbo"]
    assert abs(pyro_mc - pyro_an) < NUM_SE * math.hypot(se_sum_mc, se_sum_an)

    # pyrovae's MC ELBO summed over data points against Pyro's Trace_ELBO (negated), and the
    # analytic-KL version against TraceMeanField_ELBO. The summed estimate's standard error is
    # the root sum of squares of the independent per-datapoint ones.
    se_total_mc = float(torch.sqrt((se_mc**2).sum()))
    se_total_an = float(torch.sqrt((se_an**2).sum()))
    assert abs(float(mc.sum()) - pyro_mc) < NUM_SE * math.hypot(se_total_mc, se_sum_mc)
    assert abs(float(analytic.sum()) - pyro_an) < NUM_SE * math.hypot(se_total_an, se_sum_an)

    # The tolerance is tight enough to matter: dropping the KL, or double counting it, would be
    # detected by a wide margin.
    kl_total = float(an_terms.kl[0].sum())
    assert kl_total > 10 * NUM_SE * math.hypot(se_total_mc, se_sum_mc)


def test_elbo_shape_dtype_and_seeding(binary_digits):
    vae = VAE(SMALL)  # float32 parameters: the ELBO is still returned in float64
    x = binary_digits[:10]
    for analytic_kl in (False, True):
        first = vae.elbo(x, num_samples=3, analytic_kl=analytic_kl, seed=11)
        again = vae.elbo(x, num_samples=3, analytic_kl=analytic_kl, seed=11)
        other = vae.elbo(x, num_samples=3, analytic_kl=analytic_kl, seed=12)
        assert first.shape == (10,)
        assert first.dtype == torch.float64
        assert bool(torch.isfinite(first).all())
        assert bool((first < 0).all())  # log-probabilities of binary data are negative
        assert torch.equal(first, again)
        assert bool((first != other).all())
    # A numpy array is accepted and gives the same values as the tensor.
    assert torch.equal(
        vae.elbo(x.numpy(), num_samples=3, seed=11), vae.elbo(x, num_samples=3, seed=11)
    )


def test_elbo_rejects_non_positive_num_samples(binary_digits):
    vae = VAE(SMALL)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            vae.elbo(binary_digits[:4], num_samples=bad)


def test_elbo_is_a_lower_bound_on_the_importance_sampled_log_likelihood(float64, binary_digits):
    """Jensen: log mean_k w_k >= mean_k log w_k, draw by draw, for every data point."""
    vae = VAE(SMALL)
    x = binary_digits[:8].double()
    pyro.set_rng_seed(5)
    terms = particle_terms(vae.model, vae.guide, x, num_particles=50, max_plate_nesting=1)
    log_w = terms.log_weights
    log_mean_w = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    assert bool((log_mean_w >= log_w.mean(0)).all())
    assert bool((log_mean_w > log_w.mean(0) + 1e-6).all())  # strict: the weights vary


# --------------------------------------------------------------------------- shapes, ranges


def test_encode_decode_reconstruct_sample_bernoulli(binary_digits):
    vae = VAE(SMALL)
    x = binary_digits[:9]
    mu, s = vae.encode(x)
    assert mu.shape == s.shape == (9, SMALL.latent_dim)
    assert bool((s >= MIN_SCALE).all())
    assert not mu.requires_grad and not s.requires_grad

    z = torch.randn(5, SMALL.latent_dim) * 3
    means = vae.decode(z)
    assert means.shape == (5, 64)
    assert bool(((means > 0) & (means < 1)).all())
    assert torch.equal(vae.reconstruct(x), vae.decode(mu))

    means, observations = vae.sample(7, seed=3)
    assert means.shape == observations.shape == (7, 64)
    assert bool(((means > 0) & (means < 1)).all())
    assert set(observations.unique().tolist()) <= {0.0, 1.0}
    means_again, observations_again = vae.sample(7, seed=3)
    assert torch.equal(means, means_again) and torch.equal(observations, observations_again)
    means_other, _ = vae.sample(7, seed=4)
    assert not torch.equal(means, means_other)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            vae.sample(bad)


def test_sampled_pixels_follow_the_decoder_means(float64):
    """Bernoulli draws x ~ p(x|z): the fraction of ones matches E[x|z] within 4 standard errors."""
    vae = VAE(SMALL)
    pyro.set_rng_seed(9)
    z = vae.model.prior(torch.zeros(())).sample((1,))
    hidden = vae.model.decoder(z)
    with torch.no_grad():
        probabilities = vae.model.likelihood.mean(hidden)[0]
        draws = vae.model.likelihood(hidden.expand(4000, -1)).sample()
    fraction = draws.mean(0)
    standard_error = torch.sqrt(probabilities * (1 - probabilities) / draws.shape[0])
    assert bool(((fraction - probabilities).abs() < NUM_SE * standard_error).all())


@pytest.mark.parametrize("likelihood", ["normal", "normal-per-feature"])
def test_normal_likelihoods_on_real_valued_data(likelihood, float64):
    num_features = 5
    vae = VAE(num_features=num_features, latent_dim=2, hidden_sizes=(8,), likelihood=likelihood)
    x = torch.randn(20, num_features) * 3.0 + 1.0  # real values, negative and > 1
    elbo = vae.elbo(x, num_samples=4, seed=0)
    assert elbo.shape == (20,) and bool(torch.isfinite(elbo).all())

    head = vae.model.likelihood
    z = torch.randn(6, 2)
    hidden = vae.model.decoder(z)
    scale = head.scale(hidden)
    assert scale.shape == (6, num_features)
    assert bool((scale >= MIN_SCALE).all())
    if likelihood == "normal-per-feature":  # one scale per feature, shared over z
        assert bool((scale == scale[0]).all())

    # The log density is the Gaussian formula, summed over features.
    loc = head.loc(hidden)
    expected = (
        -0.5 * ((x[:6] - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    torch.testing.assert_close(vae.model.observation(z).log_prob(x[:6]), expected)
    torch.testing.assert_close(vae.decode(z), loc.detach())

    # Even with the scale head driven far negative the scale stays positive and the density
    # stays finite.
    with torch.no_grad():
        if likelihood == "normal":
            head.raw_scale.weight.zero_()
            head.raw_scale.bias.fill_(-1e4)
        else:
            head.raw_scale.fill_(-1e4)
    scale = head.scale(vae.model.decoder(z))
    assert bool((scale > 0).all())
    torch.testing.assert_close(scale, torch.full_like(scale, MIN_SCALE))
    assert bool(torch.isfinite(vae.model.observation(z).log_prob(x[:6])).all())
    assert bool(torch.isfinite(vae.elbo(x, num_samples=2, seed=0)).all())

    _, observations = vae.sample(50, seed=1)
    assert observations.shape == (50, num_features)
    assert not set(observations.unique().tolist()) <= {0.0, 1.0}  # real-valued draws


def test_normal_likelihood_fits_real_valued_data():
    vae = VAE(num_features=5, latent_dim=2, hidden_sizes=(8,), likelihood="normal")
    x = torch.randn(64, 5) * 2.0 - 3.0
    history = vae.fit(x, x, epochs=2, batch_size=16, progress=False)
    assert len(history) == 2
    assert all(math.isfinite(value) for value in history.column("train_elbo"))
    assert all(math.isfinite(value) for value in history.column("valid_elbo"))


# --------------------------------------------------------------------------- isolation


def test_two_vaes_in_one_process_do_not_collide(binary_digits):
    store = pyro.get_param_store()
    torch.manual_seed(1)
    first = VAE(SMALL)
    torch.manual_seed(2)
    second = VAE(SMALL)
    # Same attribute names: they would share parameters in Pyro's global store.
    assert first.state_dict().keys() == second.state_dict().keys()
    assert len(list(store.keys())) == 0
    first_before, second_before = snapshot(first), snapshot(second)
    assert any(not torch.equal(first_before[k], second_before[k]) for k in first_before)

    first.fit(binary_digits[:64], binary_digits[64:96], epochs=2, batch_size=16, progress=False)
    assert len(list(store.keys())) == 0
    assert_same_state(second, second_before)
    assert any(not torch.equal(first.state_dict()[k], first_before[k]) for k in first_before)
    # Evaluating and sampling do not register anything either, and the user's global setting
    # of module_local_params is left as it was.
    second.elbo(binary_digits[:8], num_samples=2, seed=0)
    second.sample(3, seed=0)
    assert len(list(store.keys())) == 0
    assert pyro.settings.get("module_local_params") is False
    assert_same_state(second, second_before)
    assert second.history_ is None and second.optimizer_ is None


# --------------------------------------------------------------------------- bad inputs


def _bad_data(good: torch.Tensor) -> dict[str, tuple[object, type[Exception], str]]:
    with_nan = good.clone()
    with_nan[3, 5] = float("nan")
    with_inf = good.clone()
    with_inf[1, 2] = float("inf")
    grey = good.clone()
    grey[2, 7] = 0.5
    strings = np.array([["a"] * 64] * 4)
    return {
        "nan": (with_nan, ValueError, r"NaN or infinite.*row 3, column 5"),
        "inf": (with_inf, ValueError, r"NaN or infinite.*row 1, column 2"),
        "features": (good[:, :10], ValueError, r"has 10 features but the model expects 64"),
        "one-dimensional": (good[0], ValueError, r"must be a matrix of shape \(num_points, 64\)"),
        "empty": (good[:0], ValueError, r"empty"),
        "grey": (grey, ValueError, r"support of the 'bernoulli' likelihood.*\{0, 1\}.*0\.5"),
        "strings": (strings, TypeError, r"must be numeric"),
    }


BAD_DATA_CASES = ["nan", "inf", "features", "one-dimensional", "empty", "grey", "strings"]


@pytest.fixture
def fitted(binary_digits):
    """A VAE fitted once, so that failing calls can be checked not to touch its state."""
    vae = VAE(SMALL)
    vae.fit(binary_digits[:32], epochs=1, batch_size=16, progress=False)
    return vae


def _assert_untouched(vae: VAE, before: dict, history, optimizer, rng_state) -> None:
    assert_same_state(vae, before)
    assert vae.history_ is history and vae.optimizer_ is optimizer
    assert torch.equal(torch.get_rng_state(), rng_state)


@pytest.mark.parametrize("case", BAD_DATA_CASES)
@pytest.mark.parametrize("role", ["train", "validation"])
def test_fit_rejects_bad_data_before_changing_state(case, role, fitted, binary_digits):
    good = binary_digits[:32]
    bad, error, message = _bad_data(good)[case]
    before, history, optimizer = snapshot(fitted), fitted.history_, fitted.optimizer_
    rng_state = torch.get_rng_state()
    train, validation = (bad, good) if role == "train" else (good, bad)
    with pytest.raises(error, match=message):
        fitted.fit(train, validation, epochs=1, batch_size=8, progress=False)
    _assert_untouched(fitted, before, history, optimizer, rng_state)


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_elbo_and_encode_reject_bad_data(case, fitted, binary_digits):
    bad, error, message = _bad_data(binary_digits[:32])[case]
    before = snapshot(fitted)
    rng_state = torch.get_rng_state()
    with pytest.raises(error, match=message):
        fitted.elbo(bad, num_samples=2, seed=99)  # the seed is not applied before the check
    with pytest.raises(error, match=message):
        fitted.encode(bad)
    _assert_untouched(fitted, before, fitted.history_, fitted.optimizer_, rng_state)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 33}, r"batch_size=33 exceeds the 32 training data points"),
        (
            {"objective": "elbo"},
            r"unknown objective 'elbo'; valid names: annealed_meanfield_elbo, dreg, iwae, "
            r"renyi, stl, trace_elbo, trace_meanfield_elbo",
        ),
        ({"learning_rate": 0.0}, r"learning_rate must be a positive number"),
        ({"learning_rate": -1e-3}, r"learning_rate must be a positive number"),
        ({"epochs": 0}, r"epochs must be a positive integer"),
        ({"epochs": -3}, r"epochs must be a positive integer"),
        ({"num_particles": 0}, r"num_particles must be a positive integer"),
        ({"batch_size": 0}, r"batch_size must be a positive integer"),
        ({"binarize": "yes"}, r"unknown binarize 'yes'; valid names: dynamic, none, static"),
        ({"seed": -1}, r"seed must be a non-negative integer"),
    ],
)
def test_fit_rejects_bad_options_before_changing_state(options, message, fitted, binary_digits):
    before, history, optimizer = snapshot(fitted), fitted.history_, fitted.optimizer_
    rng_state = torch.get_rng_state()
    with pytest.raises(ValueError, match=message):
        fitted.fit(binary_digits[:32], progress=False, **{"batch_size": 8, **options})
    _assert_untouched(fitted, before, history, optimizer, rng_state)


def test_fit_rejects_unknown_option_names(fitted, binary_digits):
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=r"learning_rat.*valid names: .*learning_rate"):
        fitted.fit(binary_digits[:32], learning_rat=0.1)
    assert_same_state(fitted, before)


@pytest.mark.parametrize("latent_dim", [0, -1, 1.5])
def test_non_positive_latent_dim_is_rejected(latent_dim):
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        VAE(num_features=64, latent_dim=latent_dim)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        VAEConfig.from_dict({"num_features": 64, "latent_dim": latent_dim})


def test_vae_config_from_dict_rejects_unknown_keys_listing_valid_names():
    valid = ", ".join(sorted(field.name for field in dataclasses.fields(VAEConfig)))
    assert "latent_dim, likelihood" in valid
    with pytest.raises(
        ValueError,
        match=rf"unknown VAEConfig option\(s\) 'latent_dims'; "
        rf"valid names: {re.escape(valid)}$",
    ):
        VAEConfig.from_dict({"num_features": 64, "latent_dims": 3})
    likelihoods = ", ".join(sorted(LIKELIHOODS))
    assert "bernoulli, " in likelihoods and "normal-per-feature" in likelihoods
    with pytest.raises(
        ValueError,
        match=rf"unknown likelihood 'gauss'; valid names: {re.escape(likelihoods)}$",
    ):
        VAEConfig(num_features=64, likelihood="gauss")
    config = VAEConfig(num_features=64, latent_dim=3, hidden_sizes=[16, 8], image_shape=[8, 8])
    assert config.hidden_sizes == (16, 8) and config.image_shape == (8, 8)
    assert VAEConfig.from_dict(config.to_dict()) == config


def test_vae_rejects_config_and_options_together():
    with pytest.raises(TypeError, match="either a VAEConfig or keyword options"):
        VAE(SMALL, latent_dim=2)
