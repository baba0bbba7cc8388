"""Neural networks used by models and guides: a configurable MLP and the Gaussian encoder.

Scales are parameterised stably: ``softplus(raw) + min_scale``, so they are positive,
differentiable everywhere and never collapse to zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}

MIN_SCALE = 1e-4
"""Smallest standard deviation any scale head can produce (in data or latent units)."""


def positive_scale(raw: torch.Tensor, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """Map an unconstrained tensor to a strictly positive scale: ``softplus(raw) + min_scale``."""
    return F.softplus(raw) + min_scale


def activation_module(name: str) -> nn.Module:
    """Return a fresh activation module by name; raises ``ValueError`` listing valid names."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; valid names: {valid}") from None


class MLP(nn.Sequential):
    """Fully connected network ``in -> hidden[0] -> ... -> hidden[-1]`` with an activation after
    every layer.

    Parameters
    ----------
    in_features : int
        Input width.
    hidden_sizes : sequence of int
        Widths of the hidden layers; may be empty (then the MLP is the identity).
    activation : str
        Name in :data:`ACTIVATIONS`.
    """

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], activation: str = "relu"):
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), activation_module(activation)]
            width = size
        super().__init__(*layers)
        self.out_features = width


class GaussianEncoder(nn.Module):
    """Amortized encoder ``x -> (mu_phi(x), sigma_phi(x))`` of a diagonal Gaussian q(z|x).

    Parameters
    ----------
    in_features : int
        Number of observed features D.
    hidden_sizes : sequence of int
        Hidden widths of the shared trunk.
    latent_dim : int
        Dimension of z.
    activation : str
        Activation of the trunk.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        latent_dim: int,
        activation: str = "relu",
    ):
        super().__init__()
        self.trunk = MLP(in_features, hidden_sizes, activation)
        self.loc = nn.Linear(self.trunk.out_features, latent_dim)
        self.raw_scale = nn.Linear(self.trunk.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return posterior mean and standard deviation, each of shape ``x.shape[:-1] + (L,)``."""
        hidden = self.trunk(x)
        return self.loc(hidden), positive_scale(self.raw_scale(hidden))
