"""A guide for models with global latent sites: a non-amortized guide for the globals beside
an amortized guide for the local sites.

A *global* latent site is sampled outside the data plate (a variance component, a group
mean, a hyperprior): one value shared by every data point. Its posterior is not a function
of one data point, so no encoder predicts it; Pyro's autoguides (``AutoNormal``,
``AutoDelta``, ``AutoLowRankMultivariateNormal``, ...) built on the model *blocked to its
global sites* (``poutine.block(model, expose=[...])``) guide it well. The local sites keep an
amortized guide, by default :class:`~pyrovae.models.autoguide.AmortizedGuide` built on the
model with the global sites hidden. :class:`HybridGuide` runs both:

    q(theta, z_1..N | x) = q_global(theta) prod_n q_local(z_n | x_n).

It is an ordinary Pyro guide: Pyro's ``SVI`` with ``Trace_ELBO`` fits it, and gives the
right ELBO when the model scales its data plate to the whole data set
(``pyro.plate("data", N, subsample=...)``, or ``poutine.scale(scale=N / B)`` around the
local part only), so that the global KL is counted once per data set. pyrovae's own training
and evaluation use :meth:`HybridGuide.conditioned`, the model with the global sites fixed
and hidden, so that the per-datapoint machinery sees only local sites: see
:class:`pyrovae.objectives.global_latents.GlobalLatentELBO` (training) and
:mod:`pyrovae.evaluation.global_latents` (conditional per-point bounds, whole-data log p(X)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites

from pyrovae.evaluation.structure import private_randomness
from pyrovae.models.autoguide import AmortizedGuide, first_tensor
from pyrovae.models.base import LocalParamsModule, ModuleParamSites


def global_site_names(model: Callable, *args, data_plate: str = "data", **kwargs) -> list[str]:
    """Names of ``model``'s latent sites outside the plate ``data_plate``, in order (one run
    of the model on private random streams)."""
    return _latent_site_names(model, args, kwargs, data_plate)[0]


def _latent_site_names(
    model: Callable, args: tuple, kwargs: dict, data_plate: str
) -> tuple[list[str], list[str]]:
    """(global, local) latent site names of one run of ``model`` on private random streams:
    outside and inside the plate ``data_plate``."""
    with private_randomness(args, kwargs), poutine.block(), torch.no_grad():
        with pyro.get_param_store().scope():  # a function's pyro.param calls leave no trace
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    latent = [
        (name, data_plate in {f.name for f in site["cond_indep_stack"]})
        for name, site in prune_subsample_sites(trace).nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("_deterministic")
    ]
    return [n for n, local in latent if not local], [n for n, local in latent if local]


class NoLocalSites(torch.nn.Module):
    """The local guide of a model whose latent sites are all global (a hierarchical model
    whose group effects sit outside the data plate): it samples nothing."""

    def forward(self, *args, **kwargs) -> None:
        return None


class ConditionedOnGlobals:
    """``model`` with its global sites fixed at :attr:`values` and hidden from every handler
    outside (``poutine.condition`` inside ``poutine.block``): to the per-datapoint estimators
    it is a model with local latent sites only. One object per model, whose values change
    from call to call (objectives cache their structural check by the model's identity)."""

    def __init__(self, model: Callable, names: Sequence[str], values: dict | None = None):
        self.model = model
        self.names = tuple(names)
        self.values = dict(values or {})

    def __call__(self, *args, **kwargs):
        missing = [name for name in self.names if name not in self.values]
        if missing:
            raise ValueError(f"no value given for the global site(s) {missing}")
        conditioned = poutine.condition(self.model, data=self.values)
        return poutine.block(conditioned, hide=list(self.names))(*args, **kwargs)


class HybridGuide(LocalParamsModule):
    """q(theta) prod_n q(z_n | x_n): a non-amortized guide for the global sites, an
    amortized one for the local sites.

    Parameters
    ----------
    model : callable
        The Pyro model; its latent sites outside ``data_plate`` are the global sites.
    *example_args, **example_kwargs
        Arguments of one model call (a few data points suffice), to read its sites.
    global_guide : type or callable
        A guide for the global sites: an autoguide *class* (default ``AutoNormal``; also
        ``AutoDelta``, ``AutoLowRankMultivariateNormal``, ...), built here on
        ``poutine.block(model, expose=global_sites)``, or a guide already built that way.
        Its sample sites must be exactly the global sites (plus an autoguide's own auxiliary
        site), all reparameterized. ``AutoDelta`` makes the global part a MAP estimate (log q
        = 0), so the objective is then no bound.
    local_guide : callable, optional
        A guide for the local sites, all inside ``data_plate``; by default an
        :class:`AmortizedGuide` of the model with the global sites hidden, built with
        ``hidden_sizes``, ``activation`` and ``encoder_input``, or, where the model has no
        local latent site, :class:`NoLocalSites`.
    data_plate : str
        Name of the model's plate over data points.
    """

    def __init__(
        self,
        model: Callable,
        *example_args,
        global_guide=AutoNormal,
        local_guide: Callable | None = None,
        data_plate: str = "data",
        hidden_sizes: Sequence[int] = (128,),
        activation: str = "relu",
        encoder_input: Callable[..., torch.Tensor] = first_tensor,
        **example_kwargs,
    ):
        super().__init__()
        names, local_names = _latent_site_names(model, example_args, example_kwargs, data_plate)
        if not names:
            raise ValueError(
                f"the model has no latent site outside the data plate {data_plate!r}: every "
                "site is local, so use AmortizedGuide alone"
            )
        self.global_sites = tuple(names)
        self.data_plate = data_plate
        with pyro.settings.context(module_local_params=True):
            if isinstance(global_guide, type):
                global_guide = global_guide(poutine.block(model, expose=list(names)))
            if local_guide is None and not local_names:
                local_guide = NoLocalSites()
            elif local_guide is None:
                local_guide = AmortizedGuide(
                    poutine.block(model, hide=list(names)),
                    *example_args,
                    data_plate=data_plate,
                    hidden_sizes=hidden_sizes,
                    activation=activation,
                    encoder_input=encoder_input,
                    **example_kwargs,
                )
        if not callable(global_guide) or not callable(local_guide):
            raise TypeError("global_guide and local_guide must be Pyro guides (callables)")
        self.global_guide = global_guide
        self.local_guide = local_guide

    def forward(self, *args, **kwargs) -> dict:
        """Sample the global sites, then the local ones; returns the global values."""
        values = self.global_guide(*args, **kwargs)
        self.local_guide(*args, **kwargs)
        return {name: values[name] for name in self.global_sites} if values else {}

    # -- what pyrovae's estimators use ----------------------------------------------------
    def global_trace(self, *args, **kwargs):
        """A trace of the global guide alone (one draw theta ~ q(theta), with autograd
        history), after checking that it samples exactly the global sites."""
        with pyro.settings.context(module_local_params=True), ModuleParamSites():
            trace = poutine.trace(self.global_guide).get_trace(*args, **kwargs)
        sites = [
            name
            for name, site in prune_subsample_sites(trace).nodes.items()
            if site["type"] == "sample"
        ]
        missing = [name for name in self.global_sites if name not in sites]
        extra = [
            name
            for name in sites
            if name not in self.global_sites and not trace.nodes[name]["infer"].get("is_auxiliary")
        ]
        if missing or extra:
            raise ValueError(
                f"the global guide must sample exactly the global sites {list(self.global_sites)}"
                f" (missing: {missing or 'none'}; others: {extra or 'none'}): build it on "
                "poutine.block(model, expose=global_sites)"
            )
        for name in sites:
            if not trace.nodes[name]["fn"].has_rsample:
                raise ValueError(
                    f"global guide site {name!r} is not reparameterized: the objective needs "
                    "rsample for the global sites"
                )
        return trace

    def plug_in(self, *args, rule: str = "median", **kwargs) -> dict:
        """A point value theta_hat of the global sites, detached: the global guide's
        ``median()`` (``rule="median"``; Pyro's autoguides: the median of q(theta), which for
        ``AutoNormal`` on real sites is also its mean, and ``AutoDelta``'s point) or its
        ``mean()`` (``rule="mean"``, for guides that define one)."""
        if rule not in ("median", "mean"):
            raise ValueError(f"plug-in rule must be 'median' or 'mean', got {rule!r}")
        if getattr(self.global_guide, "prototype_trace", True) is None:  # an unused autoguide
            with private_randomness(args, kwargs), torch.no_grad():
                self.global_trace(*args, **kwargs)
        method = getattr(self.global_guide, rule, None)
        if method is None:
            raise ValueError(
                f"the global guide ({type(self.global_guide).__name__}) has no {rule}(): pass "
                "the plug-in values of the global sites yourself"
            )
        with pyro.settings.context(module_local_params=True), torch.no_grad():
            values = method(*args, **kwargs)
        return {name: values[name].detach() for name in self.global_sites}

    def conditioned(self, model: Callable, values: dict | None = None) -> ConditionedOnGlobals:
        """``model`` with the global sites fixed at ``values`` and hidden (see
        :class:`ConditionedOnGlobals`); pair it with :attr:`local_guide`."""
        return ConditionedOnGlobals(model, self.global_sites, values)


def is_hybrid(guide) -> bool:
    """Whether ``guide`` is a :class:`HybridGuide`."""
    return isinstance(guide, HybridGuide)


__all__ = ["ConditionedOnGlobals", "HybridGuide", "NoLocalSites", "global_site_names", "is_hybrid"]
