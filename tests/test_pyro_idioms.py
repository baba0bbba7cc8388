"""Users' models written as Pyro's own tutorials and examples write them, each checked against
an exact answer (float64, fixed seeds, tolerances from Monte Carlo standard errors).

- the VAE tutorial's class (``pyro.module``, ``x.new_zeros``, ``x.reshape(-1, D)``,
  ``Bernoulli(validate_args=False)``), fitted by literal ``pyro.infer.SVI`` with bound methods;
- ProdLDA as in Pyro's topic-model tutorial (BatchNorm and dropout in encoder and decoder,
  ``softmax(dim=1)``, ``Multinomial`` with the largest document length, a ``"documents"``
  plate): code that cannot broadcast over particles, fitted by ``fit``;
- the semi-supervised VAE of Pyro's ``ss_vae_M2.py`` (``OneHotCategorical`` label, ``ys=None``
  for unlabelled data, the label sampled in a ``config_enumerate`` guide, TraceEnum_ELBO);
- the conditional VAE of Pyro's ``cvae`` example (``pyro.plate("data")`` without a size, the
  observed pixels picked by a boolean mask with ``.view(batch_size, -1)``);
- the Gaussian mixture tutorial's model (``config_enumerate``, ``Vindex``, ``pyro.param``
  globals, an empty guide).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import nn

from pyrovae.evaluation.importance import evaluate
from pyrovae.models.latent_variable import LatentVariableModel


def gauss_hermite(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and normalized weights of E[f(e)], e ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(count)
    return torch.from_numpy(nodes), torch.from_numpy(weights / weights.sum())


def assert_mean_within(differences, standard_errors, count: float = 4.0) -> None:
    """The mean difference over points is within ``count`` of its standard error."""
    differences = np.asarray(differences, dtype=np.float64)
    se = math.sqrt(float(np.sum(np.asarray(standard_errors) ** 2))) / len(differences)
    assert abs(differences.mean()) < count * se + 1e-9, (differences.mean(), se)


# -- the VAE tutorial ----------------------------------------------------------------------
PIXELS = 8


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial, with a 1-D latent and 8 pixels so that quadrature is exact."""

    def __init__(self, z_dim: int = 1, hidden_dim: int = 16):
        super().__init__()
        self.z_dim = z_dim
        self.decoder_hidden = nn.Linear(z_dim, hidden_dim)
        self.decoder_out = nn.Linear(hidden_dim, PIXELS)
        self.encoder_hidden = nn.Linear(PIXELS, hidden_dim)
        self.encoder_loc = nn.Linear(hidden_dim, z_dim)
        self.encoder_scale = nn.Linear(hidden_dim, z_dim)

    def decode(self, z):
        return torch.sigmoid(self.decoder_out(F.softplus(self.decoder_hidden(z))))

    def model(self, x):
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decode(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, PIXELS),
            )

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            hidden = F.softplus(self.encoder_hidden(x.reshape(-1, PIXELS)))
            z_loc = self.encoder_loc(hidden)
            z_scale = torch.exp(self.encoder_scale(hidden))
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def test_the_vae_tutorial_fitted_by_literal_svi_evaluates_to_the_quadrature(float64):
    torch.manual_seed(0)
    template = (torch.arange(PIXELS) < PIXELS // 2).double()
    flip = torch.rand(60, 1) < 0.5
    x = torch.bernoulli(torch.where(flip, template, 1 - template) * 0.8 + 0.1)
    vae = TutorialVAE()
    optimizer = pyro.optim.Adam({"lr": 1e-2})
    svi = pyro.infer.SVI(vae.model, vae.guide, optimizer, pyro.infer.Trace_ELBO())
    for _ in range(300):
        svi.step(x)
    result = evaluate(vae.model, vae.guide, x, num_samples=2000, ks=(1,), seed=0)
    nodes, weights = gauss_hermite(200)
    with torch.no_grad():
        likelihood = dist.Bernoulli(vae.decode(nodes[:, None])[:, None, :]).log_prob(x).sum(-1)
    exact = torch.logsumexp(likelihood + weights.log()[:, None], 0).numpy()
    log_px = result.per_datapoint["log_px"]
    assert_mean_within(log_px - exact, result.per_datapoint["log_px_se"])
    assert result.per_datapoint["elbo"].mean() < exact.mean()


# -- ProdLDA ---------------------------------------------------------------------------------
VOCABULARY, TOPICS, WIDTH = 6, 2, 16


class ProdLDAEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.fc1 = nn.Linear(VOCABULARY, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.fcmu = nn.Linear(WIDTH, TOPICS)
        self.fclv = nn.Linear(WIDTH, TOPICS)
        self.bnmu = nn.BatchNorm1d(TOPICS, affine=False)
        self.bnlv = nn.BatchNorm1d(TOPICS, affine=False)

    def forward(self, inputs):
        h = self.drop(F.softplus(self.fc2(F.softplus(self.fc1(inputs)))))
        logtheta_loc = self.bnmu(self.fcmu(h))
        logtheta_logvar = self.bnlv(self.fclv(h))
        return logtheta_loc, (0.5 * logtheta_logvar).exp()


class ProdLDADecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Linear(TOPICS, VOCABULARY, bias=False)
        self.bn = nn.BatchNorm1d(VOCABULARY, affine=False)
        self.drop = nn.Dropout(0.2)

    def forward(self, inputs):
        return F.softmax(self.bn(self.beta(self.drop(inputs))), dim=1)


class ProdLDA(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ProdLDAEncoder()
        self.decoder = ProdLDADecoder()

    def model(self, docs):
        pyro.module("decoder", self.decoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta_loc = docs.new_zeros((docs.shape[0], TOPICS))
            logtheta_scale = docs.new_ones((docs.shape[0], TOPICS))
            logtheta = pyro.sample(
                "logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1)
            )
            theta = F.softmax(logtheta, -1)
            count_param = self.decoder(theta)
            total_count = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total_count, count_param), obs=docs)

    def guide(self, docs):
        pyro.module("encoder", self.encoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta_loc, logtheta_scale = self.encoder(docs)
            pyro.sample("logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1))


def documents(count: int = 40) -> torch.Tensor:
    """Bags of 5-11 words from mixtures of two topics over six words."""
    torch.manual_seed(0)
    topics = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [0.02, 0.03, 0.05, 0.1, 0.3, 0.5]])
    share = torch.rand(count, 1)
    lengths = torch.randint(5, 12, (count,)).tolist()
    probs = share * topics[0] + (1 - share) * topics[1]
    return torch.stack(
        [dist.Multinomial(n, p).sample() for n, p in zip(lengths, probs, strict=True)]
    )


def prodlda_exact(lda: ProdLDA, docs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """In eval mode: exact log p(x) per document (softmax(l) depends on l1 - l2 ~ N(0, 2)
    only: 1-D quadrature), and the mean and variance of log w = log p(x, l) - log q(l | x)
    under the guide (2-D quadrature)."""
    lda.eval()
    with torch.no_grad():
        nodes, weights = gauss_hermite(200)
        difference = nodes * math.sqrt(2.0)
        theta = torch.stack([torch.sigmoid(difference), torch.sigmoid(-difference)], -1)
        likelihood = multinomial_log_prob(lda.decoder(theta)[:, None, :], docs)
        log_px = torch.logsumexp(likelihood + weights.log()[:, None], 0)
        nodes, weights = gauss_hermite(60)
        grid = torch.cartesian_prod(nodes, nodes)  # (Q, 2) standard normal draws
        grid_weights = torch.outer(weights, weights).reshape(-1, 1)
        loc, scale = lda.encoder(docs)
        guide = dist.Normal(loc, scale).to_event(1)
        logtheta = loc + scale * grid[:, None, :]
        probs = lda.decoder(F.softmax(logtheta, -1).reshape(-1, TOPICS))
        log_w = (
            dist.Normal(0.0, 1.0).log_prob(logtheta).sum(-1)
            + multinomial_log_prob(probs.reshape(len(grid), -1, VOCABULARY), docs)
            - guide.log_prob(logtheta)
        )
        mean = (grid_weights * log_w).sum(0)
        variance = (grid_weights * (log_w - mean) ** 2).sum(0)
    lda.train()
    return log_px, mean, variance


def multinomial_log_prob(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    total = counts.sum(-1)
    return (
        torch.lgamma(total + 1) - torch.lgamma(counts + 1).sum(-1) + (counts * probs.log()).sum(-1)
    )


def test_prodlda_as_the_tutorial_writes_it_is_exact_and_flags_its_failed_points(float64):
    """BatchNorm makes the program fail with a particle dimension, so every entry point draws
    one particle per pass; the ELBO per document equals its quadrature value, IS log p(x)
    equals the quadrature where k-hat < 0.5, and every point IS misses by more than 5 SE is
    flagged by k-hat > 0.5 (the BatchNorm'd guide is a poor proposal for a few documents)."""
    docs = documents()
    lda = ProdLDA()
    fitted = LatentVariableModel(lda.model, lda.guide, data_plate="documents")
    fitted.fit((docs,), epochs=150, batch_size=20, learning_rate=1e-2, progress=False)
    samples = 1000
    with pytest.warns(UserWarning, match="one per pass"):
        result = fitted.evaluate(docs, num_samples=samples, ks=(1,), seed=0)
    exact_log_px, exact_elbo, log_w_variance = prodlda_exact(lda, docs)
    per_point = result.per_datapoint
    elbo_se = torch.sqrt(log_w_variance / samples).numpy()
    assert_mean_within(per_point["elbo"] - exact_elbo.numpy(), elbo_se)
    error = per_point["log_px"] - exact_log_px.numpy()
    reliable = per_point["khat"] < 0.5
    assert reliable.sum() > len(docs) // 2
    assert_mean_within(error[reliable], per_point["log_px_se"][reliable])
    missed = np.abs(error) > 5 * per_point["log_px_se"]
    assert (per_point["khat"][missed] > 0.5).all(), per_point["khat"][missed]


# -- Pyro's semi-supervised VAE (ss_vae_M2.py) ---------------------------------------------
OFFSETS = torch.tensor([[-0.8, 0.0], [0.0, 0.8], [0.8, -0.4]], dtype=torch.float64)
PRIOR = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
NOISE = 0.5


class SSVAE(nn.Module):
    """The example's structure, linear-Gaussian: y ~ OneHotCategorical(pi), z ~ N(0, I),
    x ~ N(z + y @ offsets, s^2 I); the guide samples y from q(y | x) when ``ys is None``."""

    def __init__(self):
        super().__init__()
        self.encoder_y = nn.Linear(2, 3)
        self.encoder_z = nn.Linear(5, 4)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]):
            ys = pyro.sample("y", dist.OneHotCategorical(PRIOR), obs=ys)
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(zs + ys @ OFFSETS, NOISE).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                alpha = torch.softmax(self.encoder_y(xs), -1)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            out = self.encoder_z(torch.cat([xs.expand(*ys.shape[:-1], 2), ys], -1))
            scale = F.softplus(out[..., 2:])
            pyro.sample("z", dist.Normal(out[..., :2], scale).to_event(1))


def test_pyros_ss_vae_idiom_trains_with_traceenum_and_its_bounds_are_exact(float64):
    torch.manual_seed(0)
    labels = torch.multinomial(PRIOR, 40, replacement=True)
    x = torch.randn(40, 2) * math.sqrt(1 + NOISE**2) + OFFSETS[labels]
    joint = PRIOR.log() + dist.Normal(OFFSETS, math.sqrt(1 + NOISE**2)).log_prob(x[:, None]).sum(-1)
    vae = SSVAE()
    guide = config_enumerate(vae.guide, "parallel", expand=True)
    fitted = LatentVariableModel(vae.model, guide)
    fitted.fit(
        (x,),
        epochs=300,
        batch_size=40,
        learning_rate=3e-2,
        objective="traceenum_elbo",
        progress=False,
    )
    unlabelled = fitted.evaluate(x, num_samples=2000, ks=(1,), seed=0).per_datapoint
    error = unlabelled["log_px"] - torch.logsumexp(joint, -1).numpy()
    assert_mean_within(error, unlabelled["log_px_se"])
    onehot = F.one_hot(labels, 3).double()
    labelled = fitted.evaluate(x, onehot, num_samples=2000, ks=(1,), seed=0).per_datapoint
    assert_mean_within(
        labelled["log_px"] - joint[torch.arange(40), labels].numpy(), labelled["log_px_se"]
    )


# -- Pyro's conditional VAE (examples/cvae) ---------------------------------------------------
class CVAE(nn.Module):
    """The example's structure, linear-Gaussian: the input shows features 0-1 and hides 2-3
    (-1); z | x ~ N(A x_shown, 1); the hidden features y ~ N(W z + b, s^2) at the hidden
    positions, picked with the example's boolean mask and ``.view(batch_size, -1)``."""

    def __init__(self):
        super().__init__()
        self.prior_net = nn.Linear(4, 1)
        self.generation_net = nn.Linear(1, 4)
        self.recognition_net = nn.Linear(8, 2)

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc = self.prior_net(torch.where(xs == -1, 0.0, xs))
            zs = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            loc = self.generation_net(zs)
            mask_loc = loc[(xs == -1).view(-1, 4)].view(batch_size, -1)
            mask_ys = ys[xs == -1].view(batch_size, -1)
            pyro.sample("y", dist.Normal(mask_loc, NOISE).to_event(1), obs=mask_ys)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            out = self.recognition_net(torch.cat([xs, ys], -1))
            pyro.sample("z", dist.Normal(out[..., :1], F.softplus(out[..., 1:])).to_event(1))


def cvae_exact(cvae: CVAE, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """log p(y_hidden | x): y_hidden ~ N(W_h A x + b_h, W_h W_h^T + s^2 I)."""
    with torch.no_grad():
        weight = cvae.generation_net.weight[2:]  # (2, 1)
        prior_loc = cvae.prior_net(torch.where(xs == -1, 0.0, xs))
        mean = prior_loc @ weight.T + cvae.generation_net.bias[2:]
        covariance = weight @ weight.T + NOISE**2 * torch.eye(2)
        return dist.MultivariateNormal(mean, covariance).log_prob(ys[:, 2:])


def test_pyros_cvae_idiom_with_an_unsized_plate_and_mask_indexing_is_exact(float64):
    torch.manual_seed(1)
    ys = torch.randn(50, 1) * torch.tensor([1.0, -0.5, 0.8, 0.3]) + 0.3 * torch.randn(50, 4)
    xs = torch.cat([ys[:, :2], torch.full((50, 2), -1.0)], -1)
    cvae = CVAE()
    fitted = LatentVariableModel(cvae.model, cvae.guide)
    fitted.fit((xs, ys), epochs=300, batch_size=50, learning_rate=3e-2, progress=False)
    with pytest.warns(UserWarning, match="one per pass"):
        result = fitted.evaluate(xs, ys, num_samples=1000, ks=(1,), seed=0).per_datapoint
    exact = cvae_exact(cvae, xs, ys).numpy()
    assert_mean_within(result["log_px"] - exact, result["log_px_se"])
    assert result["elbo"].mean() < exact.mean()


# -- the Gaussian mixture tutorial ------------------------------------------------------------
@config_enumerate
def mixture(data):
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    scale = pyro.param("scale", torch.tensor(1.5), constraint=dist.constraints.positive)
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(Vindex(locs)[assignment], scale), obs=data)


def empty_guide(data):
    pass


def test_the_mixture_tutorials_model_fits_by_maximum_likelihood_and_evaluates_exactly(float64):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(30) - 2, torch.randn(30) + 2])
    fitted = LatentVariableModel(mixture, empty_guide)
    fitted.fit((x,), epochs=200, batch_size=60, learning_rate=5e-2, progress=False)
    weights, locs, scale = (fitted.param(n).detach() for n in ("weights", "locs", "scale"))
    assert locs[0] < -1.5 and locs[1] > 1.5  # moved from the initial -1, 1 towards the data
    result = fitted.evaluate(x, num_samples=10, ks=(1,), seed=0).per_datapoint
    exact = torch.logsumexp(weights.log() + dist.Normal(locs, scale).log_prob(x[:, None]), -1)
    np.testing.assert_allclose(result["log_px"], exact.numpy(), rtol=1e-12)
