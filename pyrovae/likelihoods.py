"""Observation models p(x|z): the decoder's output layer plus the distribution it parameterises.

Each likelihood is a :class:`torch.nn.Module` that maps the decoder trunk's hidden
activations h to a Pyro distribution with ``event_dim == 1`` over the D features, and knows
its support so that data can be checked before training. Select one by name
(``VAEConfig(likelihood=...)``, ``--likelihood`` on the command line) from
:data:`LIKELIHOODS`:

========================================  ==============================================
name                                      p(x_d | z), support, parameterisation
========================================  ==============================================
``bernoulli``                             Bernoulli(sigmoid(l_d(h))); {0, 1}
``continuous-bernoulli``                  ContinuousBernoulli(logits=l_d(h)) with its
                                          normalising constant; grey levels in [0, 1]
``normal``                                Normal(mu_d(h), sigma_d(h)); real values
``normal-per-feature``                    Normal(mu_d(h), sigma_d), one learned scale per
                                          feature shared over z
``normal-fixed``                          Normal(mu_d(h), s), a fixed scale s (default 1.0;
                                          see :class:`NormalFixedLikelihood`)
``laplace``                               Laplace(mu_d(h), b_d(h)); real values
``student-t``                             StudentT(nu_d, mu_d(h), sigma_d(h)), learned
                                          degrees of freedom nu_d > 2 per feature
``poisson``                               Poisson(rate_d(h)); non-negative integers
``negative-binomial``                     NegativeBinomial with mean m_d(h) and learned
                                          total count (inverse dispersion) r_d per feature
``zero-inflated-negative-binomial``       the same, zero-inflated with gate logits g_d(h)
``categorical-256``                       Categorical over 256 levels with logits
                                          L_dk(h); integer grey levels 0, 1, ..., 255
========================================  ==============================================

Every parameter comes from a linear head of h (one output per feature, 256 for
``categorical-256``) or is a per-feature vector shared over z. Positive parameters are
``softplus(raw) + minimum`` (:func:`pyrovae.networks.positive_scale`), so they stay strictly
positive with gradients everywhere. Distributions are built with ``validate_args=False``:
data are validated once, up front, by :meth:`Likelihood.check_support`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.networks import positive_scale


class Likelihood(nn.Module):
    """Base class: ``forward(hidden)`` returns p(x|z) as a distribution with one event dim.

    The constructor builds one ``head(in_features, head_width * num_features)`` attribute
    per name in :attr:`heads` (``head`` is ``nn.Linear`` unless the decoder supplies its own,
    e.g. a per-pixel head for convolutional decoders) and one zero-initialised
    ``(num_features,)`` parameter per name in :attr:`per_feature`; subclasses declare these
    and implement :meth:`forward` and :meth:`out_of_support`.
    """

    name: ClassVar[str]
    support: ClassVar[str]
    heads: ClassVar[tuple[str, ...]] = ()
    """Linear heads of the hidden activations, in registration order."""
    head_width: ClassVar[int] = 1
    """Outputs of each head per feature."""
    per_feature: ClassVar[tuple[str, ...]] = ()
    """Unconstrained per-feature parameters shared over z (initialised at zero)."""

    def __init__(
        self, in_features: int, num_features: int, head: Callable[[int, int], nn.Module] = nn.Linear
    ):
        super().__init__()
        self.num_features = num_features
        for name in self.heads:
            setattr(self, name, head(in_features, self.head_width * num_features))
        for parameter in self.per_feature:
            setattr(self, parameter, nn.Parameter(torch.zeros(num_features)))

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


def _is_integer(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x) & (x == torch.round(x))


class IndependentBernoulli(dist.Independent):
    """Bernoulli features with logits l, one event dimension, built as
    ``IndependentBernoulli(dist.Bernoulli(logits=l), 1)``.

    ``log_prob(x) = sum_d [x_d l_d - softplus(l_d)]``, the Bernoulli log-likelihood summed over
    features, computed as one contraction and one softplus-sum. Torch's elementwise
    ``Bernoulli.log_prob`` followed by the event sum makes two extra full passes over the
    (draws, data points, features) tensor; this is the same number, about twice as fast.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.base_dist.logits
        return _last_axis_dot(logits, value) - F.softplus(logits).sum(-1)


def _last_axis_dot(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """sum_d tensor[..., d] * other[..., d] with broadcasting, without a full-size product when
    ``other`` is shared across leading dims of ``tensor`` (data reused by every draw)."""
    extra = tensor.dim() - other.dim()
    shared = math.prod(tensor.shape[:extra]) if extra > 0 else 1
    if shared < 16:  # few draws: a plain product and sum beats many tiny matrix products
        return (tensor * other).sum(-1)
    if tensor.shape[extra:] == other.shape and other.dim() >= 1:
        rows = other.reshape(-1, other.shape[-1])
        grouped = tensor.reshape(-1, rows.shape[0], rows.shape[1])
        return torch.einsum("bnd,nd->bn", grouped, rows).reshape(tensor.shape[:-1])
    return torch.einsum("...d,...d->...", tensor, other)


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels with logits from a linear head (binary data)."""

    name = "bernoulli"
    support = "values in {0, 1}"
    heads = ("logits",)

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        base = dist.Bernoulli(logits=self.logits(hidden), validate_args=False)
        return IndependentBernoulli(base, 1, validate_args=False)

    def mean(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return (x != 0) & (x != 1)

    def support_hint(self) -> str:
        return (
            "Binarize grey-level data first (binarize='dynamic' or 'static' when fitting, "
            "--binarize on the command line) or choose a likelihood for grey levels, e.g. "
            "continuous-bernoulli or normal."
        )


class StableContinuousBernoulli(dist.ContinuousBernoulli):
    """Pyro's continuous Bernoulli with the log normaliser and mean computed from the logits.

    With lambda = sigmoid(eta), ``C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda)
    = eta / tanh(eta / 2)`` (2 at eta = 0) and ``E[x] = 1 / (1 - exp(-eta)) - 1 / eta``. Torch
    evaluates both from the clamped probabilities, which saturate for ``abs(eta)`` above about 16
    in float32 (37 in float64): its ``log_prob`` is then too low by about ``log(abs(eta) / 16)``
    in float32 (0.9 nats per feature at ``abs(eta) = 40``). Sampling is torch's.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.logits
        small = logits.abs() < 1e-3
        safe = torch.where(small, torch.ones_like(logits), logits)
        log_norm = torch.where(
            small, math.log(2.0) + logits**2 / 12, torch.log(safe / torch.tanh(safe / 2))
        )
        # softplus's default threshold (20) would cost up to exp(-20) nats in float64.
        return log_norm + value * logits - F.softplus(logits, threshold=50.0)

    @property
    def mean(self) -> torch.Tensor:
        logits = self.logits
        small = logits.abs() < 0.1
        safe = torch.where(small, torch.ones_like(logits), logits)
        exact = -1.0 / torch.expm1(-safe) - 1.0 / safe
        return torch.where(small, 0.5 + logits / 12 - logits**3 / 720, exact)


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli grey levels in [0, 1], logits from a linear head, normalised."""

    name = "continuous-bernoulli"
    support = "values in [0, 1]"
    heads = ("logits",)

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        logits = self.logits(hidden)
        return StableContinuousBernoulli(logits=logits, validate_args=False).to_event(1)

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return ~((x >= 0) & (x <= 1))

    def support_hint(self) -> str:
        return "Rescale the data into [0, 1] (e.g. divide by the largest possible value)."


class LocationScaleLikelihood(Likelihood):
    """Real-valued features: location head mu_theta(z) and scale head sigma_theta(z)."""

    support = "finite real values"
    heads = ("loc", "raw_scale")

    def scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return positive_scale(self.raw_scale(hidden))

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        """The elementwise distribution with this location and scale."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        return self.distribution(self.loc(hidden), self.scale(hidden)).to_event(1)

    def mean(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.loc(hidden)

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(x)


class NormalLikelihood(LocationScaleLikelihood):
    """Heteroscedastic Gaussian: mean mu_theta(z) and diagonal scale sigma_theta(z), two heads."""

    name = "normal"

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, scale, validate_args=False)


class NormalPerFeatureLikelihood(NormalLikelihood):
    """Gaussian with mean mu_theta(z) and one learned scale per feature, shared over z."""

    name = "normal-per-feature"
    heads = ("loc",)
    per_feature = ("raw_scale",)

    def scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return positive_scale(self.raw_scale).expand(hidden.shape[:-1] + (self.num_features,))


class NormalFixedLikelihood(NormalLikelihood):
    """Gaussian with mean mu_theta(z) and a fixed scale s, not learned (default 1.0).

    The log density is ``-||x - mu||^2 / (2 s^2)`` plus a constant: a squared-error decoder.
    ``s`` is the buffer ``fixed_scale``, saved with the model. Set it with
    ``make_likelihood("normal-fixed", H, D, scale=s)``, or on a built VAE with
    ``vae.model.likelihood.fixed_scale.fill_(s)`` before fitting.
    """

    name = "normal-fixed"
    heads = ("loc",)

    def __init__(
        self,
        in_features: int,
        num_features: int,
        head: Callable[[int, int], nn.Module] = nn.Linear,
        scale: float = 1.0,
    ):
        super().__init__(in_features, num_features, head)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    def scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fixed_scale.expand(hidden.shape[:-1] + (self.num_features,))


class LaplaceLikelihood(LocationScaleLikelihood):
    """Laplace with location mu_theta(z) and scale b_theta(z) (mean absolute deviation)."""

    name = "laplace"

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.Laplace(loc, scale, validate_args=False)


class StudentTLikelihood(LocationScaleLikelihood):
    """Student-t with location and scale heads and learned degrees of freedom per feature,
    ``nu_d = 2 + softplus(raw_df_d) + 1e-4 > 2``, so that the variance exists (2.69 at
    initialisation)."""

    name = "student-t"
    per_feature = ("raw_df",)

    def df(self) -> torch.Tensor:
        return 2.0 + positive_scale(self.raw_df)

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.StudentT(self.df(), loc, scale, validate_args=False)


class CountLikelihood(Likelihood):
    """Base of the count models: support, check and hint for non-negative integers."""

    support = "non-negative integers"

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return ~(_is_integer(x) & (x >= 0))

    def support_hint(self) -> str:
        return "Counts must be whole numbers >= 0: round the data, or choose a Normal likelihood."


class PoissonLikelihood(CountLikelihood):
    """Poisson counts with rate ``softplus(head) + 1e-4``."""

    name = "poisson"
    heads = ("raw_rate",)

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        return dist.Poisson(positive_scale(self.raw_rate(hidden)), validate_args=False).to_event(1)


class NegativeBinomialLikelihood(CountLikelihood):
    """Negative binomial (gamma-Poisson) counts with mean ``m = softplus(head) + 1e-4`` and a
    learned total count (inverse dispersion) per feature ``r = softplus(raw) + 1e-4``: variance
    ``m + m^2 / r``. Pyro's ``NegativeBinomial(r, logits=log m - log r)``."""

    name = "negative-binomial"
    heads = ("raw_mean",)
    per_feature = ("raw_total_count",)

    def total_count_and_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Total counts r (shape (D,)) and logits log m - log r, shape ``(..., D)``."""
        total_count = positive_scale(self.raw_total_count)
        return total_count, positive_scale(self.raw_mean(hidden)).log() - total_count.log()

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        total_count, logits = self.total_count_and_logits(hidden)
        return dist.NegativeBinomial(total_count, logits=logits, validate_args=False).to_event(1)


class ZeroInflatedNegativeBinomialLikelihood(NegativeBinomialLikelihood):
    """Negative binomial counts mixed with extra zeros of probability sigmoid(g_theta(z)), e.g.
    gene expression; mean ``(1 - sigmoid(g)) m``. Pyro's ``ZeroInflatedNegativeBinomial``."""

    name = "zero-inflated-negative-binomial"
    heads = ("raw_mean", "gate_logits")

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        total_count, logits = self.total_count_and_logits(hidden)
        return dist.ZeroInflatedNegativeBinomial(
            total_count, logits=logits, gate_logits=self.gate_logits(hidden), validate_args=False
        ).to_event(1)


class Categorical256Likelihood(Likelihood):
    """Discretised pixels: a 256-way categorical per feature, logits from a linear head of size
    256 D. Data are integer grey levels 0, 1, ..., 255 (map grey levels y in [0, 1] to
    ``round(255 y)``); the mean is the expected level, in the same units."""

    name = "categorical-256"
    support = "integer grey levels 0, 1, ..., 255"
    heads = ("logits",)
    head_width = 256

    def level_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unnormalised log probabilities of the levels, shape ``(..., D, 256)``."""
        return self.logits(hidden).unflatten(-1, (self.num_features, self.head_width))

    def forward(self, hidden: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=self.level_logits(hidden), validate_args=False).to_event(1)

    def mean(self, hidden: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.level_logits(hidden), -1)
        levels = torch.arange(self.head_width, dtype=probabilities.dtype, device=hidden.device)
        return probabilities @ levels

    def out_of_support(self, x: torch.Tensor) -> torch.Tensor:
        return ~(_is_integer(x) & (x >= 0) & (x <= self.head_width - 1))

    def support_hint(self) -> str:
        return (
            "Give grey levels as integers 0..255 (e.g. round(255 * x) for x in [0, 1]), or "
            "choose continuous-bernoulli for grey levels in [0, 1]."
        )


#: Observation models by name, as ``VAEConfig.likelihood`` takes them.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (
        BernoulliLikelihood,
        ContinuousBernoulliLikelihood,
        NormalLikelihood,
        NormalPerFeatureLikelihood,
        NormalFixedLikelihood,
        LaplaceLikelihood,
        StudentTLikelihood,
        PoissonLikelihood,
        NegativeBinomialLikelihood,
        ZeroInflatedNegativeBinomialLikelihood,
        Categorical256Likelihood,
    )
}


def make_likelihood(name: str, in_features: int, num_features: int, **options) -> Likelihood:
    """Build a likelihood head by name; raises ``ValueError`` listing the valid names.

    ``options`` go to the class's constructor, e.g. ``scale=0.1`` for ``normal-fixed``.
    """
    if name not in LIKELIHOODS:
        valid = ", ".join(sorted(LIKELIHOODS))
        raise ValueError(f"unknown likelihood {name!r}; valid names: {valid}")
    return LIKELIHOODS[name](in_features, num_features, **options)
