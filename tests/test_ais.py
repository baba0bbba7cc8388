"""Annealed importance sampling, reverse AIS and the HMC kernel, proven against closed forms.

Reference models with an exact log p(x) and an exact posterior:

* the linear-Gaussian model (:mod:`pyrovae.models.linear_gaussian`), one latent site;
* a user's Pyro model with two latent sites, one of them positive (so the unconstrained
  space and its Jacobian matter): rate ~ Gamma(a, b)^3, counts | rate ~ Poisson(rate), and
  loc ~ N(0, 1)^2, values | loc ~ N(loc, s^2). Its marginal is negative binomial times
  normal, its posterior Gamma(a + counts, b + 1) times normal.

Log-space checks at T = 50..100 cannot see an error of a few hundredths of a nat in one
weight increment; the small-T checks (T = 2, 3, 5) compare the weights in probability space,
E[w] = p(x) and E[w'] = 1/p(x), and BDMC runs over several blocks. Each of these plausible
bugs, applied by hand, makes at least one of them fail: the last forward increment dropped,
the reverse transition at the wrong temperature, the upper bound from the mean of the log
weights, every block reusing the first block's z*, or its random draws.

Conventions as in tests/test_linear_gaussian.py: float64, fixed seeds, and every Monte Carlo
comparison passes within NUM_SE = 4 standard errors, each SE computed from the draws (the
delta-method SE over chains, or the spread over data points or chains of an average of
independent terms), never chosen to pass. With 64 chains the estimated per-point SE has a
relative error of ~10%, so a per-point check at 4 SE fails for a correct estimator with
probability ~1e-4 per point.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import VAE
from pyrovae.evaluation.ais import (
    AnnealingTarget,
    ais,
    annealing_schedule,
    bdmc,
    simulate_data,
)
from pyrovae.evaluation.hmc import hmc_transition
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.linear_gaussian import LinearGaussianGuide, LinearGaussianModel

NUM_SE = 4.0
D, L = 5, 3
MODEL_SEED, DATA_SEED = 2, 7

ALPHA, BETA, NOISE = 2.0, 1.0, 0.5
"""Gamma(shape ALPHA, rate BETA) prior of the rates; observation noise of the values."""


def make_linear_gaussian():
    model = LinearGaussianModel.random(D, L, seed=MODEL_SEED)
    best = LinearGaussianGuide.optimal_for(model)
    with torch.no_grad():  # mean map shrunk, offset and too wide: weights are not constant
        guide = LinearGaussianGuide(0.8 * best.weight, best.bias + 0.3, 1.4 * best.scale)
    return model, guide


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().cpu().numpy()


def mean_se(per_point_se: np.ndarray) -> float:
    """SE of a mean over data points of independent estimates with these SEs."""
    return float(np.sqrt(np.sum(per_point_se**2)) / len(per_point_se))


def assert_matches_exact(result, exact: np.ndarray) -> None:
    """AIS within NUM_SE of the exact log p(x) per point and on average (the bias of log_px,
    about -se^2 / 2, is far below the tolerance)."""
    error = result.log_px - exact
    assert np.all(np.isfinite(result.log_px)) and np.all(result.log_px_se > 0)
    assert np.all(np.abs(error) <= NUM_SE * result.log_px_se), np.abs(error / result.log_px_se)
    assert abs(error.mean()) <= NUM_SE * mean_se(result.log_px_se)


# ------------------------------------------------------------------------------ schedule


def test_annealing_schedules_run_from_zero_to_one():
    for kind in ("sigmoid", "linear"):
        betas = annealing_schedule(50, kind)
        assert betas.shape == (51,) and betas.dtype == torch.float64
        assert betas[0] == 0 and betas[-1] == 1 and bool((betas.diff() > 0).all())
    sigmoid = annealing_schedule(50, "sigmoid").diff()
    assert sigmoid[0] < sigmoid[25] and sigmoid[-1] < sigmoid[25]  # fine steps at both ends
    np.testing.assert_allclose(annealing_schedule(4, "linear"), [0, 0.25, 0.5, 0.75, 1])
    with pytest.raises(ValueError, match="schedule"):
        annealing_schedule(10, "cosine")


# ------------------------------------------------------------------ linear-Gaussian model


@pytest.mark.parametrize("start", ["guide", "prior"])
def test_ais_matches_exact_log_marginal(float64, start):
    model, guide = make_linear_gaussian()
    x = model.sample_data(16, seed=DATA_SEED)
    # From the prior, max_pairs = 66 chains (64 + 2 tuning) x 8 points: two blocks.
    result = ais(
        model,
        guide,
        x,
        num_steps=50,
        num_chains=64,
        num_leapfrog=5,
        start=start,
        max_pairs=66 * (8 if start == "prior" else 16),
        seed=1,
    )
    assert_matches_exact(result, np64(model.log_marginal(x)))
    for name, values in result.per_datapoint.items():
        assert values.shape == (16,) and values.dtype == np.float64, name
    assert np.all(result.per_datapoint["acceptance"] > 0.3)
    assert result.num_steps == 50 and result.settings["start"] == start
    assert "stochastic lower bound" in result.table()


def test_bdmc_sandwiches_exact_log_marginal_and_narrows(float64):
    """E[lower] <= log p(x) <= E[upper]: checked on the mean over 64 simulated points, whose
    errors are independent (SE from their spread); more steps narrow the sandwich."""
    model, _ = make_linear_gaussian()
    pyro.set_rng_seed(5)
    x, exact_draws = simulate_data(model, 64)
    assert x.shape == (64, D) and exact_draws["z"].shape == (64, L)
    exact = np64(model.log_marginal(x))
    widths = {}
    for steps in (10, 100):
        result = bdmc(
            model,
            None,
            x,
            posterior_sample=exact_draws,
            num_steps=steps,
            num_chains=8,
            num_leapfrog=5,
            start="prior",
            seed=3,
        )
        lower, upper = result.per_datapoint["lower"] - exact, result.per_datapoint["upper"] - exact
        assert lower.mean() <= NUM_SE * lower.std(ddof=1) / math.sqrt(64), steps
        assert upper.mean() >= -NUM_SE * upper.std(ddof=1) / math.sqrt(64), steps
        widths[steps] = result.per_datapoint["width"]
        assert "mean width" in result.table()
    # With 10 steps from the prior the sandwich is wide (resolved), and 100 steps narrow it.
    assert widths[10].mean() > NUM_SE * widths[10].std(ddof=1) / math.sqrt(64)
    narrowing = widths[10] - widths[100]
    assert narrowing.mean() > NUM_SE * narrowing.std(ddof=1) / math.sqrt(64)


# ------------------------------------------- weights in probability space, several blocks


SMALL_T = dict(num_chains=4, num_leapfrog=5, step_size=0.3)
"""HMC settings of the small-T checks (step sizes adapted by two tuning chains)."""


def make_one_factor():
    """L = 1, so the optimal diagonal guide is the exact posterior; shifted by 0.5 (about
    1.2 posterior standard deviations), w / p(x) and w' p(x) are log-normal at T = 1 and
    have every moment at any T, so the SE of their mean is itself well estimated."""
    model = LinearGaussianModel.random(D, 1, seed=MODEL_SEED)
    return model, LinearGaussianGuide.optimal_for(model).perturbed(1.0, 0.5)


def assert_mean_one(ratios: np.ndarray, label: str) -> None:
    """The mean of independent ratios (one per data point) is 1 within NUM_SE SEs."""
    se = ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert abs(ratios.mean() - 1) <= NUM_SE * se, (label, ratios.mean(), se)


@pytest.mark.parametrize("num_steps", [2, 3, 5])
def test_forward_and_reverse_weights_have_mean_one_at_small_t(float64, num_steps):
    """E[w] = p(x) and E[w'] = 1/p(x) hold exactly at every T. Over 4000 simulated points,
    exp(lower - log p(x)) (the mean of 4 chains' w / p(x)) and exp(log p(x) - upper) (the
    mean of their w' p(x)) average to 1 within NUM_SE SEs (about 0.03). At small T every
    weight increment and every transition's temperature matters: a dropped last increment,
    a reverse transition at the wrong temperature, or an upper bound from the mean of the
    log weights moves these means by 0.1 or more."""
    model, guide = make_one_factor()
    pyro.set_rng_seed(10 + num_steps)
    x, exact_draws = simulate_data(model, 4000)
    exact = np64(model.log_marginal(x))
    result = bdmc(
        model, guide, x, posterior_sample=exact_draws, num_steps=num_steps, seed=1, **SMALL_T
    )
    assert_mean_one(np.exp(result.per_datapoint["lower"] - exact), "forward")
    assert_mean_one(np.exp(exact - result.per_datapoint["upper"]), "reverse")


def test_forward_weights_from_the_prior_have_mean_one_at_small_t(float64):
    model, _ = make_one_factor()
    x = model.sample_data(4000, seed=DATA_SEED)
    result = ais(model, None, x, num_steps=3, start="prior", seed=2, **SMALL_T)
    assert_mean_one(np.exp(result.log_px - np64(model.log_marginal(x))), "forward, prior")


def test_bdmc_over_several_blocks_matches_one_block(float64):
    """max_pairs holds 50 points (with the two tuning chains): 8 blocks, each reverse chain
    starting from its own point's z*. With T = 1 the reverse weight is the single increment
    at z*, so upper = log p(x, z*) - log q(z* | x) exactly, in every block. With T = 3, per
    point, lower and upper equal those of one block in distribution (the mean of the
    differences is 0 within NUM_SE SEs), and the weights have mean one in probability
    space."""
    model, guide = make_one_factor()
    pyro.set_rng_seed(20)
    x, exact_draws = simulate_data(model, 400)
    exact = np64(model.log_marginal(x))
    chains = SMALL_T["num_chains"] + 2
    settings = dict(posterior_sample=exact_draws, **SMALL_T)
    single_step = bdmc(model, guide, x, num_steps=1, max_pairs=50 * chains, seed=1, **settings)
    z = exact_draws["z"]
    with torch.no_grad():
        log_ratio = model.prior().log_prob(z) + model.observation(z).log_prob(x)
        log_ratio -= guide.distribution(x).log_prob(z)
    np.testing.assert_allclose(single_step.per_datapoint["upper"], np64(log_ratio), rtol=1e-10)
    settings["num_steps"] = 3
    one = bdmc(model, guide, x, seed=1, **settings)
    several = bdmc(model, guide, x, max_pairs=50 * chains, seed=2, **settings)
    for name in ("lower", "upper"):
        difference = several.per_datapoint[name] - one.per_datapoint[name]
        se = difference.std(ddof=1) / math.sqrt(len(difference))
        assert abs(difference.mean()) <= NUM_SE * se, name
    assert_mean_one(np.exp(several.per_datapoint["lower"] - exact), "forward")
    assert_mean_one(np.exp(exact - several.per_datapoint["upper"]), "reverse")


def test_bdmc_blocks_use_different_draws(float64):
    """Two blocks on the same 25 points and z*: each block draws from its own seed, so
    their results differ (identical results would mean every block replays one block's
    random draws, and the blocks' errors would not average out)."""
    model, guide = make_one_factor()
    pyro.set_rng_seed(21)
    x, exact_draws = simulate_data(model, 25)
    twice = {"z": torch.cat([exact_draws["z"]] * 2)}
    chains = SMALL_T["num_chains"] + 2
    result = bdmc(
        model,
        guide,
        torch.cat([x, x]),
        posterior_sample=twice,
        num_steps=3,
        max_pairs=25 * chains,
        seed=3,
        **SMALL_T,
    )
    for name in ("lower", "upper"):
        first, second = np.split(result.per_datapoint[name], 2)
        assert np.all(first != second), name


@torch.no_grad()
def whitened_posterior_residuals(model, x, z):
    """L^-1 (z - mu(x)) with L L^T the exact posterior covariance: N(0, I) under p(z|x)."""
    tril = torch.linalg.cholesky(model.posterior_covariance())
    centred = (z - model.posterior_mean(x)).unsqueeze(-1)
    return torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1)


def moments_match_standard_normal(residuals: torch.Tensor) -> bool:
    """Mean 0 and covariance I of (M, L) independent rows, each entry within NUM_SE SEs
    estimated from the rows."""
    count = residuals.shape[0]
    mean_ok = residuals.mean(0).abs() <= NUM_SE * residuals.std(0) / math.sqrt(count)
    products = residuals.unsqueeze(-1) * residuals.unsqueeze(-2)  # (M, L, L)
    deviation = products.mean(0) - torch.eye(residuals.shape[-1])
    cov_ok = deviation.abs() <= NUM_SE * products.std(0) / math.sqrt(count)
    return bool(mean_ok.all()) and bool(cov_ok.all())


def run_hmc(target, values, beta, num_transitions=10, step_size=0.3, num_leapfrog=5):
    """Fixed-step HMC transitions at inverse temperature beta; returns the state and the mean
    acceptance probability."""
    state = target.evaluate(target.flatten(values))
    step = torch.full((target.num_points,), step_size)
    accept = []
    for _ in range(num_transitions):
        state, prob = hmc_transition(state, target.evaluate, beta, step, num_leapfrog)
        accept.append(float(prob.mean()))
    return state, float(np.mean(accept))


def test_hmc_leaves_exact_posterior_invariant(float64):
    """From exact posterior draws, transitions at beta = 1 keep the exact mean and covariance;
    the same check fails at beta = 0 (whose invariant density is the guide), so it can see a
    wrong kernel."""
    model, guide = make_linear_gaussian()
    x = model.sample_data(20, seed=DATA_SEED)
    target = AnnealingTarget(model, guide, (x,), {})
    torch.manual_seed(4)
    with torch.no_grad():
        draws = model.posterior(x).sample((200,))  # (C, N, L), independent exact draws
    state, acceptance = run_hmc(target, {"z": draws}, beta=1.0)
    assert 0.5 < acceptance < 1.0
    moved = target.unflatten(state.position)[0]["z"]
    start = whitened_posterior_residuals(model, x, draws).reshape(-1, L)
    end = whitened_posterior_residuals(model, x, moved).reshape(-1, L)
    assert float((end - start).square().mean()) > 0.5  # the chains moved (independent: 2)
    assert moments_match_standard_normal(end)
    wrong, _ = run_hmc(target, {"z": draws}, beta=0.0)
    assert not moments_match_standard_normal(whitened_posterior_residuals(model, x, wrong.position))


# ------------------------------------------------------- a user's model with two latent sites


def gamma_poisson_normal(counts, values):
    """rate ~ Gamma(ALPHA, BETA)^3, counts ~ Poisson(rate); loc ~ N(0, 1)^2 and
    values ~ N(loc, NOISE^2)."""
    with pyro.plate("data", counts.shape[0]):
        prior = dist.Gamma(counts.new_full((3,), ALPHA), counts.new_full((3,), BETA))
        rate = pyro.sample("rate", prior.to_event(1))
        pyro.sample("counts", dist.Poisson(rate).to_event(1), obs=counts)
        loc = pyro.sample("loc", dist.Normal(values.new_zeros(2), 1.0).to_event(1))
        pyro.sample("values", dist.Normal(loc, NOISE).to_event(1), obs=values)


def simulate_gamma_poisson_normal(num_points: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rate = torch._standard_gamma(torch.full((num_points, 3), ALPHA), generator=generator) / BETA
    counts = torch.poisson(rate, generator=generator)
    loc = torch.randn(num_points, 2, generator=generator)
    values = loc + NOISE * torch.randn(num_points, 2, generator=generator)
    return counts, values


def exact_log_marginal(counts, values) -> np.ndarray:
    negative_binomial = dist.NegativeBinomial(ALPHA, probs=torch.tensor(1 / (1 + BETA)))
    normal = dist.Normal(0.0, math.sqrt(1 + NOISE**2))
    return np64(negative_binomial.log_prob(counts).sum(-1) + normal.log_prob(values).sum(-1))


def exact_posterior(counts, values):
    """(Gamma over the rates, Normal over the locs), batch shapes (N, 3) and (N, 2)."""
    shrink = 1 / (1 + NOISE**2)
    rates = dist.Gamma(ALPHA + counts, torch.full_like(counts, BETA + 1))
    locs = dist.Normal(shrink * values, torch.full_like(values, math.sqrt(NOISE**2 * shrink)))
    return rates, locs


def test_ais_matches_exact_log_marginal_of_user_model_with_two_sites(float64):
    counts, values = simulate_gamma_poisson_normal(20, seed=DATA_SEED)
    torch.manual_seed(0)
    guide = AmortizedGuide(gamma_poisson_normal, counts[:4], values[:4], hidden_sizes=(16,))
    result = ais(
        gamma_poisson_normal,
        guide,
        counts,
        values,
        num_steps=100,
        num_chains=64,
        num_leapfrog=3,
        seed=2,
    )
    assert_matches_exact(result, exact_log_marginal(counts, values))


def test_hmc_leaves_exact_posterior_invariant_on_positive_site(float64):
    """The Gamma site is sampled in log space: without the Jacobian the kernel would target
    the wrong density. Standardized residuals of both sites keep mean 0 and variance 1."""
    counts, values = simulate_gamma_poisson_normal(20, seed=DATA_SEED)
    target = AnnealingTarget(gamma_poisson_normal, None, (counts, values), {}, start="prior")
    rates, locs = exact_posterior(counts, values)
    torch.manual_seed(6)
    draws = {"rate": rates.sample((200,)), "loc": locs.sample((200,))}
    state, acceptance = run_hmc(target, draws, beta=1.0, step_size=0.2)
    assert 0.5 < acceptance < 1.0
    moved = target.unflatten(state.position)[0]
    for name, exact in (("rate", rates), ("loc", locs)):
        residual = ((moved[name] - exact.mean) / exact.variance.sqrt()).reshape(-1)
        count = residual.numel()
        assert abs(float(residual.mean())) <= NUM_SE * float(residual.std()) / math.sqrt(count)
        squares = residual.square()
        assert abs(float(squares.mean()) - 1) <= NUM_SE * float(squares.std()) / math.sqrt(count)


# --------------------------------------------------------------------------- built-in VAE


@pytest.mark.parametrize("options", [{}, {"top_latent_dim": 2, "top_hidden_sizes": (8,)}])
def test_ais_and_bdmc_run_on_the_builtin_vae(options, tmp_path):
    vae = VAE(
        num_features=12, latent_dim=2, hidden_sizes=(8,), likelihood="bernoulli", seed=0, **options
    )
    x = (torch.rand(10, 12, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    settings = dict(num_steps=20, num_chains=4, num_leapfrog=3, seed=0)
    result = ais(vae.model, vae.guide, x, **settings)
    again = ais(vae.model, vae.guide, x, **settings)
    np.testing.assert_array_equal(result.log_px, again.log_px)  # seeded: reproducible
    for name, values in result.per_datapoint.items():
        assert values.shape == (10,) and values.dtype == np.float64, name
        assert np.all(np.isfinite(values)), name
    assert np.all(
        (result.per_datapoint["acceptance"] >= 0) & (result.per_datapoint["acceptance"] <= 1)
    )
    assert result.to_csv(tmp_path / "ais.csv").read_text().startswith("data_point,log_px")
    untuned = ais(vae.model, vae.guide, x, tuning_chains=0, **settings)
    assert np.all(np.isfinite(untuned.log_px))
    sandwich = bdmc(vae.model, vae.guide, num_points=10, **settings)
    assert sandwich.inputs[0].shape == (10, 12)
    for name in ("lower", "upper", "width"):
        assert np.all(np.isfinite(sandwich.per_datapoint[name])), name
    assert math.isfinite(sandwich.mean_width)


# ---------------------------------------------------------------------------- refusals


def global_latent_model(x):
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(shift, 1.0), obs=x)


def discrete_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        switch = pyro.sample("switch", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(switch, 1.0), obs=x)


def test_ais_refuses_bad_settings_and_models():
    model, guide = make_linear_gaussian()
    x = model.sample_data(4, seed=0).float()
    model, guide = model.float(), guide.float()
    bad = [
        ({"schedule": "cosine"}, "schedule"),
        ({"start": "posterior"}, "start"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_chains": 0}, "num_chains"),
        ({"target_accept": 1.5}, "target_accept"),
        ({"step_size": -1.0}, "step_size"),
        ({"tuning_chains": -1}, "tuning_chains"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            ais(model, guide, x, num_steps=options.pop("num_steps", 2), **options)
    with pytest.raises(ValueError, match="needs a guide"):
        ais(model, None, x, num_steps=2)
    with pytest.raises(ValueError, match="plate"):
        ais(global_latent_model, None, torch.zeros(3), num_steps=2, start="prior")
    with pytest.raises(ValueError, match="discrete"):
        ais(discrete_latent_model, None, torch.zeros(3), num_steps=2, start="prior")
    with pytest.raises(ValueError, match="posterior_sample"):
        bdmc(model, guide, x, num_steps=2)


def test_long_runs_report_each_block_with_the_time_left(float64):
    """One line per block (the CLI prints them under -v), the last with nothing left."""
    model, _ = make_linear_gaussian()
    x, _ = simulate_data(model, 6)
    lines = []
    ais(
        model,
        None,
        x,
        start="prior",
        num_steps=3,
        num_chains=2,
        tuning_chains=0,
        max_pairs=4,
        seed=0,
        on_block=lines.append,
    )
    assert len(lines) == 3 and lines[0].startswith("AIS block 1/3: 2 of 6 points")
    assert lines[-1].endswith("about 0 s left")
