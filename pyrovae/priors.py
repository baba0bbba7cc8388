"""Priors p(z) over the latent variable, each an ``nn.Module`` returning a distribution with
one event dimension (the latent dimension L).

* ``normal``: standard Normal N(0, I).
* ``learned-normal``: N(m, diag s^2) with learned m and s.
* ``mixture``: a mixture of C diagonal Gaussians with learned weights, means and scales.
* ``vamp``: the VampPrior (Tomczak & Welling, 2018), (1/C) sum_c q(z | u_c): the guide's
  posterior at C learned pseudo-inputs u_c.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.networks import positive_scale


class Prior(nn.Module):
    """Base class: ``forward(reference)`` gives p(z) on ``reference``'s device and dtype."""

    name: ClassVar[str]
    closed_form_kl: ClassVar[bool] = False
    """Whether KL(diagonal Gaussian guide || this prior) has a closed form."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim


class StandardNormalPrior(Prior):
    name = "normal"
    closed_form_kl = True

    def forward(self, reference: torch.Tensor) -> dist.TorchDistribution:
        zero = reference.new_zeros(())
        return dist.Normal(zero, zero + 1.0).expand([self.latent_dim]).to_event(1)


class LearnedNormalPrior(Prior):
    name = "learned-normal"
    closed_form_kl = True

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.full((latent_dim,), 0.5413))  # softplus -> ~1

    def forward(self, reference: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(self.loc, positive_scale(self.raw_scale)).to_event(1)


class MixturePrior(Prior):
    """Mixture of ``num_components`` diagonal Gaussians; means start spread out (N(0, I))."""

    name = "mixture"

    def __init__(self, latent_dim: int, num_components: int = 10):
        super().__init__(latent_dim)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim))
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))

    def forward(self, reference: torch.Tensor) -> dist.TorchDistribution:
        components = dist.Normal(self.locs, positive_scale(self.raw_scales)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(Prior):
    """(1/C) sum_c q(z | u_c) over learned pseudo-inputs u_c (initialised in [0, 1]).

    ``posterior`` maps inputs (C, D) to the guide's distribution with batch shape (C,); it is
    the guide's own network, held without registering it here (its parameters belong to the
    guide), so gradients reach it through the prior as in Tomczak & Welling (2018).
    """

    name = "vamp"

    def __init__(
        self, latent_dim: int, num_features: int, posterior: Callable, num_components: int = 50
    ):
        super().__init__(latent_dim)
        self.pseudo_inputs = nn.Parameter(torch.rand(num_components, num_features))
        object.__setattr__(self, "_posterior", posterior)  # not a submodule: no double count

    def forward(self, reference: torch.Tensor) -> dist.TorchDistribution:
        components = self._posterior(self.pseudo_inputs)
        mixing = dist.Categorical(logits=self.pseudo_inputs.new_zeros(self.pseudo_inputs.shape[0]))
        return dist.MixtureSameFamily(mixing, components)


PRIORS: dict[str, type[Prior]] = {
    cls.name: cls for cls in (StandardNormalPrior, LearnedNormalPrior, MixturePrior, VampPrior)
}
