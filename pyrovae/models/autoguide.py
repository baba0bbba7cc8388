"""An amortized guide for the local latent variables of any Pyro model, built from its trace.

Given a model with local latent sites inside a data plate (factor analysis with covariates,
Poisson matrix factorisation, ...), :class:`AmortizedGuide` runs the model once on example
data, reads each latent site's event shape and support, and builds one shared encoder
network with a head per site: q(z_s | x) = T_s(Normal(mu_s(x), diag sigma_s(x)^2)), where
T_s = ``biject_to(support)`` maps the reals onto the site's support (identity for reals,
exp for positive sites, stick-breaking for simplices, ...). The result is an ordinary Pyro
guide, trained and evaluated by :class:`pyrovae.models.latent_variable.LatentVariableModel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import biject_to

from pyrovae.models.base import LocalParamsModule
from pyrovae.networks import MLP, positive_scale


@dataclass(frozen=True)
class LatentSite:
    """What the guide needs to know about one latent site of the model."""

    name: str
    event_shape: torch.Size
    unconstrained_shape: torch.Size
    support: object

    @property
    def width(self) -> int:
        return math.prod(self.unconstrained_shape)


def first_tensor(*args, **kwargs) -> torch.Tensor:
    """Default encoder input: the first tensor argument, one flattened row per data point."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.reshape(value.shape[0], -1)
    raise ValueError("no tensor argument to encode; pass encoder_input=")


def latent_sites(model: Callable, args: tuple, kwargs: dict, data_plate: str) -> list[LatentSite]:
    """The model's latent sites, in order, each checked to be local to the data plate."""
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        with pyro.get_param_store().scope():  # a function's pyro.param calls leave no trace
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    sites = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name == data_plate:
            continue
        if type(site["fn"]).__name__ == "_Subsample":
            continue
        if not any(frame.name == data_plate for frame in site["cond_indep_stack"]):
            raise ValueError(
                f"latent site {name!r} is outside the plate {data_plate!r}: an amortized guide "
                "covers local latent variables only (one per data point)"
            )
        support = site["fn"].support
        if support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete; amortized Gaussian guides need "
                "continuous latent variables (enumerate or marginalise it)"
            )
        event_shape = site["fn"].event_shape
        unconstrained = biject_to(support).inverse_shape(event_shape)
        sites.append(LatentSite(name, event_shape, unconstrained, support))
    if not sites:
        raise ValueError("the model has no latent sites to guide")
    return sites


def _is_identity(transform) -> bool:
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return transform == dist.transforms.identity_transform


class AmortizedGuide(LocalParamsModule):
    """Amortized mean-field guide for ``model``'s local latent sites.

    Parameters
    ----------
    model : callable
        The Pyro model.
    *example_args, **example_kwargs
        Arguments of one model call (a few data points suffice) to read its latent sites.
    data_plate : str
        Name of the model's plate over data points.
    hidden_sizes : sequence of int
        Hidden widths of the shared encoder.
    activation : str
        Encoder activation.
    encoder_input : callable, optional
        Maps the model's arguments to the encoder's input, one row per data point; by
        default the first tensor argument, flattened.
    """

    def __init__(
        self,
        model: Callable,
        *example_args,
        data_plate: str = "data",
        hidden_sizes: Sequence[int] = (128,),
        activation: str = "relu",
        encoder_input: Callable[..., torch.Tensor] = first_tensor,
        **example_kwargs,
    ):
        super().__init__()
        self.sites = latent_sites(model, example_args, example_kwargs, data_plate)
        self.data_plate = data_plate
        object.__setattr__(self, "encoder_input", encoder_input)
        width = encoder_input(*example_args, **example_kwargs).shape[-1]
        self.trunk = MLP(width, hidden_sizes, activation)
        features = self.trunk.out_features
        self.locs = nn.ModuleDict({s.name: nn.Linear(features, s.width) for s in self.sites})
        self.raw_scales = nn.ModuleDict({s.name: nn.Linear(features, s.width) for s in self.sites})

    def distribution(self, site: LatentSite, hidden: torch.Tensor) -> dist.TorchDistribution:
        """q(z_site | x) for encoder features ``hidden`` of shape (N, H)."""
        shape = hidden.shape[:-1] + site.unconstrained_shape
        loc = self.locs[site.name](hidden).reshape(shape)
        scale = positive_scale(self.raw_scales[site.name](hidden)).reshape(shape)
        base = dist.Normal(loc, scale, validate_args=False).to_event(len(site.unconstrained_shape))
        transform = biject_to(site.support)
        if _is_identity(transform):
            return base
        return dist.TransformedDistribution(base, [transform])

    def forward(self, *args, **kwargs):
        hidden = self.trunk(self.encoder_input(*args, **kwargs))
        with pyro.plate(self.data_plate, hidden.shape[0]):
            for site in self.sites:
                pyro.sample(site.name, self.distribution(site, hidden))
