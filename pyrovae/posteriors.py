"""Guide families: amortized posteriors q(z|x) built on an encoder's hidden features.

Each family is an ``nn.Module`` owning the encoder trunk (an MLP or a convolutional network)
and the heads on its features: ``forward(x)`` returns the parameters of q(z|x) and
``distribution(x)`` the distribution (one event dimension, L).

* ``diagonal``: N(mu_phi(x), diag sigma_phi(x)^2).
* ``full``: N(mu_phi(x), Sigma_phi(x)) with Sigma = L L^T from a Cholesky factor whose
  diagonal is positive (softplus), the lecture notes' general Gaussian posterior.
* ``low-rank``: N(mu, F F^T + diag d) with a rank-r factor F.
* ``flow``: a diagonal Gaussian pushed through ``num_flows`` conditional affine
  autoregressive (inverse autoregressive) transforms from ``pyro.distributions.transforms``,
  conditioned on the encoder's features (Kingma et al., 2016).
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import pyro.distributions.transforms as transforms
import torch
from torch import nn

from pyrovae import divergences  # noqa: F401  (registers the closed-form KLs used here)
from pyrovae.networks import positive_scale


class Posterior(nn.Module):
    """Base class: ``trunk`` maps inputs to features of width ``trunk.out_features``."""

    name: ClassVar[str]
    closed_form_kl: ClassVar[bool] = True
    """Whether KL(q || standard Normal prior) has a closed form."""

    def __init__(self, trunk: nn.Module, latent_dim: int):
        super().__init__()
        self.trunk = trunk
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor):
        return self.parameters_from(self.trunk(x))

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        return self.distribution_from(self.trunk(x))


class DiagonalGaussian(Posterior):
    name = "diagonal"

    def __init__(self, trunk: nn.Module, latent_dim: int):
        super().__init__(trunk, latent_dim)
        self.loc = nn.Linear(trunk.out_features, latent_dim)
        self.raw_scale = nn.Linear(trunk.out_features, latent_dim)

    def parameters_from(self, hidden):
        return self.loc(hidden), positive_scale(self.raw_scale(hidden))

    def distribution_from(self, hidden):
        loc, scale = self.parameters_from(hidden)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)


class FullCovarianceGaussian(Posterior):
    name = "full"

    def __init__(self, trunk: nn.Module, latent_dim: int):
        super().__init__(trunk, latent_dim)
        in_features = trunk.out_features
        self.loc = nn.Linear(in_features, latent_dim)
        self.tril = nn.Linear(in_features, latent_dim * (latent_dim + 1) // 2)
        self.register_buffer("rows", torch.tril_indices(latent_dim, latent_dim)[0], False)
        self.register_buffer("cols", torch.tril_indices(latent_dim, latent_dim)[1], False)

    def parameters_from(self, hidden):
        entries = self.tril(hidden)
        size = self.latent_dim
        scale_tril = entries.new_zeros(entries.shape[:-1] + (size, size))
        scale_tril[..., self.rows, self.cols] = entries
        diagonal = positive_scale(scale_tril.diagonal(dim1=-2, dim2=-1))
        scale_tril = scale_tril.tril(-1) + torch.diag_embed(diagonal)
        return self.loc(hidden), scale_tril

    def distribution_from(self, hidden):
        loc, scale_tril = self.parameters_from(hidden)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)


class LowRankGaussian(Posterior):
    name = "low-rank"

    def __init__(self, trunk: nn.Module, latent_dim: int, rank: int = 2):
        super().__init__(trunk, latent_dim)
        in_features = trunk.out_features
        self.rank = rank
        self.loc = nn.Linear(in_features, latent_dim)
        self.factor = nn.Linear(in_features, latent_dim * rank)
        self.raw_diag = nn.Linear(in_features, latent_dim)

    def parameters_from(self, hidden):
        factor = self.factor(hidden).reshape(hidden.shape[:-1] + (self.latent_dim, self.rank))
        return self.loc(hidden), factor, positive_scale(self.raw_diag(hidden)).square()

    def distribution_from(self, hidden):
        loc, factor, diagonal = self.parameters_from(hidden)
        return dist.LowRankMultivariateNormal(loc, factor, diagonal, validate_args=False)


class FlowPosterior(Posterior):
    name = "flow"
    closed_form_kl = False

    def __init__(self, trunk: nn.Module, latent_dim: int, num_flows: int = 2):
        super().__init__(trunk, latent_dim)
        in_features = trunk.out_features
        self.loc = nn.Linear(in_features, latent_dim)
        self.raw_scale = nn.Linear(in_features, latent_dim)
        self.flows = nn.ModuleList(
            transforms.conditional_affine_autoregressive(
                latent_dim, in_features, hidden_dims=[2 * latent_dim + 8]
            )
            for _ in range(num_flows)
        )

    def parameters_from(self, hidden):
        """Parameters of the base Gaussian (before the flows)."""
        return self.loc(hidden), positive_scale(self.raw_scale(hidden))

    def distribution_from(self, hidden):
        loc, scale = self.parameters_from(hidden)
        base = dist.Normal(loc, scale, validate_args=False).to_event(1)
        conditioned = [flow.condition(hidden) for flow in self.flows]
        return dist.TransformedDistribution(base, conditioned)


def posterior_moments(posterior, num_draws: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of a distribution over z; Monte Carlo over ``num_draws``
    draws when they have no closed form (flows)."""
    try:
        return posterior.mean, posterior.stddev
    except NotImplementedError:
        draws = posterior.sample((num_draws,))
        return draws.mean(0), draws.std(0)


POSTERIORS: dict[str, type[Posterior]] = {
    cls.name: cls
    for cls in (DiagonalGaussian, FullCovarianceGaussian, LowRankGaussian, FlowPosterior)
}
