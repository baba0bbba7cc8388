"""Paired comparison of fitted models on the same data points.

Per-datapoint estimates of two models on the *same* points are strongly correlated (a hard
digit is hard for every model), so the difference of their means is far better determined
than the two means are: its standard error is that of the mean of the per-point differences,

    d_n = a_n - b_n,   mean(d) +- std(d) / sqrt(N)          (paired),

which can be many times smaller than sqrt(se(a)^2 + se(b)^2), the unpaired standard error
that treats the two means as independent (shown for contrast). All quantities are in nats per
data point; higher is better, so a positive difference favours the first model.

:func:`compare` evaluates fitted models (or takes finished results: an
:class:`~pyrovae.evaluation.importance.EvaluationResult`, an AIS result, any object with a
``per_datapoint`` dict, or a plain array of per-point values) and refuses results computed on
different points: the number of points must agree, and so must the data fingerprints
(:func:`~pyrovae.evaluation.importance.data_fingerprint`) wherever they are known.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from pyrovae.evaluation.importance import data_fingerprint
from pyrovae.models.modes import evaluates

PAIRINGS = ("best", "all")


@dataclass
class Comparison:
    """Per-point values of one quantity for several models, and their paired differences.

    Attributes
    ----------
    quantity : str
        The compared column (``log_px``, ``elbo``, ``iwae_5``, ...), nats per data point.
    per_datapoint : dict of str to numpy.ndarray
        The quantity per data point for each model, shape (N,) each, in the order given.
    pairs : str
        ``"best"``: each model against the one with the highest mean; ``"all"``: every pair.
    fingerprint : str or None
        The data fingerprint shared by the results (None when none was known).
    unchecked : tuple of str
        Models whose data fingerprint was unknown (only N was checked for them).
    """

    quantity: str
    per_datapoint: dict[str, np.ndarray]
    pairs: str = "best"
    fingerprint: str | None = None
    unchecked: tuple[str, ...] = ()

    @property
    def num_points(self) -> int:
        return len(next(iter(self.per_datapoint.values())))

    def ranking(self) -> list[dict]:
        """Rows (model, mean, se over data points), highest mean first."""
        rows = [
            {"model": name, "mean": float(values.mean()), "se": _se(values)}
            for name, values in self.per_datapoint.items()
        ]
        return sorted(rows, key=lambda row: -row["mean"])

    @property
    def best(self) -> str:
        return self.ranking()[0]["model"]

    def difference(self, first: str, second: str) -> dict:
        """mean(first - second) with its paired and unpaired standard errors (nats)."""
        a, b = self.per_datapoint[first], self.per_datapoint[second]
        paired = _se(a - b)
        mean = float((a - b).mean())
        return {
            "first": first,
            "second": second,
            "difference": mean,
            "paired_se": paired,
            "unpaired_se": math.sqrt(_se(a) ** 2 + _se(b) ** 2),
            "z": _z_score(mean, paired),
        }

    def differences(self) -> list[dict]:
        """The differences the table shows: every model minus the best, or every pair
        (higher-ranked model first)."""
        order = [row["model"] for row in self.ranking()]
        if self.pairs == "best":
            return [self.difference(order[0], other) for other in order[1:]]
        return [self.difference(a, b) for a, b in itertools.combinations(order, 2)]

    def table(self) -> str:
        """Models sorted by the estimate, then the paired differences, as aligned text."""
        width = max(12, *(len(name) + 2 for name in self.per_datapoint))
        lines = [
            f"{'model':<{width}}{self.quantity + ' mean':>16}{'se':>10}   (nats per data "
            f"point, N={self.num_points}, higher is better)"
        ]
        lines += [
            f"{row['model']:<{width}}{row['mean']:>16.3f}{row['se']:>10.3f}"
            for row in self.ranking()
        ]
        lines.append("")
        lines.append(
            f"{'difference':<{2 * width + 3}}{'mean':>10}{'paired se':>12}{'unpaired se':>13}"
            f"{'z':>8}"
        )
        for row in self.differences():
            label = f"{row['first']} - {row['second']}"
            lines.append(
                f"{label:<{2 * width + 3}}{row['difference']:>10.3f}{row['paired_se']:>12.4f}"
                f"{row['unpaired_se']:>13.4f}{row['z']:>8.1f}"
            )
        lines.append(
            "paired se: standard error of the mean of the per-point differences (the same "
            "points for every model); unpaired se: sqrt(se_a^2 + se_b^2), for contrast"
        )
        if self.unchecked:
            lines.append(
                f"data fingerprint unknown for {', '.join(self.unchecked)}: only the number of "
                "points was checked"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python containers (lists and numbers), e.g. for JSON."""
        return {
            "quantity": self.quantity,
            "num_points": self.num_points,
            "pairs": self.pairs,
            "fingerprint": self.fingerprint,
            "unchecked": list(self.unchecked),
            "ranking": self.ranking(),
            "differences": self.differences(),
            "per_datapoint": {name: v.tolist() for name, v in self.per_datapoint.items()},
        }


def _z_score(mean: float, se: float) -> float:
    """mean / se; +-inf for a non-zero mean with zero spread, NaN for identical values."""
    if se > 0:
        return mean / se
    return math.copysign(math.inf, mean) if mean != 0 else math.nan


def _se(values: np.ndarray) -> float:
    """Standard error of the mean over data points (NaN for a single point)."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _column(name: str, source, quantity: str) -> np.ndarray:
    """The per-point values of ``quantity`` in a result object or array."""
    columns = getattr(source, "per_datapoint", None)
    if columns is None:
        values = source
    elif quantity in columns:
        values = columns[quantity]
    else:
        raise ValueError(
            f"{name!r} has no column {quantity!r} (it has: {', '.join(sorted(columns))})"
        )
    values = np.asarray(torch.as_tensor(values).detach().cpu().double(), dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"{name!r}: expected one value per data point, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name!r}: its {quantity} values are not all finite")
    return values


def _is_fitted_model(value) -> bool:
    return hasattr(value, "evaluate") and not hasattr(value, "per_datapoint")


def _needed_ks(quantity: str, ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if quantity.startswith("iwae_") and quantity[5:].isdigit():
        k = int(quantity[5:])
        ks = ks if k in ks else (*ks, k)
    return ks


def _evaluate(model, data: tuple, quantity: str, options: dict):
    """``model.evaluate`` on the data; a conditional VAE's (x, y) go as x and condition=y."""
    options = {"num_samples": 1000, "ks": (1,), "seed": 0, "latent_diagnostics": False, **options}
    options["ks"] = _needed_ks(quantity, options["ks"])
    takes_condition = "condition" in inspect.signature(model.evaluate).parameters
    if takes_condition and len(data) == 2 and "condition" not in options:
        return model.evaluate(data[0], condition=data[1], **options)
    return model.evaluate(*data, **options)


def _check_same_points(values: dict, fingerprints: dict, expected: str | None) -> None:
    sizes = {name: len(v) for name, v in values.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: N={size}" for name, size in sizes.items())
        raise ValueError(f"the results were computed on different numbers of points ({listed})")
    known = {name: f for name, f in fingerprints.items() if f is not None}
    if expected is not None:
        known = {"the data passed": expected, **known}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{name}: {f}" for name, f in known.items())
        raise ValueError(
            "the results were computed on different data points (data fingerprints differ: "
            f"{listed}); a paired comparison needs the same points in the same order"
        )


@evaluates("models")
def compare(
    models: dict,
    *data,
    quantity: str = "log_px",
    pairs: str = "best",
    **evaluate_options,
) -> Comparison:
    """Compare models on the same data points with paired standard errors.

    Parameters
    ----------
    models : dict of str to model or result
        Two or more entries: fitted models (anything with ``evaluate(*data, ...)``, e.g. a
        :class:`~pyrovae.VAE`; evaluated here on ``data``), results (objects with a
        ``per_datapoint`` dict, e.g. :class:`~pyrovae.evaluation.importance.EvaluationResult`
        or an AIS result), or arrays of per-point values.
    *data : array-like
        The data points, for evaluating models and checking the results' fingerprints.
    quantity : str
        Column to compare: ``log_px`` (default), ``elbo``, ``elbo_analytic``, ``iwae_<k>``...
        (nats per data point, higher is better).
    pairs : {"best", "all"}
        Each model against the best, or all pairs.
    **evaluate_options
        Passed to ``evaluate`` of fitted models (defaults: ``num_samples=1000``, ``seed=0``,
        ``ks`` holding k of an ``iwae_<k>`` quantity, no latent diagnostics). The same seed
        for all models makes the comparison reproducible.

    Returns
    -------
    Comparison

    Raises
    ------
    ValueError
        Fewer than two models, results on different numbers of points or with different data
        fingerprints, a missing column, or non-finite values.
    """
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs must be one of {', '.join(PAIRINGS)}, got {pairs!r}")
    if len(models) < 2:
        raise ValueError(f"compare needs at least two models, got {len(models)}")
    if any(_is_fitted_model(m) for m in models.values()) and not data:
        raise ValueError("pass the data points to evaluate the fitted models on")
    expected = _fingerprint_of(data)
    results = {
        name: _evaluate(m, data, quantity, evaluate_options) if _is_fitted_model(m) else m
        for name, m in models.items()
    }
    values = {name: _column(name, result, quantity) for name, result in results.items()}
    fingerprints = {name: getattr(r, "data_fingerprint", None) for name, r in results.items()}
    _check_same_points(values, fingerprints, expected)
    known = [f for f in fingerprints.values() if f is not None]
    unchecked = tuple(name for name, f in fingerprints.items() if f is None)
    return Comparison(quantity, values, pairs, known[0] if known else expected, unchecked)


def _fingerprint_of(data: tuple) -> str | None:
    """Fingerprint of the data tensors as evaluation sees them, or None without data."""
    if not data:
        return None
    tensors = [d if isinstance(d, torch.Tensor) else torch.as_tensor(np.asarray(d)) for d in data]
    return data_fingerprint(*tensors)
