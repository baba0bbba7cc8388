"""Evaluation of models with global latent sites: what is measured, said in the result.

A global site theta (outside the data plate) couples the data points, so log p(x_n) of one
point alone is not defined by the fitted model without saying what is done with theta. Two
quantities are offered, each named for what it is:

* :func:`evaluate_conditional` -- per data point, log p(x_n | theta_hat) at a stated plug-in
  value theta_hat (the global guide's median by default), by the ordinary per-datapoint
  importance sampling of :func:`pyrovae.evaluation.importance.evaluate` on the model
  conditioned on theta_hat with the local guide. The result (a
  :class:`ConditionalEvaluation`) says "conditional" and gives theta_hat in its table.
* :func:`log_marginal_likelihood` -- for small data sets, log p(X) of the *whole* data set
  by importance sampling over the global guide, nested: for theta_s ~ q(theta),
  s = 1..S, an unbiased estimate of each p(x_n | theta_s) from K local draws
  z_nk ~ q(z | x_n), their product over n, and

      p_hat(X) = (1/S) sum_s p(theta_s) / q(theta_s) * prod_n p_hat(x_n | theta_s),

  unbiased for p(X) (the local estimates are independent given theta_s); its log is a
  stochastic lower bound of log p(X) (Jensen). The standard error is the delta method over
  the S outer draws: se(log p_hat) = sd(w_s) / (sqrt(S) mean(w_s)). Its variance grows with
  N (the product of N noisy factors), hence "small data sets"; the effective sample size
  of the outer weights is reported to show when S is too small.

A guide with no local part (e.g. Pyro's ``AutoDiagonalNormal`` over the whole model, whose
one auxiliary site holds every data point's latents) has no per-datapoint bound:
:func:`evaluate_conditional` refuses it, and :func:`log_marginal_likelihood` takes it
with plain importance sampling over the joint guide (S draws of every latent site).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta

from pyrovae.evaluation.importance import EvaluationResult, evaluate
from pyrovae.evaluation.structure import check_structure
from pyrovae.evaluation.traces import particle_terms
from pyrovae.models.hybrid import HybridGuide, is_hybrid
from pyrovae.objectives.global_latents import global_log_prior, guide_log_q


@dataclass
class ConditionalEvaluation(EvaluationResult):
    """:class:`~pyrovae.evaluation.importance.EvaluationResult` of log p(x_n | theta_hat):
    every bound is conditional on the global sites at ``plug_in`` (values by site), chosen
    by ``plug_in_rule`` ("median" of the global guide, or "given")."""

    plug_in: dict = field(default_factory=dict)
    plug_in_rule: str = "median"

    def describe_plug_in(self) -> str:
        values = ", ".join(f"{name} = {_short(value)}" for name, value in self.plug_in.items())
        return (
            f"conditional on the global sites at theta_hat ({self.plug_in_rule}): {values}; "
            "log_px is log p(x_n | theta_hat), not the marginal log p(x_n)"
        )

    def table(self) -> str:
        return f"{self.describe_plug_in()}\n{super().table()}"

    def to_dict(self) -> dict:
        record = super().to_dict()
        record["conditional_on"] = {k: np.asarray(v).tolist() for k, v in self.plug_in.items()}
        record["plug_in_rule"] = self.plug_in_rule
        return record


def _short(value: torch.Tensor) -> str:
    array = np.asarray(value.detach().cpu(), dtype=np.float64)
    if array.size == 1:
        return f"{float(array):.4g}"
    return np.array2string(array, precision=4, threshold=6)


def _require_hybrid(guide, what: str) -> HybridGuide:
    if is_hybrid(guide):
        return guide
    raise ValueError(
        f"{what} needs a HybridGuide (pyrovae.models.hybrid): a global guide for the global "
        "sites beside an amortized local guide. A guide over the whole model (e.g. Pyro's "
        "AutoDiagonalNormal, whose one auxiliary site holds every data point's latents) has "
        "no per-datapoint bound; log_marginal_likelihood() estimates log p(X) of the whole "
        "data set with it"
    )


def evaluate_conditional(
    model: Callable,
    guide: HybridGuide,
    *args,
    plug_in: dict | str = "median",
    data_plate: str = "data",
    **options,
) -> ConditionalEvaluation:
    """Per-datapoint bounds on log p(x_n | theta_hat), nats per data point.

    Parameters
    ----------
    model, guide
        The Pyro model and its :class:`~pyrovae.models.hybrid.HybridGuide`.
    *args
        The data (model arguments), one row per data point.
    plug_in : dict or str
        Values of the global sites (by name), or ``"median"`` / ``"mean"`` of the global
        guide (:meth:`HybridGuide.plug_in`).
    **options
        Passed to :func:`pyrovae.evaluation.importance.evaluate` (``num_samples``, ``ks``,
        ``seed``, ...).
    """
    guide = _require_hybrid(guide, "evaluate_conditional")
    if isinstance(plug_in, str):
        rule, values = plug_in, guide.plug_in(*_first_rows(args), rule=plug_in)
    else:
        rule, values = "given", _given_values(guide, plug_in)
    conditioned = guide.conditioned(model, values)
    result = evaluate(conditioned, guide.local_guide, *args, data_plate=data_plate, **options)
    fields = {name: getattr(result, name) for name in result.__dataclass_fields__}
    return ConditionalEvaluation(**fields, plug_in=values, plug_in_rule=rule)


def _first_rows(args: tuple) -> tuple:
    return tuple(a[: min(2, a.shape[0])] if isinstance(a, torch.Tensor) else a for a in args)


def _given_values(guide: HybridGuide, values: dict) -> dict:
    if set(values) != set(guide.global_sites):
        raise ValueError(
            f"plug_in must give every global site {list(guide.global_sites)} and no other, "
            f"got {sorted(values)}"
        )
    return {name: torch.as_tensor(values[name]).detach() for name in guide.global_sites}


@dataclass
class WholeDataEstimate:
    """log p(X) of a whole data set by importance sampling over the global guide.

    Attributes
    ----------
    log_px : float
        log p_hat(X), nats for the whole data set (a stochastic lower bound of log p(X);
        p_hat is unbiased).
    se : float
        Its standard error (delta method over the outer draws), nats.
    num_points : int
        N, the data points.
    log_weights : numpy.ndarray
        The S outer log weights log p(theta_s) - log q(theta_s) + sum_n log p_hat(x_n |
        theta_s) (nats).
    num_local : int
        K, local draws per data point and outer draw (0 for a guide without local part).
    """

    log_px: float
    se: float
    num_points: int
    log_weights: np.ndarray
    num_local: int

    @property
    def per_point(self) -> float:
        """log p_hat(X) / N, nats per data point."""
        return self.log_px / self.num_points

    @property
    def ess(self) -> float:
        """Effective sample size of the outer weights, (sum w)^2 / sum w^2, out of S."""
        w = np.exp(self.log_weights - self.log_weights.max())
        return float(w.sum() ** 2 / (w**2).sum())

    def table(self) -> str:
        return (
            f"log p(X) of the whole data set (N={self.num_points}): {self.log_px:.3f} +- "
            f"{self.se:.3f} nats ({self.per_point:.4f} per data point); S="
            f"{len(self.log_weights)} global draws (ESS {self.ess:.1f}), K={self.num_local} "
            "local draws per point and global draw; unbiased in p(X), a stochastic lower "
            "bound in log"
        )


def log_marginal_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_global: int = 100,
    num_local: int = 100,
    seed: int | None = None,
    data_plate: str = "data",
    max_pairs: int = 2**20,
) -> WholeDataEstimate:
    """log p(X) of the whole data set ``args`` by nested importance sampling (module
    docstring), with its standard error.

    Parameters
    ----------
    model : callable
        The Pyro model, called as ``model(*args)`` on the whole data set.
    guide : HybridGuide or callable
        A :class:`~pyrovae.models.hybrid.HybridGuide` (nested estimator), or a guide of
        every latent site (plain importance sampling over it, ``num_local`` unused).
    num_global : int
        S, draws theta_s ~ q(theta).
    num_local : int
        K, draws z_nk ~ q(z | x_n) per data point and draw theta_s.
    seed : int, optional
        Seed Pyro's RNGs first.
    """
    for name, value in (("num_global", num_global), ("num_local", num_local)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if is_hybrid(guide) and isinstance(guide.global_guide, AutoDelta):
        raise ValueError(
            "the global guide is AutoDelta, a point mass: it is no importance sampling "
            "proposal for theta (log p(X) needs a density q(theta)); evaluate log p(x_n | "
            "theta_hat) with evaluate_conditional, or fit an AutoNormal global guide"
        )
    if seed is not None:
        pyro.set_rng_seed(seed)
    with torch.no_grad():
        if is_hybrid(guide):
            log_weights = _nested_log_weights(
                model, guide, args, num_global, num_local, data_plate, max_pairs
            )
        else:
            log_weights = _joint_log_weights(model, guide, args, num_global)
            num_local = 0
    log_weights = torch.stack(log_weights).double()
    log_px = float(torch.logsumexp(log_weights, 0) - math.log(num_global))
    w = torch.exp(log_weights - log_weights.max())
    se = math.nan
    if num_global > 1:  # delta method: sd(w) / (sqrt(S) mean(w))
        se = float(w.std(unbiased=True) / (math.sqrt(num_global) * w.mean()))
    num_points = int(args[0].shape[0])
    return WholeDataEstimate(log_px, se, num_points, log_weights.cpu().numpy(), num_local)


def _nested_log_weights(model, guide, args, num_global, num_local, data_plate, max_pairs):
    conditioned = guide.conditioned(model)
    structure = None
    log_weights = []
    for _ in range(num_global):
        guide_trace = guide.global_trace(*args)
        conditioned.values = {n: guide_trace.nodes[n]["value"] for n in guide.global_sites}
        global_term = global_log_prior(model, guide, guide_trace, args, {}) - guide_log_q(
            guide_trace
        )
        if structure is None:
            structure = check_structure(
                conditioned, guide.local_guide, *args, data_plate=data_plate
            )
            structure.require_common_scale("the nested log p(X) estimate")
        terms = particle_terms(
            conditioned,
            guide.local_guide,
            *args,
            num_particles=num_local,
            data_plate=data_plate,
            max_pairs=max_pairs,
            max_plate_nesting=structure.max_plate_nesting,
            vectorized=structure.vectorized,
            data_kwargs=(),
        )
        per_point = torch.logsumexp(terms.log_weights.double(), 0) - math.log(num_local)
        log_weights.append(global_term.double() + per_point.sum())
    return log_weights


def _joint_log_weights(model, guide, args, num_global):
    """log p(X, latents_s) - log q(latents_s) for S joint draws of a whole-model guide."""
    log_weights = []
    for _ in range(num_global):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        log_weights.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
    return log_weights


__all__ = [
    "ConditionalEvaluation",
    "WholeDataEstimate",
    "evaluate_conditional",
    "log_marginal_likelihood",
]
