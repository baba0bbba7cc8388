"""STL and DReG for guides whose sites depend on each other (issue 14, item 5).

For a guide q(z1 | x) q(z2 | z1) with reparameterized draws z1(eps, phi), z2(z1, eps, phi):

* STL's guide gradient is d/dphi [log p(x, z) - log q_{sg(phi)}(z)]: only the score term
  d/dphi log q_phi(z) at fixed z is removed; the path term through q(z2 | z1)'s dependence
  on z1 stays. At the exact posterior log p(x, z) - log q(z | x) = log p(x) for every z, so
  the gradient is exactly zero draw by draw.
* DReG's guide gradient is sum_k w~_k^2 d/dphi [log w_k with phi stopped in log q], the
  model's sum_k w~_k d/dtheta log w_k: each draw's weight applied once (the old per-site
  hooks applied w~ at z2 and again at z1, w~^3 for the path through z2). Unbiased for the
  IWAE_K guide gradient.

Checked on a two-level linear-Gaussian model whose exact posterior the guide can represent
(per-draw zeros; unbiasedness against the standard estimators, tolerance from the Monte
Carlo standard errors of R independent replicates) and on the built-in two-layer VAE
(``top_latent_dim``) against references computed here with a detached copy of the guide and
one backward pass per weight. float64, fixed seeds.
"""

import copy
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import VAE
from pyrovae.objectives import IWAE, STLELBO, DReGIWAE

NUM_SE = 4.0
"""Tolerance, in standard errors, of every Monte Carlo comparison (per coordinate, normal
tail 6e-5; over the 17 guide coordinates about 1e-3)."""

EXACT = 1e-10
ZERO = 1e-9
"""Largest |gradient| counted as zero: the terms that cancel are O(1), float64 rounding
leaves O(1e-14)."""

L2, L1, D, N = 1, 2, 3, 3
K_IWAE = 5
R = 20000


def mv(matrix, vector):
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


class TwoLevelGaussian:
    """z2 ~ N(0, I); z1 | z2 ~ N(W2 z2 + b2, diag s1^2); x | z1 ~ N(W1 z1 + b1, diag sx^2),
    and the exact posterior p(z1 | x) p(z2 | z1) (x is independent of z2 given z1)."""

    def __init__(self, seed: int = 4):
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        self.W2, self.b2 = randn(L1, L2), 0.3 * randn(L1)
        self.s1 = 0.5 + torch.rand(L1, generator=g, dtype=torch.float64)
        self.W1, self.b1 = randn(D, L1), 0.3 * randn(D)
        self.sx = 0.6 + torch.rand(D, generator=g, dtype=torch.float64)

    def sample_data(self, count: int, seed: int = 7) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z2 = torch.randn(count, L2, generator=g, dtype=torch.float64)
        z1 = mv(self.W2, z2) + self.b2 + self.s1 * torch.randn(count, L1, generator=g).double()
        return mv(self.W1, z1) + self.b1 + self.sx * torch.randn(count, D, generator=g).double()

    def model_params(self) -> list[torch.Tensor]:
        return [self.W2, self.b2, self.s1.log(), self.W1, self.b1, self.sx.log()]

    def exact_guide_params(self) -> list[torch.Tensor]:
        """[A, c, T1, B, d, T2]: q(z1|x) = N(A x + c, T1 T1^T), q(z2|z1) = N(B z1 + d, T2 T2^T)."""
        precision_x = torch.diag(self.sx**-2)
        prior_cov = self.W2 @ self.W2.T + torch.diag(self.s1**2)  # of z1, mean b2
        cov = torch.linalg.inv(torch.linalg.inv(prior_cov) + self.W1.T @ precision_x @ self.W1)
        A = cov @ self.W1.T @ precision_x
        c = cov @ (torch.linalg.solve(prior_cov, self.b2) - self.W1.T @ precision_x @ self.b1)
        precision_1 = torch.diag(self.s1**-2)
        cov_2 = torch.linalg.inv(
            torch.eye(L2, dtype=torch.float64) + self.W2.T @ precision_1 @ self.W2
        )
        B = cov_2 @ self.W2.T @ precision_1
        return [A, c, torch.linalg.cholesky(cov), B, -B @ self.b2, torch.linalg.cholesky(cov_2)]

    def perturbed_guide_params(self) -> list[torch.Tensor]:
        """Off the optimum for both sites (mean of z1 and z2, both scales)."""
        A, c, T1, B, d, T2 = self.exact_guide_params()
        return [A + 0.1, c - 0.2, 1.2 * T1, B + 0.3, d + 0.2, 1.3 * T2]


class Replicated:
    """R replicates of the data set in one vectorized pass; rows of replicate r use the r-th
    copy of every parameter, so the gradient w.r.t. the copies (R, ...) holds R independent
    replicates of an estimator's gradient."""

    def __init__(self, problem: TwoLevelGaussian, guide_params, x, replicates: int):
        self.replicates, self.x = replicates, x.repeat(replicates, 1)
        self.owner = torch.arange(replicates).repeat_interleave(x.shape[0])

        def copies(tensor):
            return tensor.detach().expand(replicates, *tensor.shape).clone().requires_grad_()

        self.model_params = [copies(p) for p in problem.model_params()]
        self.guide_params = [copies(p) for p in guide_params]

    def model(self, x):
        W2, b2, log_s1, W1, b1, log_sx = (p[self.owner] for p in self.model_params)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(L2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(mv(W2, z2) + b2, log_s1.exp()).to_event(1))
            pyro.sample("x", dist.Normal(mv(W1, z1) + b1, log_sx.exp()).to_event(1), obs=x)

    def guide(self, x):
        A, c, T1, B, d, T2 = (p[self.owner] for p in self.guide_params)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(mv(A, x) + c, scale_tril=T1.tril()))
            pyro.sample("z2", dist.MultivariateNormal(mv(B, z1) + d, scale_tril=T2.tril()))

    def gradients(self, objective, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-replicate gradients of the loss: guide (R, 17) and model (R, 18)."""
        for p in self.model_params + self.guide_params:
            p.grad = None
        pyro.set_rng_seed(seed)
        objective.differentiable_loss(self.model, self.guide, self.x).backward()

        def flat(params):
            return torch.cat([p.grad.reshape(self.replicates, -1) for p in params], 1).numpy()

        return flat(self.guide_params), flat(self.model_params)


Z1_COORDINATES = slice(0, 2 * D + 2 + 4)  # A (2x3), c (2), T1 (2x2): q(z1 | x)


def trace_elbo(num_particles: int = 1):
    return pyro.infer.Trace_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )


ESTIMATORS = {
    "elbo": lambda: trace_elbo(),
    "stl": lambda: STLELBO(num_particles=1, max_plate_nesting=1),
    "iwae": lambda: IWAE(num_particles=K_IWAE, max_plate_nesting=1),
    "dreg": lambda: DReGIWAE(num_particles=K_IWAE, max_plate_nesting=1),
}


@pytest.mark.parametrize(
    "estimator",
    [
        lambda: STLELBO(num_particles=1, max_plate_nesting=1),
        lambda: STLELBO(num_particles=3, max_plate_nesting=1),
        lambda: DReGIWAE(num_particles=K_IWAE, max_plate_nesting=1),
    ],
    ids=["stl1", "stl3", "dreg5"],
)
def test_guide_gradient_is_zero_per_draw_at_the_exact_posterior(estimator, float64):
    problem = TwoLevelGaussian()
    x = problem.sample_data(N)
    replicated = Replicated(problem, problem.exact_guide_params(), x, 64)
    guide_grads, _ = replicated.gradients(estimator(), seed=3)
    assert np.abs(guide_grads).max() < ZERO, np.abs(guide_grads).max(1).max()
    # Not vacuous: the standard estimators' guide gradients on the same problem are not zero.
    standard, _ = replicated.gradients(trace_elbo(), seed=3)
    assert np.abs(standard[:, Z1_COORDINATES]).max() > 0.1


def test_model_gradients_of_stl_and_dreg_are_the_standard_ones_draw_by_draw(float64):
    problem = TwoLevelGaussian()
    x = problem.sample_data(N)
    replicated = Replicated(problem, problem.perturbed_guide_params(), x, 16)
    for new, standard in (
        (STLELBO(num_particles=3, max_plate_nesting=1), trace_elbo(3)),
        (DReGIWAE(num_particles=K_IWAE, max_plate_nesting=1), ESTIMATORS["iwae"]()),
    ):
        new_guide, new_model = replicated.gradients(new, seed=21)
        std_guide, std_model = replicated.gradients(standard, seed=21)
        np.testing.assert_allclose(new_model, std_model, rtol=EXACT, atol=EXACT)
        assert np.abs(new_guide - std_guide).max() > 1e-3


@pytest.fixture(scope="module")
def gradient_samples():
    """R independent replicates of each estimator's guide gradient at a perturbed guide,
    each estimator with its own seed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        problem = TwoLevelGaussian()
        x = problem.sample_data(N)
        replicated = Replicated(problem, problem.perturbed_guide_params(), x, R)
        return {
            name: replicated.gradients(make(), seed=500 + index)[0]
            for index, (name, make) in enumerate(ESTIMATORS.items())
        }
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("new, standard", [("stl", "elbo"), ("dreg", "iwae")])
def test_guide_gradients_are_unbiased_for_the_standard_estimators_expectation(
    gradient_samples, new, standard
):
    """Means of independent replicates agree within 4 SE of their difference on every guide
    coordinate, SE = sqrt(var_new / R + var_std / R); q(z1 | x)'s coordinates are the ones
    the double weighting biased. Power: IWAE_5's expectation differs from the ELBO's here by
    far more than this tolerance."""
    samples = gradient_samples
    a, b = samples[new], samples[standard]
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    constant = se == 0  # entries above the Cholesky factors' diagonals: never used
    assert constant.sum() == 1 and np.all(a[:, constant] == 0) and np.all(b[:, constant] == 0)
    z = (a.mean(0)[~constant] - b.mean(0)[~constant]) / se[~constant]
    assert np.abs(z).max() <= NUM_SE, z.round(2)
    if new == "dreg":
        iwae, elbo = samples["iwae"], samples["elbo"]
        se = np.sqrt(iwae.var(0, ddof=1) / R + elbo.var(0, ddof=1) / R)[~constant]
        difference = (iwae.mean(0) - elbo.mean(0))[~constant]
        assert np.abs(difference / se).max() > 3 * NUM_SE


# ------------------------------------------------------------ the built-in two-layer VAE


def two_layer_vae() -> VAE:
    return VAE(
        num_features=6,
        latent_dim=2,
        top_latent_dim=2,
        hidden_sizes=(8,),
        top_hidden_sizes=(5,),
        likelihood="bernoulli",
        seed=0,
    ).double()


def vae_draws(vae, x, num_particles: int, seed: int):
    """The guide's reparameterized draws (z1, z2), (K, N, L), after ``pyro.set_rng_seed``."""
    pyro.set_rng_seed(seed)
    with pyro.plate("particles", num_particles, dim=-2):
        trace = pyro.poutine.trace(vae.guide).get_trace(x)
    return trace.nodes["z1"]["value"], trace.nodes["z2"]["value"]


def vae_log_weights(vae, x, z1, z2, q_guide):
    """log p(x, z1, z2) - log q(z1, z2 | x), (K, N), with log q from ``q_guide``'s modules."""
    model = vae.model
    log_p = (
        model.prior(x).log_prob(z2)
        + model.conditional_prior.distribution(z2).log_prob(z1)
        + model.likelihood(model.decoder(z1)).log_prob(x)
    )
    log_q = q_guide.encoder.distribution(x).log_prob(z1) + q_guide.top_encoder.distribution(
        z1
    ).log_prob(z2)
    return log_p - log_q


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_two_layer_vae_gradients_equal_the_references(name, float64):
    """Same seed, same draws. STL: gradient of mean_k [log p(x, z_k) - log q_{sg(phi)}(z_k)]
    with log q from a detached copy of the guide (z attached). DReG: model gradient of
    sum_k w~_k log w_k, guide gradient of sum_k w~_k^2 [log p - log q_{sg(phi)}], each taken
    in its own backward pass (no hooks)."""
    vae = two_layer_vae()
    x = torch.bernoulli(torch.full((5, 6), 0.4, dtype=torch.float64))
    count = 1 if name == "stl" else 4
    model_params, guide_params = list(vae.model.parameters()), list(vae.guide.parameters())
    objective = (STLELBO if name == "stl" else DReGIWAE)(count, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    loss = objective.differentiable_loss(vae.model, vae.guide, x)
    ours = torch.autograd.grad(loss, model_params + guide_params)

    frozen = copy.deepcopy(vae.guide).requires_grad_(False)
    z1, z2 = vae_draws(vae, x, count, seed=5)
    log_w = vae_log_weights(vae, x, z1, z2, vae.guide)
    path_log_w = vae_log_weights(vae, x, z1, z2, frozen)
    if name == "stl":
        close_all(loss, -log_w.mean(0).sum())
        model_target = guide_target = -path_log_w.mean(0).sum()
    else:
        close_all(loss, -(torch.logsumexp(log_w, 0) - math.log(count)).sum())
        weights = torch.softmax(log_w.detach(), 0)
        model_target = -(weights * log_w).sum()
        guide_target = -(weights**2 * path_log_w).sum()
    expected = torch.autograd.grad(model_target, model_params, retain_graph=True)
    expected += torch.autograd.grad(guide_target, guide_params, retain_graph=True)
    for mine, reference in zip(ours, expected, strict=True):
        close_all(mine, reference)
    # Not vacuous: the score-free guide gradient differs from the reparameterized one.
    plain = torch.autograd.grad(-log_w.mean(0).sum(), guide_params)
    guide_expected = expected[len(model_params) :]
    differences = [float((a - b).abs().max()) for a, b in zip(plain, guide_expected, strict=True)]
    assert max(differences) > 1e-4


def close_all(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=EXACT, atol=EXACT)
