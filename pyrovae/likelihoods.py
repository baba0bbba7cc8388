"""Observation models p(x|z): the decoder's output layer plus the distribution it parameterises.

Each likelihood is a :class:`torch.nn.Module` that maps the decoder trunk's hidden
activations to a Pyro distribution with ``event_dim == 1`` over the D features, and knows
its support so that data can be checked before training.
"""

from __future__ import annotations

from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.networks import positive_scale


class Likelihood(nn.Module):
    """Base class: ``forward(hidden)`` returns p(x|z) as a distribution with one event dim."""

    name: ClassVar[str]
    support: ClassVar[str]

    def __init__(self, in_features: int, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, hidden: torch.Tensor) -> torch.Tensor:
        """Expected observation E[x|z], shape ``hidden.shape[:-1] + (D,)``."""
        return self(hidden).mean

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries of ``x`` that the distribution cannot produce."""
        raise NotImplementedError

    def check_support(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if any entry of ``x`` lies outside this likelihood's support."""
        bad = self.out_of_support(x)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"data outside the support of the {self.name!r} likelihood ({self.support}): "
                f"{int(bad.sum())} entries, first at index {index} with value "
                f"{float(x[index])!r}. {self.support_hint()}"
            )

    def support_hint(self) -> str:
        return ""


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels with logits from a linear head (binary data)."""

    name = "bernoulli"
    support = "values in {0, 1}"

    def __init__(self, in_features: int, num_features: int):
        super().__init__(in_features, num_features)
        self.logits = nn.Linear(in_features, num_features)

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.logits(hidden), validate_args=False).to_event(1)

    def mean(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return (x != 0) & (x != 1)

    def support_hint(self) -> str:
        return (
            "Binarize grey-level data first (binarize='dynamic' or 'static' when fitting, "
            "--binarize on the command line) or choose a Normal likelihood."
        )


class NormalLikelihood(Likelihood):
    """Heteroscedastic Gaussian: mean mu_theta(z) and diagonal scale sigma_theta(z), two heads."""

    name = "normal"
    support = "finite real values"

    def __init__(self, in_features: int, num_features: int):
        super().__init__(in_features, num_features)
        self.loc = nn.Linear(in_features, num_features)
        self.raw_scale = nn.Linear(in_features, num_features)

    def scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return positive_scale(self.raw_scale(hidden))

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        loc = self.loc(hidden)
        return dist.Normal(loc, self.scale(hidden), validate_args=False).to_event(1)

    def mean(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.loc(hidden)

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(x)


class NormalPerFeatureLikelihood(NormalLikelihood):
    """Gaussian with mean mu_theta(z) and one learned scale per feature, shared over z."""

    name = "normal-per-feature"

    def __init__(self, in_features: int, num_features: int):
        Likelihood.__init__(self, in_features, num_features)
        self.loc = nn.Linear(in_features, num_features)
        self.raw_scale = nn.Parameter(torch.zeros(num_features))

    def scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return positive_scale(self.raw_scale).expand(hidden.shape[:-1] + (self.num_features,))


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (BernoulliLikelihood, NormalLikelihood, NormalPerFeatureLikelihood)
}


def make_likelihood(name: str, in_features: int, num_features: int) -> Likelihood:
    """Build a likelihood head by name; raises ``ValueError`` listing the valid names."""
    if name not in LIKELIHOODS:
        valid = ", ".join(sorted(LIKELIHOODS))
        raise ValueError(f"unknown likelihood {name!r}; valid names: {valid}")
    return LIKELIHOODS[name](in_features, num_features)
