"""Observation models p(x|z): shapes, supports, log densities and means against independent
references (scipy.stats, hand formulas, mpmath at 50 digits), stability at extreme head
outputs, support validation before any state changes, and short fits on the digits.

Reference comparisons run in float64. Monte Carlo comparisons use fixed seeds and a tolerance
of NUM_SE standard errors computed from the same draws.
"""

import math

import mpmath
import numpy as np
import pyro
import pytest
import torch
from scipy import integrate, special, stats

from pyrovae import VAE, VAEConfig
from pyrovae.data import load_digits, threshold
from pyrovae.likelihoods import (
    LIKELIHOODS,
    Likelihood,
    StableContinuousBernoulli,
    make_likelihood,
)
from pyrovae.networks import MIN_SCALE

NUM_SE = 5.0
"""Tolerance, in standard errors, for Monte Carlo comparisons."""

NAMES = sorted(LIKELIHOODS)
REAL_VALUED = ("normal", "normal-per-feature", "normal-fixed", "laplace", "student-t")
COUNTS = ("poisson", "negative-binomial", "zero-inflated-negative-binomial")
HIDDEN, FEATURES = 6, 5


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def build(name: str, dtype=torch.float64, seed: int = 0, **options) -> Likelihood:
    """A likelihood with every parameter moved away from its initialisation (biases and
    per-feature vectors nonzero), so that the heads take varied values."""
    torch.manual_seed(seed)
    likelihood = make_likelihood(name, HIDDEN, FEATURES, **options).to(dtype)
    with torch.no_grad():
        for parameter in likelihood.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return likelihood


def hidden_units(shape=(2, 3), dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def data_for(name: str, shape, seed: int = 2) -> np.ndarray:
    """Values in the support of ``name``, with the boundary values included."""
    rng = np.random.default_rng(seed)
    if name == "bernoulli":
        x = rng.integers(0, 2, shape).astype(float)
    elif name == "continuous-bernoulli":
        x = rng.uniform(0, 1, shape)
        x.flat[:2] = (0.0, 1.0)
    elif name in COUNTS:
        x = rng.integers(0, 20, shape).astype(float)
        x.flat[:2] = (0.0, 0.0)
    elif name == "categorical-256":
        x = rng.integers(0, 256, shape).astype(float)
        x.flat[:2] = (0.0, 255.0)
    else:
        x = 2.0 * rng.standard_normal(shape)
    return x


def head(likelihood: Likelihood, name: str, hidden: torch.Tensor) -> np.ndarray:
    return getattr(likelihood, name)(hidden).detach().numpy()


def softplus(raw) -> np.ndarray:
    return np.logaddexp(0.0, np.asarray(raw, dtype=float))


def vector(likelihood: Likelihood, name: str) -> np.ndarray:
    return getattr(likelihood, name).detach().numpy()


# --------------------------------------------------------------------------- references
# Each returns the elementwise log density (draws, points, features) and the mean, computed
# from the raw head outputs with scipy.stats or by hand.


def continuous_bernoulli_reference(logits: np.ndarray, x: np.ndarray):
    """log C(lambda) + x log lambda + (1 - x) log(1 - lambda), C(lambda) = 2 atanh(1 - 2 lambda)
    / (1 - 2 lambda) (2 at lambda = 1/2), and the mean lambda / (2 lambda - 1) + 1 / (2 atanh(1 -
    2 lambda)) (1/2 at lambda = 1/2), at 50 significant digits."""
    logits, x = np.broadcast_arrays(logits, x)
    log_density, mean = np.empty(logits.shape), np.empty(logits.shape)
    with mpmath.workdps(50):
        for index in np.ndindex(logits.shape):
            lam = 1 / (1 + mpmath.exp(-mpmath.mpf(float(logits[index]))))
            value = mpmath.mpf(float(x[index]))
            if lam == mpmath.mpf(1) / 2:
                norm, expected = mpmath.mpf(2), mpmath.mpf(1) / 2
            else:
                norm = 2 * mpmath.atanh(1 - 2 * lam) / (1 - 2 * lam)
                expected = lam / (2 * lam - 1) + 1 / (2 * mpmath.atanh(1 - 2 * lam))
            log_density[index] = float(
                mpmath.log(norm) + value * mpmath.log(lam) + (1 - value) * mpmath.log(1 - lam)
            )
            mean[index] = float(expected)
    return log_density, mean


def reference(name: str, likelihood: Likelihood, hidden: torch.Tensor, x: np.ndarray):
    if name == "bernoulli":
        p = special.expit(head(likelihood, "logits", hidden))
        return stats.bernoulli.logpmf(x, p), p
    if name == "continuous-bernoulli":
        return continuous_bernoulli_reference(head(likelihood, "logits", hidden), x)
    if name in REAL_VALUED:
        loc = head(likelihood, "loc", hidden)
        if name == "normal-fixed":
            scale = float(likelihood.fixed_scale)
        elif name == "normal-per-feature":
            scale = softplus(vector(likelihood, "raw_scale")) + MIN_SCALE
        else:
            scale = softplus(head(likelihood, "raw_scale", hidden)) + MIN_SCALE
        if name == "laplace":
            return stats.laplace.logpdf(x, loc, scale), loc
        if name == "student-t":
            df = 2.0 + softplus(vector(likelihood, "raw_df")) + MIN_SCALE
            return stats.t.logpdf(x, df, loc, scale), loc
        return stats.norm.logpdf(x, loc, scale), loc
    if name == "poisson":
        rate = softplus(head(likelihood, "raw_rate", hidden)) + MIN_SCALE
        return stats.poisson.logpmf(x, rate), rate
    if name in ("negative-binomial", "zero-inflated-negative-binomial"):
        mean = softplus(head(likelihood, "raw_mean", hidden)) + MIN_SCALE
        total_count = softplus(vector(likelihood, "raw_total_count")) + MIN_SCALE
        # scipy counts failures before n successes of probability p: n = r, p = r / (r + m).
        nb = stats.nbinom.logpmf(x, total_count, total_count / (total_count + mean))
        if name == "negative-binomial":
            return nb, mean
        gate = special.expit(head(likelihood, "gate_logits", hidden))
        mixture = np.where(x == 0, np.log(gate + (1 - gate) * np.exp(nb)), np.log1p(-gate) + nb)
        return mixture, (1 - gate) * mean
    if name == "categorical-256":
        logits = head(likelihood, "logits", hidden).reshape(hidden.shape[:-1] + (FEATURES, 256))
        log_probs = logits - special.logsumexp(logits, axis=-1, keepdims=True)
        index = np.broadcast_to(x, logits.shape[:-1]).astype(int)[..., None]
        return np.take_along_axis(log_probs, index, -1)[..., 0], np.exp(log_probs) @ np.arange(256)
    raise AssertionError(f"no reference for {name}")


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_observation_model():
    assert set(LIKELIHOODS) == {
        "bernoulli",
        "continuous-bernoulli",
        "normal",
        "normal-per-feature",
        "normal-fixed",
        "laplace",
        "student-t",
        "poisson",
        "negative-binomial",
        "zero-inflated-negative-binomial",
        "categorical-256",
    }
    for name, cls in LIKELIHOODS.items():
        assert cls.name == name and issubclass(cls, Likelihood)
        assert VAEConfig(num_features=4, likelihood=name).likelihood == name
    with pytest.raises(ValueError, match="unknown likelihood 'gamma'; valid names: bernoulli"):
        make_likelihood("gamma", 3, 4)
    with pytest.raises(ValueError, match="valid names: .*zero-inflated-negative-binomial"):
        VAEConfig(num_features=4, likelihood="zinb")


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_samples_in_support(name):
    likelihood = build(name, dtype=torch.float32)
    hidden = hidden_units((3, 4), dtype=torch.float32)  # (K draws, N points, H)
    with torch.no_grad():
        distribution = likelihood(hidden)
        sample = distribution.sample()
        mean = likelihood.mean(hidden)
        shared = torch.as_tensor(data_for(name, (4, FEATURES)), dtype=torch.float32)
        log_prob = distribution.log_prob(shared)  # data shared by the K draws
    assert distribution.batch_shape == (3, 4) and distribution.event_shape == (FEATURES,)
    assert sample.shape == (3, 4, FEATURES)
    assert not bool(likelihood.out_of_support(sample).any())
    likelihood.check_support(sample)
    assert mean.shape == (3, 4, FEATURES) and bool(torch.isfinite(mean).all())
    assert log_prob.shape == (3, 4) and bool(torch.isfinite(log_prob).all())
    assert distribution.log_prob(sample).shape == (3, 4)


# --------------------------------------------------------------------------- log densities


@pytest.mark.parametrize("name", NAMES)
def test_log_density_and_mean_match_references(name, float64):
    likelihood = build(name)
    hidden = hidden_units((2, 3))
    x = data_for(name, (3, FEATURES))
    expected_log_density, expected_mean = reference(name, likelihood, hidden, x)
    with torch.no_grad():
        log_prob = likelihood(hidden).log_prob(torch.from_numpy(x))
        mean = likelihood.mean(hidden)
    assert log_prob.dtype == torch.float64 and log_prob.shape == (2, 3)
    np.testing.assert_allclose(log_prob.numpy(), expected_log_density.sum(-1), rtol=1e-10)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "student-t"])
def test_samples_average_to_the_mean(name, float64):
    """The empirical mean of 4000 draws of x ~ p(x|z) matches mean(hidden) within NUM_SE
    standard errors (student-t: its fourth moment may not exist, so the sample standard error
    is unreliable; its mean is the location, checked against the reference above)."""
    likelihood = build(name)
    hidden = hidden_units((1, 2))
    pyro.set_rng_seed(3)
    with torch.no_grad():
        draws = likelihood(hidden).sample((4000,)).double()
        mean = likelihood.mean(hidden)
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((draws.mean(0) - mean).abs() <= NUM_SE * standard_error + 1e-12).all())


CONTINUOUS_BERNOULLI_LOGITS = [-40.0, -17.0, -3.0, -1e-3, -1e-5, 0.0, 1e-6, 2e-3, 0.5, 25.0, 40.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuous_bernoulli_includes_its_normaliser(dtype):
    """log_prob = log C(lambda) + x log lambda + (1 - x) log(1 - lambda), with C in closed form,
    near lambda = 1/2 (where the closed form is 0/0) and for large |logits| (where torch's own
    normaliser, computed from clamped probabilities, is too low by up to log(|logit| / 16) in
    float32)."""
    likelihood = make_likelihood("continuous-bernoulli", 1, len(CONTINUOUS_BERNOULLI_LOGITS))
    likelihood = likelihood.to(dtype)
    with torch.no_grad():
        likelihood.logits.weight.zero_()
        likelihood.logits.bias.copy_(torch.tensor(CONTINUOUS_BERNOULLI_LOGITS))
    hidden = torch.zeros(1, 3, 1, dtype=dtype)
    x = data_for("continuous-bernoulli", (3, len(CONTINUOUS_BERNOULLI_LOGITS)))
    x[2] = np.where(np.array(CONTINUOUS_BERNOULLI_LOGITS) > 0, 1.0, 0.0)  # the density's peak
    with torch.no_grad():
        distribution = likelihood(hidden)
        log_prob = distribution.base_dist.log_prob(torch.tensor(x, dtype=dtype))
        mean = likelihood.mean(hidden)
    expected_log_density, expected_mean = continuous_bernoulli_reference(
        np.array(CONTINUOUS_BERNOULLI_LOGITS), x
    )
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(log_prob[0].double().numpy(), expected_log_density, atol=tolerance)
    np.testing.assert_allclose(mean[0, 0].double().numpy(), expected_mean[0], atol=tolerance)
    assert float(log_prob[0, 2, -1]) > math.log(40.0)  # log C(sigmoid(40)) = log 40


@pytest.mark.parametrize("logit", [-40.0, -3.0, -1e-4, 0.0, 1e-3, 2.0, 40.0])
def test_continuous_bernoulli_density_integrates_to_one(logit):
    """Simpson's rule on 200001 points: the density integrates to 1 and its first moment to
    the mean."""
    distribution = StableContinuousBernoulli(logits=torch.tensor(logit, dtype=torch.float64))
    grid = torch.linspace(0.0, 1.0, 200001, dtype=torch.float64)
    density = torch.exp(distribution.log_prob(grid)).numpy()
    assert integrate.simpson(density, x=grid.numpy()) == pytest.approx(1.0, abs=1e-10)
    first_moment = integrate.simpson(density * grid.numpy(), x=grid.numpy())
    assert first_moment == pytest.approx(float(distribution.mean), abs=1e-10)


# --------------------------------------------------------------------------- stability


@pytest.mark.parametrize("raw", [-1e3, 1e3])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_head_outputs_stay_finite(name, raw):
    """Every head output and per-feature parameter at -1000 or +1000 (float32): positive
    parameters stay positive, and the log density, its gradients, the mean and the draws stay
    finite and in the support."""
    likelihood = make_likelihood(name, HIDDEN, FEATURES)
    with torch.no_grad():
        for parameter_name, parameter in likelihood.named_parameters():
            parameter.fill_(0.0 if parameter_name.endswith("weight") else raw)
    hidden = hidden_units((2, 3), dtype=torch.float32)
    x = torch.as_tensor(data_for(name, (3, FEATURES)), dtype=torch.float32)
    log_prob = likelihood(hidden).log_prob(x)
    log_prob.sum().backward()
    assert bool(torch.isfinite(log_prob).all())
    for parameter_name, parameter in likelihood.named_parameters():
        assert bool(torch.isfinite(parameter.grad).all()), parameter_name
    with torch.no_grad():
        assert bool(torch.isfinite(likelihood.mean(hidden)).all())
        sample = likelihood(hidden).sample()
    assert not bool(likelihood.out_of_support(sample).any())
    if name == "student-t":
        assert bool((likelihood.df() > 2.0).all())


# --------------------------------------------------------------------------- normal-fixed


def test_normal_fixed_scale_is_a_saved_setting(tmp_path):
    assert float(make_likelihood("normal-fixed", 3, 4).fixed_scale) == 1.0
    assert float(make_likelihood("normal-fixed", 3, 4, scale=0.25).fixed_scale) == 0.25
    for scale in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            make_likelihood("normal-fixed", 3, 4, scale=scale)

    vae = VAE(num_features=4, latent_dim=2, hidden_sizes=(8,), likelihood="normal-fixed")
    assert [n for n, _ in vae.model.likelihood.named_parameters()] == ["loc.weight", "loc.bias"]
    vae.model.likelihood.fixed_scale.fill_(0.5)
    x = torch.randn(10, 4)
    vae.fit(x, epochs=1, batch_size=5, progress=False)
    assert float(vae.model.likelihood.fixed_scale) == 0.5  # not learned
    hidden = vae.model.decoder(torch.zeros(1, 2))
    assert bool((vae.model.likelihood(hidden).base_dist.scale == 0.5).all())
    loaded = VAE.load(vae.save(tmp_path / "fixed.pt"))
    assert float(loaded.model.likelihood.fixed_scale) == 0.5


# --------------------------------------------------------------------------- support checks

BAD_VALUES = {
    "bernoulli": [0.5, 2.0, -1.0, math.nan],
    "continuous-bernoulli": [-0.01, 1.01, 255.0, math.nan, math.inf],
    **{name: [math.inf, -math.inf, math.nan] for name in REAL_VALUED},
    **{name: [-1.0, 0.5, 2.25, math.inf, math.nan] for name in COUNTS},
    "categorical-256": [0.5, 256.0, -1.0, 1.0 / 255.0, math.inf, math.nan],
}


def test_every_likelihood_has_bad_values():
    assert set(BAD_VALUES) == set(LIKELIHOODS)


@pytest.mark.parametrize("name", NAMES)
def test_check_support_names_the_likelihood(name):
    likelihood = make_likelihood(name, HIDDEN, FEATURES)
    good = torch.as_tensor(data_for(name, (6, FEATURES)), dtype=torch.float32)
    assert not bool(likelihood.out_of_support(good).any())
    likelihood.check_support(good)
    for value in BAD_VALUES[name]:
        bad = good.clone()
        bad[4, 3] = value
        mask = likelihood.out_of_support(bad)
        assert mask.dtype == torch.bool and mask.nonzero().tolist() == [[4, 3]]
        with pytest.raises(ValueError, match=f"support of the '{name}' likelihood") as error:
            likelihood.check_support(bad)
        assert "first at index (4, 3)" in str(error.value)
        assert likelihood.support in str(error.value)
    if name in COUNTS:
        assert "round the data" in likelihood.support_hint()
    if name == "categorical-256":
        assert (
            "0, 1, ..., 255" in likelihood.support and "round(255 * x)" in likelihood.support_hint()
        )


@pytest.mark.parametrize("name", NAMES)
def test_fit_refuses_unsupported_data_before_changing_anything(name):
    """A value outside the support, in the training or the validation data, stops ``fit``
    before any parameter changes. Infinite values (the only ones the real-valued likelihoods
    refuse) are caught by the generic finiteness check first."""
    vae = VAE(num_features=FEATURES, latent_dim=2, hidden_sizes=(8,), likelihood=name)
    before = {key: value.clone() for key, value in vae.state_dict().items()}
    good = torch.as_tensor(data_for(name, (20, FEATURES)), dtype=torch.float32)
    if name in REAL_VALUED:
        value, match = math.inf, "contains NaN or infinite values"
    else:
        value, match = BAD_VALUES[name][0], f"support of the '{name}' likelihood"
    for where in ("training", "validation"):
        bad = good.clone()
        bad[7, 2] = value
        train, valid = (bad, good) if where == "training" else (good, bad)
        with pytest.raises(ValueError, match=match):
            vae.fit(train, valid, epochs=1, batch_size=10, progress=False)
    assert vae.history_ is None and vae.optimizer_ is None
    after = vae.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


# --------------------------------------------------------------------------- fitting


def digits_for(name: str, values: torch.Tensor) -> torch.Tensor:
    """The digits (grey levels k/16 in [0, 1]) in the units each likelihood models."""
    if name == "bernoulli":
        return threshold(values)
    if name in COUNTS:
        return torch.round(values * 16)  # counts 0..16
    if name == "categorical-256":
        return torch.round(values * 255)  # integer grey levels 0..255
    return values


@pytest.mark.parametrize("name", NAMES)
def test_short_fit_improves_the_validation_elbo_and_evaluation_works(name, digits):
    torch.manual_seed(0)
    vae = VAE(num_features=64, latent_dim=2, hidden_sizes=(32,), likelihood=name)
    train, valid = digits_for(name, digits.train), digits_for(name, digits.valid)
    before = vae.elbo(valid, num_samples=10, seed=1)
    vae.fit(train, epochs=3, batch_size=64, learning_rate=3e-3, progress=False)
    after = vae.elbo(valid, num_samples=10, seed=1)
    difference = after - before
    standard_error = difference.std() / math.sqrt(len(difference))
    assert bool(torch.isfinite(after).all())
    assert float(difference.mean()) > NUM_SE * float(standard_error), (
        f"{name}: ELBO {float(before.mean()):.2f} -> {float(after.mean()):.2f} nats, "
        f"standard error {float(standard_error):.3f}"
    )

    # Per-datapoint evaluation: log p_hat(x) >= ELBO on average, within Monte Carlo error.
    result = vae.evaluate(valid[:40], num_samples=20, ks=(1, 5), latent_diagnostics=False, seed=2)
    columns = result.per_datapoint
    for column in ("log_px", "elbo", "iwae_1", "iwae_5"):
        assert columns[column].shape == (40,) and np.isfinite(columns[column]).all(), column
    gap = columns["log_px"] - columns["elbo"]
    assert gap.mean() >= -NUM_SE * gap.std(ddof=1) / math.sqrt(len(gap))
    assert columns["iwae_5"].mean() >= columns["iwae_1"].mean() - NUM_SE * (
        (columns["iwae_5"] - columns["iwae_1"]).std(ddof=1) / math.sqrt(len(gap))
    )
