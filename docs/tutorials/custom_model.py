"""Tutorial 2: your own latent-variable model in Pyro, fitted and evaluated with pyrovae.

Factor analysis with covariates. For data point n with covariates c_n (C numbers):

    z_n ~ N(0, I_L)                                   latent factors
    x_n | z_n ~ N(W z_n + B c_n + b, diag(psi^2))     D observed features

The guide is amortized: q(z_n | x_n, c_n) = N(mu(x_n, c_n), diag sigma(x_n, c_n)^2) from a
small network. Both are PyroModules built on pyrovae's LocalParamsModule, so their parameters
are ordinary torch parameters owned by the modules (nothing in Pyro's global param store).
This model is linear-Gaussian, so log p(x | c) and the posterior p(z | x, c) are known in
closed form: we use that to check the importance-sampled estimates against the truth.

Run from anywhere (about 20 s on one CPU thread; nothing is written to disk)::

    python docs/tutorials/custom_model.py
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from pyrovae.evaluation.importance import evaluate
from pyrovae.models.base import LocalParamsModule
from pyrovae.models.linear_gaussian import gaussian_kl
from pyrovae.objectives import make_objective

D, L, C = 12, 2, 2  # observed features, latent factors, covariates
N_TRAIN, N_TEST = 1000, 200


# -- 1. The model: an ordinary Pyro program -----------------------------------------------------
class CovariateFactorModel(LocalParamsModule):
    """p(z) p(x | z, c): every local site inside pyro.plate("data", N)."""

    def __init__(self):
        super().__init__()
        self.loading = nn.Parameter(0.1 * torch.randn(D, L))  # W
        self.effects = nn.Parameter(torch.zeros(D, C))  # B
        self.bias = nn.Parameter(torch.zeros(D))  # b
        self.raw_noise = nn.Parameter(torch.zeros(D))  # psi = softplus(raw) + 1e-3

    def noise_scale(self) -> torch.Tensor:
        return F.softplus(self.raw_noise) + 1e-3

    def forward(self, x, covariates):
        prior = dist.Normal(covariates.new_zeros(L), 1.0).to_event(1)
        # The plate over data points must be called "data" (or pass data_plate= to
        # pyrovae): pyrovae reads one log weight per data point from it.
        with pyro.plate("data", covariates.shape[0]):
            z = pyro.sample("z", prior)
            mean = z @ self.loading.T + covariates @ self.effects.T + self.bias
            return pyro.sample("x", dist.Normal(mean, self.noise_scale()).to_event(1), obs=x)

    # Closed forms, only for checking the estimates (a neural decoder has none).
    def exact_log_marginal(self, x, covariates):
        """log p(x | c) = log N(x; B c + b, W W^T + diag(psi^2))."""
        covariance = self.loading @ self.loading.T + torch.diag(self.noise_scale() ** 2)
        mean = covariates @ self.effects.T + self.bias
        return MultivariateNormal(mean, covariance_matrix=covariance).log_prob(x)

    def exact_posterior(self, x, covariates):
        """p(z | x, c) = N(Sigma W^T Psi^-1 (x - B c - b), Sigma), Sigma^-1 = I + W^T Psi^-1 W."""
        scaled = self.loading / self.noise_scale().unsqueeze(-1) ** 2  # Psi^-1 W
        covariance = torch.linalg.inv(torch.eye(L) + self.loading.T @ scaled)
        residual = x - covariates @ self.effects.T - self.bias
        return residual @ scaled @ covariance, covariance


# -- 2. The amortized guide ---------------------------------------------------------------------
class FactorGuide(LocalParamsModule):
    """q(z | x, c): a network of (x, c) gives the mean and the standard deviation.

    A linear map is enough for this model, whose exact posterior mean is linear in (x, c)
    and whose posterior covariance does not depend on them; for a nonlinear decoder use an
    MLP here (e.g. ``pyrovae.networks.GaussianEncoder``).
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(D + C, 2 * L)

    def distribution(self, x, covariates):
        loc, raw_scale = self.net(torch.cat([x, covariates], -1)).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1)

    def forward(self, x, covariates):
        # Same plate name and size, same latent site name "z" as the model.
        with pyro.plate("data", covariates.shape[0]):
            return pyro.sample("z", self.distribution(x, covariates))


# -- 3. Simulated data from a known model ------------------------------------------------------
pyro.set_rng_seed(0)  # seeds torch, numpy and random: data, initial weights and draws
truth = CovariateFactorModel()
with torch.no_grad():
    truth.loading.copy_(torch.randn(D, L))
    truth.effects.copy_(torch.randn(D, C))
    truth.bias.copy_(torch.randn(D))
    truth.raw_noise.copy_(torch.rand(D) - 1.0)  # psi between about 0.3 and 0.7
covariates = torch.cat(
    [torch.randn(N_TRAIN + N_TEST, 1), torch.randint(0, 2, (N_TRAIN + N_TEST, 1))], 1
)
with torch.no_grad():
    data = truth(None, covariates)  # x=None: the model draws x ~ p(x | z, c)
x_train, x_test = data[:N_TRAIN], data[N_TRAIN:]
c_train, c_test = covariates[:N_TRAIN], covariates[N_TRAIN:]

# -- 4. Fit by SVI: a pyrovae objective, one torch optimizer ------------------------------------
model, guide = CovariateFactorModel(), FactorGuide()
# Any name of pyrovae.objectives.OBJECTIVES works here: "trace_elbo", "trace_meanfield_elbo",
# "iwae", "renyi", "stl", "dreg", ... objective(model, guide) is a torch.nn.Module whose
# forward pass returns minus the bound, summed over the data points it is given.
objective = make_objective("trace_meanfield_elbo", num_particles=1)  # analytic KL
loss_module = objective(model, guide)
optimizer = torch.optim.Adam(loss_module.parameters(), lr=0.03)
batch_size = 100
for epoch in range(1, 51):
    order = torch.randperm(N_TRAIN)
    total = 0.0
    for index in order.split(batch_size):
        optimizer.zero_grad()
        loss = loss_module(x_train[index], c_train[index]) / len(index)  # nats per point
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(index)
    if epoch % 10 == 0:
        print(f"epoch {epoch:3d}: train ELBO {-total / N_TRAIN:8.3f} nats per data point")
print(f"parameters in Pyro's global param store: {len(pyro.get_param_store())}")

# -- 5. Evaluate: importance-sampled bounds per data point --------------------------------------
# evaluate() traces the same model and guide, with K draws per data point. Extra arguments
# (here the covariates) are passed on to both; positional tensors are the per-datapoint data
# and are split into chunks with it (keyword arguments only when named in data_kwargs=).
# max_pairs fixes the blocks of data points (max_pairs // K each) whose draws are seeded from
# `seed` and the block's index, so the output does not depend on the machine's memory.
result = evaluate(
    model, guide, x_test, c_test, num_samples=2000, ks=(1, 10, 100), seed=0, max_pairs=50_000
)
print()
print(result.table())
print()

# -- 6. Check against the closed forms ---------------------------------------------------------
with torch.no_grad():
    exact = model.exact_log_marginal(x_test, c_test).double()
    post_mean, post_cov = model.exact_posterior(x_test, c_test)
    q = guide.distribution(x_test, c_test)
    exact_gap = gaussian_kl(q.mean, torch.diag_embed(q.variance), post_mean, post_cov).double()
    # The best any diagonal Gaussian can do: KL = (sum_l log Lambda_ll - log det Lambda) / 2,
    # Lambda = Sigma^-1 (docs: theory, the ELBO). The rest of the gap is the price of
    # amortization: one network for all data points instead of the best q for each.
    precision = torch.linalg.inv(post_cov)
    best_diagonal = 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))
    truth_log_lik = truth.exact_log_marginal(x_test, c_test).double()
estimate = torch.as_tensor(result.per_datapoint["log_px"])
error = estimate - exact


def mean_se(values):
    """Mean over the test points and its standard error, sd / sqrt(N): for per-point
    differences of two quantities on the same points, the paired standard error."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std() / len(values) ** 0.5)


print(f"exact log p(x|c) of the fitted model:   mean {exact.mean():9.4f} nats")
print(f"importance-sampled log p_hat (K=2000):  mean {estimate.mean():9.4f} nats")
print("  log p_hat - exact: mean {:.4f}, paired SE {:.4f}".format(*mean_se(error)))
standard_error = torch.as_tensor(result.per_datapoint["log_px_se"])
within = float((error.abs() <= 3 * standard_error).double().mean())
print(f"per data point, |log p_hat - log p| <= 3 reported SE for {within:.0%} of test points")
estimated_gap = torch.as_tensor(result.per_datapoint["gap"])
print(
    f"ELBO gap: estimated {estimated_gap.mean():.4f}, "
    f"exact KL(q(z|x,c) || p(z|x,c)) {exact_gap.mean():.4f} nats"
)
gap_error = mean_se(estimated_gap - exact_gap)
print("  estimated - exact: mean {:.4f}, paired SE {:.4f}".format(*gap_error))
print(
    f"  of which best diagonal Gaussian {best_diagonal:.4f} (approximation), "
    f"the rest {exact_gap.mean() - best_diagonal:.4f} (amortization)"
)

# -- 7. Has the fit converged? Compare with the data-generating model and the exact MLE --------
# The data-generating model is not the target of the fit: even the maximum-likelihood
# estimate (MLE) from 1000 training points is expected to score below it on new data. The
# MLE is found by maximizing the closed-form log p(x | c) of the training data (L-BFGS,
# started from the fit). For factor analysis the ELBO can reach the MLE's log-likelihood:
# rotating W so that W^T Psi^-1 W is diagonal leaves p(x | c) unchanged and makes the
# posterior a diagonal Gaussian with mean linear in (x, c), which the linear guide can
# represent exactly (gap 0). So what the fit lacks on the training points is the optimizer's
# shortfall, not a bias of the objective.
mle = CovariateFactorModel()
mle.load_state_dict(model.state_dict())
lbfgs = torch.optim.LBFGS(
    mle.parameters(), max_iter=1000, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
)


def closure():
    lbfgs.zero_grad()
    loss = -mle.exact_log_marginal(x_train, c_train).mean()
    loss.backward()
    return loss


lbfgs.step(closure)
with torch.no_grad():
    mle_log_lik = mle.exact_log_marginal(x_test, c_test).double()
    train_log_lik = {
        name: float(candidate.exact_log_marginal(x_train, c_train).mean())
        for name, candidate in (("fit", model), ("mle", mle), ("truth", truth))
    }
print()
print("exact log p(x|c), mean over the training / the test points:")
print(
    f"  data-generating model   {train_log_lik['truth']:8.4f} / {truth_log_lik.mean():8.4f}"
    f"   (unpaired SE of a test mean: {truth_log_lik.std() / N_TEST**0.5:.3f})"
)
print(f"  maximum likelihood      {train_log_lik['mle']:8.4f} / {mle_log_lik.mean():8.4f}")
print(f"  fitted by SVI           {train_log_lik['fit']:8.4f} / {exact.mean():8.4f}")
print("differences on the test points (paired):")
for label, difference in (
    ("truth - fitted", truth_log_lik - exact),
    ("truth - MLE   ", truth_log_lik - mle_log_lik),
    ("MLE - fitted  ", mle_log_lik - exact),
):
    print("  {}: {:.4f}, paired SE {:.4f}".format(label, *mean_se(difference)))
