"""AIS and BDMC treat Pyro's scales and subsampled plates as ``evaluate`` does, or refuse.

Reference model: z_n ~ N(0, 1) and x_nj | z_n ~ N(z_n, SIGMA^2) for J = 4 features in a plate
nested inside the data plate, subsampled 4 -> 2 (scale c = 2). For a subsample S of n
features the target of AIS (which fixes S per block), and of evaluate's log p_hat(x) when
its draws share one S, is the log normalizer of p(z) prod_{j in S} p(x_j | z)^c, in closed
form:

    log Z_S(x) = log N(x_S; 0, SIGMA^2 / c I + 1 1^T) + n [log(2 pi SIGMA^2 / c) / 2
                 - c log(2 pi SIGMA^2) / 2],

since p(x_j | z)^c is a Gaussian density of variance SIGMA^2 / c up to that constant.
Conventions of tests/test_ais.py: float64, fixed seeds, NUM_SE = 4 standard errors computed
from the draws.
"""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae.evaluation.ais import AnnealingTarget, ais, bdmc
from pyrovae.evaluation.importance import evaluate

NUM_SE = 4.0
SIGMA = 0.5
FEATURES, SUBSAMPLE = 4, 2
SCALE = FEATURES / SUBSAMPLE
SETTINGS = dict(num_steps=20, num_chains=16, num_leapfrog=3, step_size=0.2)


def subsampled_model(x, subsample=None):
    """Features subsampled at random (2 of 4) or at the given indices."""
    size = None if subsample is not None else SUBSAMPLE
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate(
            "features", FEATURES, subsample_size=size, subsample=subsample, dim=-2
        ) as index:
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[:, index].T)


def guide(x, subsample=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.9 * x.mean(-1), 0.35))


def simulate(num_points: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_points, 1, generator=generator, dtype=torch.float64)
    return z + SIGMA * torch.randn(num_points, FEATURES, generator=generator, dtype=torch.float64)


def log_normalizer(x_subset: torch.Tensor, scale: float) -> np.ndarray:
    """log Z_S per data point for x_subset of shape (N, n) (module docstring)."""
    count = x_subset.shape[-1]
    covariance = SIGMA**2 / scale * torch.eye(count) + torch.ones(count, count)
    gaussian = dist.MultivariateNormal(torch.zeros(count), covariance).log_prob(x_subset)
    log_two_pi_var = math.log(2 * math.pi * SIGMA**2)
    constant = count * (0.5 * (log_two_pi_var - math.log(scale)) - 0.5 * scale * log_two_pi_var)
    return (gaussian + constant).numpy()


def mean_over_subsets(x: torch.Tensor) -> np.ndarray:
    """E_S[log Z_S(x)] over the 6 equally likely subsamples S, per data point."""
    subsets = itertools.combinations(range(FEATURES), SUBSAMPLE)
    return np.mean([log_normalizer(x[:, list(s)], SCALE) for s in subsets], axis=0)


def within(errors: np.ndarray, ses: np.ndarray) -> bool:
    return bool(np.all(np.abs(errors) <= NUM_SE * ses))


def test_ais_evaluates_every_density_on_one_subsample(float64):
    """The densities HMC sees are those of one fixed subsample S, scaled by c = 2: two
    evaluations at the same positions agree, and equal the closed form for S."""
    x = simulate(5, seed=0)
    target = AnnealingTarget(subsampled_model, guide, (x,), {})
    torch.manual_seed(1)
    position = torch.randn(7, 5, 1)
    first, second = target.evaluate(position), target.evaluate(position)
    torch.testing.assert_close(first.log_joint, second.log_joint, rtol=0, atol=0)
    subsample = target.subsamples["features"]
    assert subsample.shape == (SUBSAMPLE,)
    z = target.unflatten(position)[0]["z"].reshape(7, 5, 1)
    exact = dist.Normal(0.0, 1.0).log_prob(z[..., 0]) + SCALE * dist.Normal(z, SIGMA).log_prob(
        x[:, subsample]
    ).sum(-1)
    torch.testing.assert_close(first.log_joint, exact)


def test_ais_applies_the_scale_of_a_given_subsample(float64):
    """Features 0 and 2 given: AIS and evaluate both estimate log Z_S with c = 2, per point."""
    x = simulate(16, seed=1)
    chosen = torch.tensor([0, 2])
    exact = log_normalizer(x[:, chosen], SCALE)
    result = ais(subsampled_model, guide, x, subsample=chosen, seed=0, **SETTINGS)
    assert within(result.log_px - exact, result.log_px_se)
    reference = evaluate(
        subsampled_model,
        guide,
        x,
        subsample=chosen,
        num_samples=1000,
        ks=(1,),
        seed=0,
        latent_diagnostics=False,
    )
    assert within(reference.per_datapoint["log_px"] - exact, reference.per_datapoint["log_px_se"])
    # Without the scale (what AIS returned before) the answer is outside the tolerance.
    assert not within(log_normalizer(x[:, chosen], 1.0) - exact, result.log_px_se)


def test_ais_with_a_random_subsample_estimates_its_log_normalizer(float64):
    """One data point per block, so each point has its own subsample S: the mean over points
    of log_px - E_S[log Z_S] is zero within its standard error (from the spread over points,
    which includes the spread over S). Before the subsample was fixed (a new S at every
    density evaluation, no scale) AIS returned about 1.2 nats more here."""
    x = simulate(32, seed=2)
    chains = SETTINGS["num_chains"] + 2  # two tuning chains
    result = ais(subsampled_model, guide, x, max_pairs=chains, seed=0, **SETTINGS)
    error = result.log_px - mean_over_subsets(x)
    assert abs(error.mean()) <= NUM_SE * error.std(ddof=1) / math.sqrt(len(error))


def test_a_scale_common_to_every_site_is_left_out(float64):
    """poutine.scale(0.5) around the whole model and guide: per-datapoint log p(x) of the
    unscaled model, as evaluate reports it."""
    x = simulate(16, seed=3)
    chosen = torch.arange(FEATURES)
    scaled_model = poutine.scale(subsampled_model, scale=0.5)
    scaled_guide = poutine.scale(guide, scale=0.5)
    result = ais(scaled_model, scaled_guide, x, subsample=chosen, seed=0, **SETTINGS)
    assert within(result.log_px - log_normalizer(x, 1.0), result.log_px_se)


def obs_scaled_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        with poutine.scale(scale=0.5):
            loc = z.unsqueeze(-1).expand(z.shape + (FEATURES,))
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=x)


def test_ais_and_bdmc_refuse_a_scale_on_the_observed_site_as_evaluate_does(float64):
    x = simulate(4, seed=4)
    message = "share no common factor"
    with pytest.raises(ValueError, match=message):
        evaluate(obs_scaled_model, guide, x, num_samples=10, ks=(1,), latent_diagnostics=False)
    with pytest.raises(ValueError, match=message):
        ais(obs_scaled_model, guide, x, num_steps=3, num_chains=2)
    with pytest.raises(ValueError, match=message):
        ais(obs_scaled_model, None, x, num_steps=3, num_chains=2, start="prior")
    z = {"z": torch.zeros(4)}
    with pytest.raises(ValueError, match=message):
        bdmc(obs_scaled_model, guide, x, posterior_sample=z, num_steps=3, num_chains=2)


def test_bdmc_refuses_a_subsampled_inner_plate(float64):
    """z* is an exact posterior draw given all the features, not a draw of the scaled
    target on a subsample: the upper bound would not hold."""
    x = simulate(4, seed=5)
    with pytest.raises(ValueError, match="subsampled plates"):
        bdmc(subsampled_model, guide, x, posterior_sample={"z": torch.zeros(4)}, num_steps=3)


def latent_in_subsampled_plate(x):
    with pyro.plate("data", x.shape[0]):
        with pyro.plate("features", FEATURES, subsample_size=SUBSAMPLE, dim=-2) as index:
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[:, index].T)


def latent_in_subsampled_plate_guide(x):
    with pyro.plate("data", x.shape[0]):
        with pyro.plate("features", FEATURES, subsample_size=SUBSAMPLE, dim=-2) as index:
            pyro.sample("z", dist.Normal(0.8 * x[:, index].T, 0.4))


def data_subsampled_inside(x):
    with pyro.plate("data", x.shape[0], subsample_size=2) as index:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x[index, 0])


def test_ais_refuses_subsampled_latent_sites_and_data_plate(float64):
    x = simulate(4, seed=6)
    with pytest.raises(ValueError, match="latent site 'z' is in a subsampled plate"):
        ais(latent_in_subsampled_plate, latent_in_subsampled_plate_guide, x, num_steps=3)
    with pytest.raises(ValueError, match="latent site 'z' is in a subsampled plate"):
        ais(latent_in_subsampled_plate, None, x, num_steps=3, start="prior")
    with pytest.raises(ValueError, match="data plate 'data' subsamples"):
        AnnealingTarget(data_subsampled_inside, None, (x,), {}, start="prior")
