"""Correctness of the importance-sampled evaluation, proven against closed forms.

The linear-Gaussian model (factor analysis) has an exact marginal log p(x), an exact
posterior p(z|x) and an exact KL(q(z|x) || p(z|x)) for any Gaussian guide, so every
estimate of :func:`pyrovae.evaluation.importance.evaluate` can be compared with the truth.

Conventions. Everything runs in float64 with fixed seeds. A Monte Carlo comparison passes
when the estimate is within NUM_SE = 4 standard errors of its exact expectation; the
standard error comes from the spread of the draws, or from the exact moments of the
importance weights (:func:`importance_weight_log_moment`), never from a number chosen to
pass. For a correct estimator one comparison fails with probability ~6e-5 (normal tail), a
per-datapoint check over N = 40 points with ~0.25%; with the seeds fixed a passing test then
passes deterministically. Deterministic identities (closed forms against independent
implementations) use 1e-10 nats, far above float64 rounding (~1e-15 relative) and far below
any modelling error.

The standard errors are honest only when the normalized importance weights
r = p(z|x) / q(z|x) have a finite variance and their sample variance is itself reliable
(finite fourth moment); for Gaussians E_q[r^m] < inf iff m Lambda_p - (m - 1) Lambda_q is
positive definite (Lambda: precisions), which :func:`assert_weights_have_four_moments`
checks for every guide used in a statistical test.
"""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import integrate, stats
from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.traces import particle_terms
from pyrovae.models.linear_gaussian import (
    LinearGaussianGuide,
    LinearGaussianModel,
    exact_posterior_kl,
    gaussian_kl,
    importance_weight_log_moment,
)

NUM_SE = 4.0
"""Tolerance, in standard errors, of every Monte Carlo comparison."""

EXACT = 1e-10
"""Tolerance of deterministic float64 identities (nats)."""

D, L, N = 5, 3, 40
MODEL_SEED, DATA_SEED = 2, 7
K_LARGE = 5000


def make_model() -> LinearGaussianModel:
    return LinearGaussianModel.random(D, L, seed=MODEL_SEED)


def make_imperfect_guide(model: LinearGaussianModel) -> LinearGaussianGuide:
    """Wrong in all three ways: mean map shrunk (error grows with x), offset, too wide."""
    best = LinearGaussianGuide.optimal_for(model)
    with torch.no_grad():
        return LinearGaussianGuide(0.8 * best.weight, best.bias + 0.3, 1.4 * best.scale)


def assert_weights_have_four_moments(model, guide) -> None:
    """E_q[w^4] < inf, i.e. 4 Lambda_p - 3 Lambda_q > 0: the SE and its estimate are valid."""
    with torch.no_grad():
        condition = 4 * model.posterior_precision() - 3 * torch.diag(guide.scale**-2)
    assert float(torch.linalg.eigvalsh(condition).min()) > 0


def np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def spreads(model, guide, x, seed: int, num_particles: int = K_LARGE) -> dict[str, np.ndarray]:
    """Per-datapoint standard deviations over draws z ~ q(z|x) of the summands of the ELBOs.

    From an independent run (its own seed); a standard deviation estimated from 5000 draws
    is accurate to ~1% (relative SE 1/sqrt(2(K-1))), which is all a tolerance needs.
    """
    torch.manual_seed(seed)
    terms = particle_terms(model, guide, x, num_particles=num_particles)
    return {
        "log_w": np64(terms.log_weights.std(0)),
        "analytic": np64((terms.log_p_obs - terms.kl).std(0)),
        "mc_minus_analytic": np64((terms.log_p_latent - terms.log_q + terms.kl).std(0)),
    }


def mean_se(per_point_se: np.ndarray) -> float:
    """SE of a mean over data points of independent estimates with these SEs."""
    return float(np.sqrt(np.sum(per_point_se**2)) / len(per_point_se))


@pytest.fixture(scope="module")
def setup():
    """Model, data, both guides, exact values and the K=5000 evaluations (computed once)."""
    model = make_model()
    x = model.sample_data(N, seed=DATA_SEED)
    imperfect = make_imperfect_guide(model)
    optimal = LinearGaussianGuide.optimal_for(model)
    for guide in (imperfect, optimal):
        assert_weights_have_four_moments(model, guide)
    with torch.no_grad():
        exact = {
            "log_px": np64(model.log_marginal(x)),
            "kl_imperfect": np64(exact_posterior_kl(model, imperfect, x)),
            "kl_optimal": np64(exact_posterior_kl(model, optimal, x)),
        }
    options = {"num_samples": K_LARGE, "ks": (1, 5, 50), "latent_diagnostics": False}
    return {
        "model": model,
        "x": x,
        "imperfect": imperfect,
        "optimal": optimal,
        "exact": exact,
        "eval_imperfect": evaluate(model, imperfect, x, seed=11, **options).per_datapoint,
        "eval_optimal": evaluate(model, optimal, x, seed=12, **options).per_datapoint,
        "spread_imperfect": spreads(model, imperfect, x, seed=13),
        "spread_optimal": spreads(model, optimal, x, seed=14),
    }


# ------------------------------------------------------------- the reference model itself


def test_log_marginal_matches_scipy(float64):
    model = make_model()
    x = model.sample_data(N, seed=DATA_SEED)
    w, b, psi = np64(model.weight), np64(model.bias), np64(model.noise_scale)
    brute = stats.multivariate_normal(mean=b, cov=w @ w.T + np.diag(psi**2)).logpdf(np64(x))
    np.testing.assert_allclose(np64(model.log_marginal(x)), brute, rtol=0, atol=EXACT)


def test_posterior_satisfies_bayes_rule_and_the_pyro_model_scores_the_same(float64):
    model = make_model()
    x = model.sample_data(N, seed=DATA_SEED)
    w, b, psi = np64(model.weight), np64(model.bias), np64(model.noise_scale)
    log_px = np64(model.log_marginal(x))
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):  # several arbitrary z per data point, far from and near the posterior
        z = 2.0 * torch.randn(N, L, generator=generator, dtype=torch.float64)
        log_pz = stats.norm.logpdf(np64(z)).sum(-1)
        log_px_given_z = stats.norm.logpdf(np64(x), np64(z) @ w.T + b, psi).sum(-1)
        log_post = np64(model.posterior(x).log_prob(z))
        np.testing.assert_allclose(log_pz + log_px_given_z - log_post, log_px, atol=EXACT)
        trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x)
        trace.compute_log_prob()
        np.testing.assert_allclose(np64(trace.nodes["z"]["log_prob"]), log_pz, atol=EXACT)
        np.testing.assert_allclose(np64(trace.nodes["x"]["log_prob"]), log_px_given_z, atol=EXACT)


def test_sampled_data_follow_the_marginal(float64):
    model = make_model()
    count = 20000
    x = np64(model.sample_data(count, seed=5))
    cov = np64(model.marginal_covariance())
    # SE of a sample mean: sqrt(C_ii / M); of a sample covariance entry (Gaussian data):
    # sqrt((C_ii C_jj + C_ij^2) / M).
    mean_se_ = np.sqrt(np.diag(cov) / count)
    assert np.all(np.abs(x.mean(0) - np64(model.bias)) <= NUM_SE * mean_se_)
    cov_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / count)
    assert np.all(np.abs(np.cov(x, rowvar=False) - cov) <= NUM_SE * cov_se)


def test_gaussian_kl_matches_torch(float64):
    generator = torch.Generator().manual_seed(4)

    def spd(*batch):
        root = torch.randn(*batch, L, L, generator=generator)
        return root @ root.transpose(-1, -2) + 0.5 * torch.eye(L)

    q_loc, p_loc = torch.randn(2, 6, L, generator=generator)
    cases = [
        (q_loc, spd(6), p_loc, spd(6)),  # batched covariances
        (q_loc, spd(), p_loc, spd()),  # one covariance shared by the batch
        (q_loc[0], spd(), p_loc[0], spd()),  # unbatched
    ]
    for q_l, q_c, p_l, p_c in cases:
        expected = kl_divergence(
            MultivariateNormal(q_l, covariance_matrix=q_c),
            MultivariateNormal(p_l, covariance_matrix=p_c),
        )
        result = gaussian_kl(q_l, q_c, p_l, p_c)
        assert result.shape == expected.shape
        torch.testing.assert_close(result, expected, rtol=0, atol=EXACT)
    assert float(gaussian_kl(q_loc, spd(), q_loc, spd()).min()) > 0
    same = spd()
    torch.testing.assert_close(gaussian_kl(q_loc, same, q_loc, same), torch.zeros(6))


def test_exact_posterior_kl_and_the_optimal_diagonal_guide(float64):
    model = make_model()
    x = model.sample_data(N, seed=DATA_SEED)
    optimal = LinearGaussianGuide.optimal_for(model)
    imperfect = make_imperfect_guide(model)
    for guide in (optimal, imperfect):
        with torch.no_grad():
            q = MultivariateNormal(guide.loc(x), covariance_matrix=torch.diag(guide.scale**2))
            expected = kl_divergence(q, model.posterior(x))
        torch.testing.assert_close(exact_posterior_kl(model, guide, x).detach(), expected)
    # The optimal guide's mean is the exact posterior mean, and its KL is the closed form
    # 0.5 (sum_l log Lambda_ll - log det Lambda), the same for every x and positive here.
    with torch.no_grad():
        torch.testing.assert_close(optimal.loc(x), model.posterior_mean(x), rtol=0, atol=EXACT)
        precision = model.posterior_precision()
        closed = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    kl = exact_posterior_kl(model, optimal, x)
    torch.testing.assert_close(kl.detach(), closed.expand(N), rtol=0, atol=EXACT)
    assert float(closed) > 1e-3
    # Optimality: the KL is stationary in every guide parameter (it is convex in the mean and
    # in log s, so stationary means minimal), and any perturbation raises it.
    kl.sum().backward()
    for name, parameter in optimal.named_parameters():
        assert float(parameter.grad.abs().max()) < 1e-9, name
    with torch.no_grad():
        for guide in (optimal.perturbed(1.1), optimal.perturbed(0.9), optimal.perturbed(1, 0.05)):
            assert bool((exact_posterior_kl(model, guide, x) > kl).all())


def test_importance_weight_moments_match_quadrature(float64):
    """E_q[r^a] = int p(z|x)^a q(z|x)^(1-a) dz, checked by 1-D quadrature (L = 1)."""
    model = LinearGaussianModel.random(4, 1, seed=8)
    x = model.sample_data(3, seed=9)
    guide = LinearGaussianGuide.optimal_for(model).perturbed(1.3, 0.2)
    with torch.no_grad():
        p_loc, p_sd = np64(model.posterior_mean(x))[:, 0], math.sqrt(model.posterior_covariance())
        q_loc, q_sd = np64(guide.loc(x))[:, 0], float(guide.scale)
        for order in (0.0, 0.5, 1.0, 2.0, 3.0, 4.0):
            closed = np64(importance_weight_log_moment(model, guide, x, order))
            for n in range(3):

                def integrand(z, n=n, order=order):
                    log_p = stats.norm.logpdf(z, p_loc[n], p_sd)
                    return math.exp(
                        order * log_p + (1 - order) * stats.norm.logpdf(z, q_loc[n], q_sd)
                    )

                value, abserr = integrate.quad(integrand, -np.inf, np.inf, epsabs=0, epsrel=1e-12)
                # Tolerance: quadrature's own error estimate, which must itself be tiny.
                assert abserr <= 1e-9 * value
                assert abs(math.exp(closed[n]) - value) <= 10 * abserr + 1e-12 * value, order
        # A guide narrower than the posterior (s_q < s_p): A = a / s_p^2 + (1 - a) / s_q^2 > 0
        # iff a < a* = 1 / (1 - s_q^2 / s_p^2); beyond a* the moment diverges (+inf).
        narrow = LinearGaussianGuide.optimal_for(model).perturbed(0.8)
        critical = 1 / (1 - (float(narrow.scale) / p_sd) ** 2)
        below = importance_weight_log_moment(model, narrow, x, 0.99 * critical)
        above = importance_weight_log_moment(model, narrow, x, 1.01 * critical)
        assert bool(torch.isfinite(below).all()) and bool((above == math.inf).all())


def test_parameters_are_local_trainable_and_keep_their_dtype():
    model = LinearGaussianModel.random(D, L, seed=0, dtype=torch.float32)
    guide = LinearGaussianGuide.optimal_for(model)
    assert {n for n, _ in model.named_parameters()} == {"weight", "bias", "noise_scale"}
    assert {n for n, _ in guide.named_parameters()} == {"weight", "bias", "raw_scale"}
    x = model.sample_data(4, seed=0)
    assert x.dtype == torch.float32
    assert model.log_marginal(x).dtype == torch.float32
    assert exact_posterior_kl(model, guide, x).dtype == torch.float32
    terms = particle_terms(model, guide, x, num_particles=3)
    assert terms.log_weights.dtype == torch.float32
    assert not list(pyro.get_param_store().keys())


# ------------------------------------------------ importance-sampled estimates vs the truth


def test_importance_estimate_is_within_standard_errors_of_exact_log_px(setup):
    result, exact = setup["eval_imperfect"], setup["exact"]["log_px"]
    error, se = result["log_px"] - exact, result["log_px_se"]
    assert float(se.max()) < 0.1  # the comparison is sharp: errors of 0.4 nats would fail
    # log p_hat is low by Var/(2 mean^2) = se^2/2 to first order (delta method): correct it.
    corrected = error + se**2 / 2
    assert np.all(np.abs(corrected) <= NUM_SE * se)
    assert abs(corrected.mean()) <= NUM_SE * mean_se(se)
    # The SE is honest, not inflated: sum of squared z-scores ~ chi^2_N, within its
    # 1e-4 and 1 - 1e-4 quantiles.
    chi2 = float(np.sum((corrected / se) ** 2))
    assert stats.chi2.ppf(1e-4, N) < chi2 < stats.chi2.ppf(1 - 1e-4, N)


def test_log_px_se_estimates_the_exact_monte_carlo_error(setup):
    """K se^2 = K (K/ESS - 1)/(K - 1) estimates V = Var_q[r] (exact, from the moments of r).

    K/ESS = mean(r^2) / mean(r)^2, so by the delta method K se^2 has SD
    sqrt((M4 - M2^2 - 4 M2 (M3 - M2) + 4 M2^2 (M2 - 1)) / K), with M_a = E_q[r^a] exact.
    """
    model, x, guide = setup["model"], setup["x"], setup["imperfect"]
    with torch.no_grad():
        m2, m3, m4 = (
            np.exp(np64(importance_weight_log_moment(model, guide, x, a))) for a in (2, 3, 4)
        )
    variance = m2 - 1
    sd = np.sqrt((m4 - m2**2 - 4 * m2 * (m3 - m2) + 4 * m2**2 * (m2 - 1)) / K_LARGE)
    estimate = K_LARGE * setup["eval_imperfect"]["log_px_se"] ** 2
    assert np.all(np.abs(estimate - variance) <= NUM_SE * sd)
    assert abs((estimate - variance).mean()) <= NUM_SE * mean_se(sd)


def test_bounds_are_ordered_in_expectation(setup):
    """ELBO <= IWAE_5 <= IWAE_50 <= IWAE_5000 = log p_hat <= log p(x), on the mean over points.

    Each step's mean difference, with SE = std of the per-point differences / sqrt(N) (an
    upper bound on the Monte Carlo SE: it also holds the spread of the true steps over the
    points), must never be negative by more than NUM_SE SEs. The first three steps are also
    resolved: the exact KL (mean ~1.9 nats) and weight variance (V ~0.5-16; first-order steps
    V/2 - V/10, V/10 - V/100, V/100 - V/10000) put even the smallest at several SEs. The last
    step, the bias V/(2K) ~ 4e-4 of log p_hat, is far below its SE and only checked one-sided.
    """
    result, exact = setup["eval_imperfect"], setup["exact"]["log_px"]
    np.testing.assert_allclose(result["iwae_1"], result["elbo"], rtol=0, atol=EXACT)
    chain = [result["elbo"], result["iwae_5"], result["iwae_50"], result["log_px"], exact]
    for step, (lower, upper) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
        difference = upper - lower
        se = difference.std(ddof=1) / math.sqrt(N)
        assert difference.mean() >= -NUM_SE * se, step
        if step < 3:  # ELBO -> IWAE_5 -> IWAE_50 -> IWAE_5000: each gap is resolved
            assert difference.mean() > NUM_SE * se, step


def test_expected_elbo_is_log_px_minus_exact_kl(setup):
    """E[ELBO] = log p(x) - KL(q(z|x) || p(z|x)) exactly, for both ELBO estimators."""
    result, exact = setup["eval_imperfect"], setup["exact"]
    spread = setup["spread_imperfect"]
    target = exact["log_px"] - exact["kl_imperfect"]
    assert float(exact["kl_imperfect"].min()) > 0.3  # a clearly imperfect guide
    # SE of a mean over K draws: std / sqrt(K), per point; of the mean over points: pooled.
    for column, key in (("elbo", "log_w"), ("elbo_analytic", "analytic")):
        se = spread[key] / math.sqrt(K_LARGE)
        error = result[column] - target
        assert np.all(np.abs(error) <= NUM_SE * se), column
        assert abs(error.mean()) <= NUM_SE * mean_se(se), column


def test_analytic_and_monte_carlo_elbos_agree_within_their_standard_error(setup):
    """elbo - elbo_analytic = mean_k(log p(z_k) - log q(z_k|x) + KL): zero mean, known spread."""
    for name in ("imperfect", "optimal"):
        result, spread = setup[f"eval_{name}"], setup[f"spread_{name}"]
        se = spread["mc_minus_analytic"] / math.sqrt(K_LARGE)
        difference = result["elbo"] - result["elbo_analytic"]
        assert np.all(np.abs(difference) <= NUM_SE * se), name
        assert abs(difference.mean()) <= NUM_SE * mean_se(se), name


@pytest.mark.parametrize("name", ["imperfect", "optimal"])
def test_gap_matches_exact_posterior_kl(setup, name):
    """gap = log p_hat - ELBO estimates KL(q(z|x) || p(z|x)), per point and on average.

    SE of the gap <= se(log p_hat) + se(ELBO) whatever their correlation (triangle
    inequality); its bias is the -se(log p_hat)^2 / 2 of log p_hat, corrected before comparing.
    For the optimal diagonal guide the KL is small (diagonal approximation only) but resolved.
    """
    result, kl = setup[f"eval_{name}"], setup["exact"][f"kl_{name}"]
    se = result["log_px_se"] + setup[f"spread_{name}"]["log_w"] / math.sqrt(K_LARGE)
    error = result["gap"] + result["log_px_se"] ** 2 / 2 - kl
    assert np.all(np.abs(error) <= NUM_SE * se)
    assert abs(error.mean()) <= NUM_SE * mean_se(se)
    # The average gap detects the KL: it is farther than NUM_SE SEs from zero.
    assert result["gap"].mean() > NUM_SE * mean_se(se)


def test_error_shrinks_with_k_at_the_exact_rate_and_iwae_bias_vanishes_like_v_over_2k(float64):
    """log p_hat error ~ sqrt(V / K) and IWAE_k bias -> V / (2k), V the exact weight variance.

    The guide errs by a constant shift and width, so every point has the same V (~4) and the
    points are independent replicas: the spread over points is pure Monte Carlo noise.
    """
    model = make_model()
    x = model.sample_data(N, seed=DATA_SEED)
    guide = LinearGaussianGuide.optimal_for(model).perturbed(1.5, 0.4)
    assert_weights_have_four_moments(model, guide)
    exact = np64(model.log_marginal(x))
    with torch.no_grad():
        moments = {o: np64(importance_weight_log_moment(model, guide, x, o)) for o in (2, 3)}
    variance = np.expm1(moments[2])  # V
    third = np.exp(moments[3]) - 3 * np.exp(moments[2]) + 2  # E[(r - 1)^3]
    ks, k_max = (1, 10, 100, 1000), 40000
    results = {
        k: evaluate(
            model,
            guide,
            x,
            num_samples=k,
            ks=ks if k == k_max else (1,),
            seed=k,
            latent_diagnostics=False,
        ).per_datapoint
        for k in (10, 1000, k_max)
    }
    errors = {k: np.abs(result["log_px"] - exact) for k, result in results.items()}
    # Mean absolute error: strictly decreasing in K (expected ratios ~10 and ~6).
    assert errors[10].mean() > errors[1000].mean() > errors[k_max].mean()
    # For large K, log p_hat ~ Normal(log p(x) - V/(2K), V/K) (finite fourth moment), so
    # E|error| = sqrt(2/pi) sigma up to the bias V/(2K), and the mean over N points has SD
    # sqrt((1 - 2/pi) sum sigma^2) / N.
    for k in (1000, k_max):
        sigma = np.sqrt(variance / k)
        expected = math.sqrt(2 / math.pi) * sigma.mean()
        spread = math.sqrt((1 - 2 / math.pi) * np.sum(sigma**2)) / N
        assert abs(errors[k].mean() - expected) <= NUM_SE * spread + (variance / (2 * k)).mean()
    # IWAE_k bias from one run, groups of k of the same K draws; SE from the spread over
    # points. Design check: at k=100 the predicted bias V/200 is >= 2 NUM_SE of its SE
    # sqrt(V / K) / sqrt(N), so it is resolved with near certainty.
    result = results[k_max]
    assert (variance / 200).mean() > 2 * NUM_SE * np.sqrt(variance / k_max).mean() / math.sqrt(N)
    bias = {k: exact - result[f"iwae_{k}"] for k in ks}
    se = {k: bias[k].std(ddof=1) / math.sqrt(N) for k in ks}
    for smaller, larger in zip(ks[:-1], ks[1:], strict=True):  # decreasing in k
        step = bias[smaller] - bias[larger]
        assert step.mean() >= -NUM_SE * step.std(ddof=1) / math.sqrt(N)
    for k in (1, 10, 100):  # positive and resolved
        assert bias[k].mean() > NUM_SE * se[k], k
    assert bias[1000].mean() >= -NUM_SE * se[1000]
    # Toward 0 at the asymptotic rate (V/k <= 0.05 here): expanding log(1 + eps) in
    # eps = mean of k r's - 1, E[bias_k] = V/(2k) - E(r-1)^3/(3k^2) + 3V^2/(4k^2) + O((V/k)^3);
    # the magnitudes of the two second-order terms are the allowance.
    for k in (100, 1000):
        assert float(variance.max()) / k <= 0.05
        allowance = (np.abs(third) / (3 * k**2) + 3 * variance**2 / (4 * k**2)).mean()
        predicted = (variance / (2 * k)).mean()
        assert abs(bias[k].mean() - predicted) <= NUM_SE * se[k] + allowance, k


# ------------------------------------------------------------- the traced path and outputs


def test_traced_path_shapes_and_summary_names(float64):
    model = make_model()
    x = model.sample_data(N, seed=DATA_SEED)
    guide = make_imperfect_guide(model)
    generated = model(None, num_samples=7)
    assert generated.shape == (7, D) and generated.dtype == torch.float64
    terms = particle_terms(model, guide, x, num_particles=9)
    assert terms.log_weights.shape == (9, N) and terms.log_weights.dtype == torch.float64
    assert terms.all_analytic
    result = evaluate(model, guide, x, num_samples=100, ks=(1, 5, 50), seed=0)
    expected = {"log_px", "log_px_se", "ess", "elbo", "elbo_analytic", "khat", "gap"}
    assert set(result.per_datapoint) == expected | {"iwae_1", "iwae_5", "iwae_50"}
    for name, values in result.per_datapoint.items():
        assert values.shape == (N,) and values.dtype == np.float64, name
    names = ["elbo", "elbo_analytic", "iwae_1", "iwae_5", "iwae_50", "log_px", "gap"]
    assert [row["quantity"] for row in result.summary()] == names
    assert np.all((result.per_datapoint["ess"] >= 1) & (result.per_datapoint["ess"] <= 100))
    # Latent diagnostics on the user's model: per-dimension KL(q(z_l|x) || N(0, 1)) in
    # closed form, averaged over the points.
    use = result.latent["z"]
    with torch.no_grad():
        m, s = guide.loc(x), guide.scale
        closed = (0.5 * (m**2 + s**2 - 1 - 2 * s.log())).mean(0)
    np.testing.assert_allclose(use.kl_per_dim, np64(closed), rtol=0, atol=EXACT)
    assert use.mean_variance.shape == (L,)
