"""An amortized guide for the local latent variables of any Pyro model, built from its trace.

Given a model with local latent sites inside a data plate (factor analysis with covariates,
Poisson matrix factorisation, a deep Markov model over padded sequences, ...),
:class:`AmortizedGuide` runs the model once on example data and reads, for each latent site,
what the estimators need the guide to match (see :mod:`pyrovae.evaluation.structure`):

* its event shape and support: q(z_s | x) = T_s(Normal(mu_s(x), diag sigma_s(x)^2)), where
  T_s = ``biject_to(support)`` maps the reals onto the support (identity for reals, exp for
  positive sites, stick-breaking for simplices, ...);
* its plates: the data plate at whatever ``dim`` the model gives it, and plates nested inside
  it (time steps, words, features), with one output per element of each -- the guide's
  site has exactly the model's batch shape;
* its mask and scale (``poutine.mask``, ``.mask()``, ``obs_mask`` imputation sites,
  ``poutine.scale`` weights): where the model masks or scales a latent site, the guide reads
  the mask and scale of the current call by running the model (its sample sites hidden, on
  private random streams) and applies the same ones, so that log q and log p cover the same
  entries with the same weights. This costs one extra model pass per guide call, only for
  models that mask or scale latent sites or nest them in inner plates (whose sizes are then
  checked against the example's).

One shared encoder network gives every site's head its features. The result is an ordinary
Pyro guide, trained and evaluated by
:class:`pyrovae.models.latent_variable.LatentVariableModel` or by Pyro's own ``SVI``.
Discrete latent sites get no head: the estimators sum them out exactly by enumerating them
in the model (one variable per data point; partially observed ones through ``obs_mask``).
Global latent sites are refused, naming the site.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import biject_to

from pyrovae.evaluation.structure import (
    check_enumerable,
    check_model_sites,
    private_randomness,
)
from pyrovae.models.base import LocalParamsModule
from pyrovae.networks import MLP, positive_scale


@dataclass(frozen=True)
class LatentSite:
    """What the guide needs to know about one latent site of the model.

    ``batch_shape`` is the model site's batch shape on the example data, whose
    ``data_axis`` holds the data points; ``inner_plates`` are the plates other than the data
    plate around it, as ``(name, size, dim)``; ``reads_model`` tells whether the model masks
    or scales the site (the guide then reads the mask and scale of each call)."""

    name: str
    event_shape: torch.Size
    unconstrained_shape: torch.Size
    support: object
    batch_shape: torch.Size = torch.Size()
    data_axis: int = 0
    inner_plates: tuple = ()
    reads_model: bool = False

    @property
    def other_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes besides the data axis, in order."""
        return tuple(s for i, s in enumerate(self.batch_shape) if i != self.data_axis)

    @property
    def width(self) -> int:
        """Outputs of the site's heads per data point."""
        return math.prod(self.unconstrained_shape) * math.prod(self.other_batch_sizes)


def first_tensor(*args, **kwargs) -> torch.Tensor:
    """Default encoder input: the first tensor argument, one flattened row per data point,
    as a floating tensor (integer and boolean inputs converted)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            rows = value.reshape(value.shape[0], -1)
            return rows if rows.is_floating_point() else rows.to(torch.get_default_dtype())
    raise ValueError("no tensor argument to encode; pass encoder_input=")


def latent_sites(model: Callable, args: tuple, kwargs: dict, data_plate: str) -> list[LatentSite]:
    """The model's latent sites, in order, each checked to be local, continuous and in plates
    the guide can follow (see :func:`pyrovae.evaluation.structure.check_model_sites`)."""
    with private_randomness(args, kwargs), poutine.block(), torch.no_grad():
        with pyro.get_param_store().scope():  # a function's pyro.param calls leave no trace
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    sites, latent = [], 0
    for structure in check_model_sites(trace, data_plate):
        latent += not structure.observed
        if structure.discrete:  # summed out by enumeration in the model: no head
            check_enumerable(structure)
        if structure.observed or structure.discrete:
            continue
        for name in structure.inner_plates:
            if structure.subsampled.get(name):
                raise ValueError(
                    f"latent site {structure.name!r} is inside the subsampled plate {name!r}: "
                    "an amortized guide gives one output per plate element and cannot follow "
                    "a subsample that changes from call to call; do not subsample that plate"
                )
        batch = structure.batch_shape
        sites.append(
            LatentSite(
                name=structure.name,
                event_shape=structure.event_shape,
                unconstrained_shape=biject_to(structure.support).inverse_shape(
                    structure.event_shape
                ),
                support=structure.support,
                batch_shape=batch,
                data_axis=len(batch) + structure.data_dim,
                inner_plates=tuple(
                    (name, size, dim) for name, (dim, size) in structure.inner_plates.items()
                ),
                reads_model=structure.mask is not None or structure.scaled,
            )
        )
    if not latent:
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
        Name of the model's plate over data points (at any ``dim``).
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
        self.data_dim = _data_dim(self.sites[0]) if self.sites else -1
        object.__setattr__(self, "encoder_input", encoder_input)
        # The model is read on each call where it masks or scales a latent site, or nests
        # one in an inner plate (whose size this call must share with the example's).
        reads = any(s.reads_model or s.inner_plates for s in self.sites)
        object.__setattr__(self, "model", model if reads else None)
        width = encoder_input(*example_args, **example_kwargs).shape[-1]
        self.trunk = MLP(width, hidden_sizes, activation)
        features = self.trunk.out_features
        self.locs = nn.ModuleDict({s.name: nn.Linear(features, s.width) for s in self.sites})
        self.raw_scales = nn.ModuleDict({s.name: nn.Linear(features, s.width) for s in self.sites})

    def distribution(self, site: LatentSite, hidden: torch.Tensor) -> dist.TorchDistribution:
        """q(z_site | x) for encoder features ``hidden`` of shape (N, H): batch shape the
        model site's (N at its data axis), event shape the site's."""
        loc = self._arrange(site, self.locs[site.name](hidden))
        scale = self._arrange(site, positive_scale(self.raw_scales[site.name](hidden)))
        base = dist.Normal(loc, scale, validate_args=False).to_event(len(site.unconstrained_shape))
        transform = biject_to(site.support)
        if _is_identity(transform):
            return base
        return dist.TransformedDistribution(base, [transform])

    @staticmethod
    def _arrange(site: LatentSite, outputs: torch.Tensor) -> torch.Tensor:
        """(N, width) head outputs as (batch shape with N at the data axis, event shape)."""
        shape = (outputs.shape[0], *site.other_batch_sizes, *site.unconstrained_shape)
        return outputs.reshape(shape).movedim(0, site.data_axis)

    def forward(self, *args, **kwargs):
        hidden = self.trunk(self.encoder_input(*args, **kwargs))
        read = self._model_masks_and_scales(args, kwargs) if self.model is not None else {}
        with pyro.plate(self.data_plate, hidden.shape[0], dim=self.data_dim):
            for site in self.sites:
                self._check_inner_sizes(site, read.get(site.name))
                with ExitStack() as stack:
                    for name, size, dim in site.inner_plates:
                        stack.enter_context(pyro.plate(name, size, dim=dim))
                    mask, scale = read.get(site.name, (None, 1.0))[:2]
                    if mask is not None:
                        stack.enter_context(poutine.mask(mask=mask))
                    if not (isinstance(scale, float) and scale == 1.0):
                        stack.enter_context(poutine.scale(scale=scale))
                    pyro.sample(site.name, self.distribution(site, hidden))

    def _model_masks_and_scales(self, args: tuple, kwargs: dict) -> dict:
        """{site: (mask, scale, inner plate sizes)} of the model's latent sites on this call,
        read by running the model with its sample and param sites hidden, on private random
        streams and a private parameter store (its param statements touch no real one)."""
        private_store = pyro.get_param_store().scope()
        global_params = pyro.settings.context(module_local_params=False)
        with private_randomness(args, kwargs), torch.no_grad(), global_params, private_store:
            with poutine.block(hide_types=["sample", "observe", "param"]):
                trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        read = {}
        for site in self.sites:
            node = trace.nodes[site.name]
            sizes = {f.name: f.size for f in node["cond_indep_stack"]}
            read[site.name] = (node["mask"], node["scale"], sizes)
        return read

    def _check_inner_sizes(self, site: LatentSite, read) -> None:
        if read is None:
            return
        for name, size, _ in site.inner_plates:
            if read[2].get(name, size) != size:
                raise ValueError(
                    f"plate {name!r} around latent site {site.name!r} has size {read[2][name]} "
                    f"in this call but {size} in the example the guide was built from: an "
                    "amortized guide has one output per element of a fixed-size inner plate"
                )


def _data_dim(site: LatentSite) -> int:
    return site.data_axis - len(site.batch_shape)
