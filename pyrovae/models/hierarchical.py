"""Two stochastic layers (Burda et al., 2016): p(z2) p(z1 | z2) p(x | z1) with the guide
q(z1 | x) q(z2 | z1), sites ``"z1"`` and ``"z2"`` in the plate ``"data"``.

The same importance-sampled estimators evaluate it: both latent sites are local to the data
plate, so the traced log weights are per data point.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyrovae.config import VAEConfig
from pyrovae.likelihoods import make_likelihood
from pyrovae.models.base import DATA_PLATE, LocalParamsModule
from pyrovae.networks import MLP
from pyrovae.posteriors import DiagonalGaussian
from pyrovae.priors import StandardNormalPrior


class TwoLayerModel(LocalParamsModule):
    """z2 ~ N(0, I); z1 | z2 ~ N(mu(z2), diag sigma(z2)^2); x | z1 ~ likelihood(decoder(z1))."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.top_prior = StandardNormalPrior(config.top_latent_dim)
        top_trunk = MLP(config.top_latent_dim, config.top_hidden_sizes, config.activation)
        self.conditional_prior = DiagonalGaussian(top_trunk, config.latent_dim)
        self.decoder = MLP(
            config.latent_dim, tuple(reversed(config.hidden_sizes)), config.activation
        )
        self.likelihood = make_likelihood(
            config.likelihood,
            self.decoder.out_features,
            config.num_features,
            head=self.decoder.make_head,
        )

    def prior(self, reference: torch.Tensor) -> dist.TorchDistribution:
        """p(z2), the top layer's standard Normal."""
        return self.top_prior(reference)

    def generate(self, num_samples: int, condition=None):
        z2 = self.prior(next(self.parameters())).sample((num_samples,))
        z1 = self.conditional_prior.distribution(z2).sample()
        hidden = self.decoder(z1)
        return self.likelihood.mean(hidden), self.likelihood(hidden).sample()

    def decode(self, z1: torch.Tensor, condition=None) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z1))

    def forward(self, x=None, condition=None, num_samples: int | None = None):
        reference = x if x is not None else next(self.parameters())
        size = x.shape[0] if x is not None else num_samples
        with pyro.plate(DATA_PLATE, size):
            z2 = pyro.sample("z2", self.prior(reference))
            z1 = pyro.sample("z1", self.conditional_prior.distribution(z2))
            return pyro.sample("x", self.likelihood(self.decoder(z1)), obs=x)


class TwoLayerGuide(LocalParamsModule):
    """q(z1 | x) q(z2 | z1), both diagonal Gaussians; ``encoder`` is q(z1 | x)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.encoder = DiagonalGaussian(
            MLP(config.num_features, config.hidden_sizes, config.activation), config.latent_dim
        )
        self.top_encoder = DiagonalGaussian(
            MLP(config.latent_dim, config.top_hidden_sizes, config.activation),
            config.top_latent_dim,
        )

    def posterior(self, x: torch.Tensor, condition=None) -> dist.TorchDistribution:
        """q(z1 | x), the bottom layer's posterior."""
        return self.encoder.distribution(x)

    def forward(self, x, condition=None, num_samples: int | None = None):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z1 = pyro.sample("z1", self.posterior(x))
            pyro.sample("z2", self.top_encoder.distribution(z1))
