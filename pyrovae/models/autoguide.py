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
import torch.nn.functional as F
from pyro import poutine
from torch import nn
from torch.distributions import biject_to, constraints

from pyrovae.evaluation.structure import (
    check_enumerable,
    check_model_sites,
    private_randomness,
    self_subsampling_explained,
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


@dataclass(frozen=True)
class DiscreteSite:
    """A discrete latent site that the guide samples from an amortized categorical head
    (``discrete="amortize"``): its number of values and its batch shape on the example."""

    name: str
    num_values: int
    batch_shape: torch.Size
    data_axis: int
    boolean: bool = False

    def rows_shape(self, rows: int) -> list[int]:
        """The batch shape of a call with ``rows`` data points (1 on every other axis)."""
        shape = [1] * len(self.batch_shape)
        shape[self.data_axis] = rows
        return shape


def first_tensor(*args, **kwargs) -> torch.Tensor:
    """Default encoder input: the first tensor argument, one flattened row per data point,
    as a floating tensor (integer and boolean inputs converted)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            rows = value.reshape(value.shape[0], -1)
            return rows if rows.is_floating_point() else rows.to(torch.get_default_dtype())
    raise ValueError("no tensor argument to encode; pass encoder_input=")


def latent_sites(
    model: Callable, args: tuple, kwargs: dict, data_plate: str, discrete: str = "enumerate"
) -> tuple[list[LatentSite], list[DiscreteSite]]:
    """The model's continuous latent sites, in order, each checked to be local and in plates
    the guide can follow (see :func:`pyrovae.evaluation.structure.check_model_sites`), and,
    with ``discrete="amortize"``, its discrete ones (else they are left to enumeration)."""
    with private_randomness(args, kwargs), poutine.block(), torch.no_grad():
        with pyro.get_param_store().scope(), self_subsampling_explained(data_plate):
            trace = poutine.trace(model).get_trace(*args, **kwargs)  # params leave no trace
    sites, discrete_sites, latent = [], [], 0
    for structure in check_model_sites(trace, data_plate):
        latent += not structure.observed
        if structure.discrete:  # enumerated in the model, or an amortized categorical head
            check_enumerable(structure)
            if discrete == "amortize":
                discrete_sites.append(_discrete_site(structure))
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
    if discrete_sites and any(site.inner_plates for site in sites):
        raise ValueError(
            "discrete='amortize' conditions every continuous head on the discrete draws, "
            "which needs continuous sites directly in the data plate; this model nests some "
            "in inner plates: use discrete='enumerate'"
        )
    return sites, discrete_sites


def _discrete_site(structure) -> DiscreteSite:
    batch, support = structure.batch_shape, structure.support
    boolean = support is constraints.boolean
    if isinstance(support, constraints.integer_interval) and support.lower_bound == 0:
        values = support.upper_bound + 1
    elif boolean:
        values = 2
    else:
        raise ValueError(
            f"discrete='amortize' gives categorical heads to sites with values 0..C-1 or "
            f"booleans; site {structure.name!r} has support {support}: use "
            "discrete='enumerate'"
        )
    data_axis = len(batch) + structure.data_dim
    return DiscreteSite(structure.name, int(values), batch, data_axis, boolean)


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
    discrete : {"enumerate", "amortize"}
        What a discrete local site gets. ``"enumerate"`` (default): no head; every estimator
        sums it out exactly in the model (any objective, AIS). ``"amortize"``: a categorical
        head q(y | x), sampled with ``infer={"enumerate": "parallel"}``, and every
        continuous head then sees [features, onehot(y)] (q(z | x, y), Kingma et al.'s M2
        guide; y is the observed label at the points where the model observes the site);
        train it with ``objective="traceenum_elbo"`` (Pyro's TraceEnum_ELBO sums y in the
        guide); ``evaluate`` importance-samples y from q(y | x); reparameterized
        objectives and AIS refuse a sampled discrete guide site.
    classification_weight : float
        With ``discrete="amortize"``, Kingma et al.'s classification term: in training mode
        the guide adds ``classification_weight * log q(y_obs | x)`` of the points where the
        model observes the site (``obs_mask``) to the ELBO, as a factor -alpha log q of its
        own (the training objective is then the ELBO plus this term); evaluation (eval mode)
        leaves it out, so every bound stays a bound. :meth:`class_probabilities` gives
        q(y | x).
    """

    def __init__(
        self,
        model: Callable,
        *example_args,
        data_plate: str = "data",
        hidden_sizes: Sequence[int] = (128,),
        activation: str = "relu",
        encoder_input: Callable[..., torch.Tensor] = first_tensor,
        discrete: str = "enumerate",
        classification_weight: float = 0.0,
        **example_kwargs,
    ):
        super().__init__()
        if discrete not in ("enumerate", "amortize"):
            raise ValueError(f"discrete must be 'enumerate' or 'amortize', got {discrete!r}")
        if not classification_weight >= 0 or (classification_weight and discrete != "amortize"):
            raise ValueError(
                "classification_weight must be a non-negative number, used with "
                f"discrete='amortize'; got {classification_weight!r}"
            )
        self.sites, self.discrete_sites = latent_sites(
            model, example_args, example_kwargs, data_plate, discrete
        )
        self.classification_weight = float(classification_weight)
        self.data_plate = data_plate
        first = (self.sites or self.discrete_sites or [None])[0]
        self.data_dim = -1 if first is None else first.data_axis - len(first.batch_shape)
        object.__setattr__(self, "encoder_input", encoder_input)
        # The model is read on each call where it masks or scales a latent site, or nests
        # one in an inner plate (whose size this call must share with the example's).
        reads = bool(self.discrete_sites) or any(
            s.reads_model or s.inner_plates for s in self.sites
        )
        object.__setattr__(self, "model", model if reads else None)
        width = encoder_input(*example_args, **example_kwargs).shape[-1]
        self.trunk = MLP(width, hidden_sizes, activation)
        features = self.trunk.out_features
        self.classifiers = nn.ModuleDict(
            {s.name: nn.Linear(features, s.num_values) for s in self.discrete_sites}
        )
        features += sum(s.num_values for s in self.discrete_sites)  # q(z | x, y)
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
        """(*leading, N, width) head outputs as (*leading, batch shape with N at the data
        axis, event shape); leading dims come from discrete draws (particles, enumeration)."""
        lead = outputs.dim() - 2
        shape = (*outputs.shape[:-1], *site.other_batch_sizes, *site.unconstrained_shape)
        return outputs.reshape(shape).movedim(lead, lead + site.data_axis)

    def forward(self, *args, **kwargs):
        hidden = self.trunk(self.encoder_input(*args, **kwargs))
        read = self._model_masks_and_scales(args, kwargs) if self.model is not None else {}
        with pyro.plate(self.data_plate, hidden.shape[0], dim=self.data_dim):
            hidden = self._discrete_draws(hidden, read)
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

    def class_probabilities(self, *args, site: str, **kwargs) -> torch.Tensor:
        """q(site = c | x_n) of an amortized discrete site: shape (N, C), rows summing to 1
        (Kingma et al.'s classifier; ``discrete="amortize"`` only)."""
        for discrete in self.discrete_sites:
            if discrete.name in (site, f"{site}_unobserved"):
                hidden = self.trunk(self.encoder_input(*args, **kwargs))
                return torch.softmax(self.classifiers[discrete.name](hidden), -1)
        names = ", ".join(repr(d.name) for d in self.discrete_sites) or "none"
        raise ValueError(f"{site!r} has no categorical head here (amortized sites: {names})")

    def _discrete_draws(self, hidden: torch.Tensor, read: dict) -> torch.Tensor:
        """Sample each amortized discrete site from q(y | x) (under the model's mask and
        scale; the classification term in training mode) and return the features the
        continuous heads see: [hidden, onehot(y) ...], with the draws' leading dims."""
        if not self.discrete_sites:
            return hidden
        parts = [hidden]
        for site in self.discrete_sites:
            logits = self._site_logits(site, self.classifiers[site.name](hidden))
            mask, scale = read.get(site.name, (None, 1.0))[:2]
            with ExitStack() as stack:
                if mask is not None:
                    stack.enter_context(poutine.mask(mask=mask))
                if not (isinstance(scale, float) and scale == 1.0):
                    stack.enter_context(poutine.scale(scale=scale))
                value = pyro.sample(
                    site.name, _categorical(site, logits), infer={"enumerate": "parallel"}
                )
            self._classification_term(site, logits, read)
            value = self._observed_where_labelled(site, value, read)
            parts.append(self._one_hot(site, value, hidden.shape[0]).to(hidden.dtype))
        shape = torch.broadcast_shapes(*(part.shape[:-1] for part in parts))
        return torch.cat([part.expand(*shape, part.shape[-1]) for part in parts], -1)

    @staticmethod
    def _site_logits(site: DiscreteSite, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) head outputs laid out as the site's batch shape followed by C."""
        return logits.reshape(*site.rows_shape(logits.shape[0]), logits.shape[-1])

    @staticmethod
    def _one_hot(site: DiscreteSite, value: torch.Tensor, rows: int) -> torch.Tensor:
        """onehot(y) as (*leading, N, C) from a draw laid out as the site's batch shape."""
        batch = site.rows_shape(rows)
        lead = value.dim() - len(batch)
        value = value.expand(*value.shape[:lead], *batch).movedim(lead + site.data_axis, -1)
        value = value.reshape(*value.shape[:lead], rows)
        return F.one_hot(value.long(), site.num_values)

    @staticmethod
    def _observed_where_labelled(site: DiscreteSite, value: torch.Tensor, read: dict):
        """The label the continuous heads condition on: the observed one where the model
        observes the site (its obs_mask twin), the draw from q(y | x) elsewhere, so that a
        labelled point's q(z | x, y) sees its own label (Kingma et al.'s M2 guide)."""
        twin = read.get(f"{site.name}:observed")
        if twin is None:
            return value
        observed, labelled = twin
        return torch.where(labelled, observed.to(value.dtype), value)

    def _classification_term(self, site: DiscreteSite, logits: torch.Tensor, read: dict):
        """Kingma et al.'s alpha log q(y_obs | x) on the points where the model observes the
        site (its obs_mask twin), as a guide factor of -alpha log q: training mode only."""
        twin = read.get(f"{site.name}:observed")
        if not (self.training and self.classification_weight and twin is not None):
            return
        observed, labelled = twin
        log_q = _categorical(site, logits).log_prob(observed.reshape(logits.shape[:-1]))
        term = -self.classification_weight * torch.where(labelled, log_q, 0.0)
        pyro.factor(f"{site.name}_classification", term, has_rsample=True)  # no sampling

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
        for site in (*self.sites, *self.discrete_sites):
            node = trace.nodes[site.name]
            sizes = {f.name: f.size for f in node["cond_indep_stack"]}
            read[site.name] = (node["mask"], node["scale"], sizes)
        for site in self.discrete_sites:  # an obs_mask site: its observed twin and where
            twin = trace.nodes.get(site.name.removesuffix("_unobserved") + "_observed")
            if site.name.endswith("_unobserved") and twin is not None:
                read[f"{site.name}:observed"] = (twin["value"], twin["mask"])
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


def _categorical(site: DiscreteSite, logits: torch.Tensor) -> dist.TorchDistribution:
    """q(y | x) from logits over the site's values (a Bernoulli for a boolean site)."""
    if site.boolean:
        return dist.Bernoulli(logits=logits[..., 1] - logits[..., 0])
    return dist.Categorical(logits=logits)


def _data_dim(site: LatentSite) -> int:
    return site.data_axis - len(site.batch_shape)
