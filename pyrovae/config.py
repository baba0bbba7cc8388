"""Declarative configuration: what model to build (:class:`VAEConfig`) and how to fit it
(:class:`TrainConfig`). Both validate on construction and round-trip through plain dicts
(JSON), rejecting unknown names with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from typing_extensions import Self

from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import ACTIVATIONS
from pyrovae.randomness import check_seed
from pyrovae.validation import normalize_config

_Config = TypeVar("_Config", bound="_DictConfig")


def _require_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; valid names: {', '.join(sorted(choices))}")


def _require_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


def _require_positive_float(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{field} must be a positive number, got {value!r}")


def _check_device_name(name: str) -> None:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (availability is checked by
    :func:`pyrovae.training.resolve_device` when fitting)."""
    import torch

    try:
        kind = None if name == "auto" else torch.device(name).type
    except (RuntimeError, TypeError, ValueError):
        kind = "invalid"
    if kind not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


class _DictConfig:
    """Mixin: ``to_dict``/``from_dict`` with a clear error for unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} option(s) {', '.join(map(repr, unknown))}; "
                f"valid names: {', '.join(sorted(names))}"
            )
        return cls(**values)


@dataclass(frozen=True)
class VAEConfig(_DictConfig):
    """Architecture of the built-in VAE.

    Parameters
    ----------
    num_features : int
        Number of observed features D (784 for MNIST, 64 for the 8x8 digits).
    latent_dim : int
        Dimension L of the latent variable z.
    hidden_sizes : tuple of int
        Hidden widths of the encoder MLP; the decoder uses them in reverse order.
    activation : str
        Hidden activation, one of :data:`pyrovae.networks.ACTIVATIONS`.
    likelihood : str
        Observation model, one of :data:`pyrovae.likelihoods.LIKELIHOODS`.
    image_shape : tuple of int or None
        (height, width) when the features are an image: used for plotting and by
        convolutional networks.
    prior : str
        p(z), one of :data:`pyrovae.priors.PRIORS`: ``"normal"``, ``"learned-normal"``,
        ``"mixture"`` (``prior_components`` Gaussians) or ``"vamp"`` (``prior_components``
        pseudo-inputs).
    prior_components : int
        Mixture components of the ``"mixture"`` prior, pseudo-inputs of the ``"vamp"`` prior.
    guide : str
        q(z|x), one of :data:`pyrovae.posteriors.POSTERIORS`: ``"diagonal"``, ``"full"``
        (Cholesky factor), ``"low-rank"`` (rank ``guide_rank`` plus diagonal) or ``"flow"``
        (``num_flows`` conditional inverse autoregressive flows).
    guide_rank : int
        Rank of the ``"low-rank"`` guide's covariance factor.
    num_flows : int
        Number of flows of the ``"flow"`` guide.
    network : str
        ``"mlp"`` or ``"conv"`` (convolutional encoder and decoder; needs ``image_shape``
        with sides divisible by 4, e.g. 28x28 or 8x8).
    condition_dim : int
        Width of an observed condition y (one-hot labels or covariates) given to both the
        encoder and the decoder: a conditional VAE p(x | z, y) q(z | x, y). 0: none.
    top_latent_dim : int or None
        Width of a second stochastic layer z2 above z (= z1): p(z2) p(z1 | z2) p(x | z1) with
        guide q(z1 | x) q(z2 | z1), as in Burda et al. (2016). ``None``: one layer.
    top_hidden_sizes : tuple of int
        Hidden widths of the networks between z1 and z2.
    """

    num_features: int
    latent_dim: int = 2
    hidden_sizes: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    image_shape: tuple[int, int] | None = None
    prior: str = "normal"
    prior_components: int = 10
    guide: str = "diagonal"
    guide_rank: int = 2
    num_flows: int = 2
    network: str = "mlp"
    condition_dim: int = 0
    top_latent_dim: int | None = None
    top_hidden_sizes: tuple[int, ...] = (100, 100)

    def __post_init__(self):
        normalize_config(self)  # NumPy scalars and arrays accepted; floats finite
        _require_positive_int("num_features", self.num_features)
        _require_positive_int("latent_dim", self.latent_dim)
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        for size in self.hidden_sizes:
            _require_positive_int("each hidden size", size)
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_choice("likelihood", self.likelihood, LIKELIHOODS)
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            object.__setattr__(self, "image_shape", shape)
            if len(shape) != 2 or shape[0] * shape[1] != self.num_features:
                raise ValueError(
                    f"image_shape {shape} does not hold num_features={self.num_features} pixels"
                )
        self._check_families()

    def _check_families(self) -> None:
        from pyrovae.posteriors import POSTERIORS
        from pyrovae.priors import PRIORS

        _require_choice("prior", self.prior, PRIORS)
        _require_choice("guide", self.guide, POSTERIORS)
        _require_choice("network", self.network, ("mlp", "conv"))
        for name in ("prior_components", "guide_rank", "num_flows"):
            _require_positive_int(name, getattr(self, name))
        if (
            isinstance(self.condition_dim, bool)
            or not isinstance(self.condition_dim, int)
            or (self.condition_dim < 0)
        ):
            raise ValueError(
                f"condition_dim must be a non-negative integer, got {self.condition_dim!r}"
            )
        object.__setattr__(self, "top_hidden_sizes", tuple(self.top_hidden_sizes))
        for size in self.top_hidden_sizes:
            _require_positive_int("each top hidden size", size)
        conflicts = self._conflicts()
        if conflicts:
            raise ValueError("invalid model specification: " + "; ".join(conflicts))

    def _conflicts(self) -> list[str]:
        """Combinations that cannot be built, each with what to change."""
        problems = []
        if self.network == "conv" and self.image_shape is None:
            problems.append("network 'conv' needs image_shape (e.g. (28, 28)); or use 'mlp'")
        if self.guide == "low-rank" and self.guide_rank >= self.latent_dim:
            problems.append(
                f"guide_rank {self.guide_rank} must be below latent_dim "
                f"{self.latent_dim}; or use guide 'full'"
            )
        if self.prior == "vamp" and self.guide == "flow":
            problems.append(
                "the VampPrior is a mixture of the guide's posteriors, which a flow "
                "guide cannot form; use guide 'diagonal', 'full' or 'low-rank'"
            )
        if self.prior == "vamp" and self.condition_dim:
            problems.append("the VampPrior's pseudo-inputs carry no condition; use another prior")
        if self.top_latent_dim is not None:
            _require_positive_int("top_latent_dim", self.top_latent_dim)
            for field, allowed in (("guide", "diagonal"), ("prior", "normal"), ("network", "mlp")):
                if getattr(self, field) != allowed:
                    problems.append(
                        f"two stochastic layers (top_latent_dim) support {field} "
                        f"{allowed!r} only, not {getattr(self, field)!r}"
                    )
            if self.condition_dim:
                problems.append("two stochastic layers do not take a condition (condition_dim)")
        return problems


@dataclass(frozen=True)
class TrainConfig(_DictConfig):
    """How to fit a model with stochastic variational inference.

    Parameters
    ----------
    objective : str
        Name in :data:`pyrovae.objectives.OBJECTIVES`, e.g. ``"trace_elbo"`` (Monte Carlo KL),
        ``"trace_meanfield_elbo"`` (analytic KL), ``"iwae"``, ``"renyi"``, ``"stl"``,
        ``"dreg"``, ``"annealed_meanfield_elbo"``.
    num_particles : int
        Samples of z per data point per step (vectorized).
    epochs : int
        Passes over the training data.
    batch_size : int
        Data points per step.
    learning_rate : float
        Adam step size.
    clip_norm : float or None
        Clip the gradient's global 2-norm to this value; ``None`` disables clipping.
    binarize : str
        ``"none"``, ``"static"`` (threshold at 0.5 once) or ``"dynamic"`` (a fresh Bernoulli
        draw of every batch, for grey-level data with a Bernoulli likelihood).
    seed : int
        Seeds torch, NumPy and Python's RNGs, the data order and the binarization draws.
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    progress : bool
        Print one line per epoch, and a progress bar per epoch when stderr is a terminal.
    checkpoint_every : int
        With a checkpoint path, write a checkpoint every this many epochs (and at the end).
    on_nonfinite : str
        What to do when a step's loss or gradient norm is NaN or infinite: ``"raise"`` (stop
        with an error naming the epoch and step; the last checkpoint stays intact) or
        ``"rollback"`` (restore the state at the start of the epoch, multiply the learning
        rate by ``rollback_factor`` and repeat the epoch, at most ``max_rollbacks`` times).
    rollback_factor : float
        Learning-rate multiplier applied at each rollback, in (0, 1).
    max_rollbacks : int
        Rollbacks allowed over the whole fit before giving up with the error.
    compile : str
        ``"auto"`` (default: ``"graph"`` when the model and guide trace, checked on two
        minibatches before training, else ``"none"`` with a one-line warning), ``"none"``
        (eager Pyro), ``"graph"`` (trace the loss and gradients once per batch shape into an
        ATen graph and replay it; Pyro's ELBOs are replaced by their equal-valued traceable
        equivalents) or ``"inductor"`` (also ``torch.compile`` it). See
        :mod:`pyrovae.compiled`.
    renyi_alpha : float
        Order alpha of the ``"renyi"`` objective.
    beta, kl_warmup_epochs, free_bits : float, int, float
        KL weight, linear KL warm-up length (epochs) and free bits (nats per latent
        dimension) of the ``"annealed_meanfield_elbo"`` objective.
    lr_schedule : str
        ``"constant"`` or ``"plateau"``: multiply the learning rate by ``lr_decay`` after
        ``lr_patience`` epochs without a better validation ELBO, and stop (converged) when
        a further decay would go below ``min_learning_rate``; ``epochs`` is then a maximum.
        Needs validation data. See :mod:`pyrovae.schedules`.
    lr_decay, lr_patience, min_learning_rate : float, int, float
        Settings of the ``"plateau"`` schedule.
    """

    objective: str = "trace_elbo"
    num_particles: int = 1
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    clip_norm: float | None = None
    binarize: str = "none"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    checkpoint_every: int = 1
    on_nonfinite: str = "raise"
    rollback_factor: float = 0.5
    max_rollbacks: int = 3
    compile: str = "auto"
    renyi_alpha: float = 0.5
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    free_bits: float = 0.0
    lr_schedule: str = "constant"
    lr_decay: float = 0.5
    lr_patience: int = 10
    min_learning_rate: float = 1e-5

    def objective_options(self) -> dict[str, Any]:
        """Options of :attr:`objective`, as :func:`pyrovae.objectives.make_objective` takes them."""
        from pyrovae.objectives import OBJECTIVE_OPTIONS

        return {name: getattr(self, name) for name in OBJECTIVE_OPTIONS.get(self.objective, ())}

    def __post_init__(self):
        from pyrovae.objectives import OBJECTIVES

        normalize_config(self)  # NumPy scalars accepted; strings, booleans, finite floats
        _require_choice("objective", self.objective, OBJECTIVES)
        _require_choice("binarize", self.binarize, ("none", "static", "dynamic"))
        _require_positive_int("num_particles", self.num_particles)
        _require_positive_int("epochs", self.epochs)
        _require_positive_int("batch_size", self.batch_size)
        _require_positive_float("learning_rate", self.learning_rate)
        if self.clip_norm is not None:
            _require_positive_float("clip_norm", self.clip_norm)
        object.__setattr__(self, "seed", check_seed(self.seed))  # before anything reseeds
        _check_device_name(self.device)
        _require_positive_int("checkpoint_every", self.checkpoint_every)
        _require_choice("on_nonfinite", self.on_nonfinite, ("raise", "rollback"))
        if not 0 < self.rollback_factor < 1:
            raise ValueError(f"rollback_factor must lie in (0, 1), got {self.rollback_factor!r}")
        _require_positive_int("max_rollbacks", self.max_rollbacks)
        _require_choice("compile", self.compile, ("auto", "none", "graph", "inductor"))
        _require_choice("lr_schedule", self.lr_schedule, ("constant", "plateau"))
        if not 0 < self.lr_decay < 1:
            raise ValueError(f"lr_decay must lie in (0, 1), got {self.lr_decay!r}")
        _require_positive_int("lr_patience", self.lr_patience)
        _require_positive_float("min_learning_rate", self.min_learning_rate)
        self._check_objective_options()

    def _check_objective_options(self) -> None:
        from pyrovae.objectives import OBJECTIVE_OPTIONS, make_objective

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        taken = OBJECTIVE_OPTIONS.get(self.objective, ())
        stray = [
            name
            for options in OBJECTIVE_OPTIONS.values()
            for name in options
            if name not in taken and getattr(self, name) != defaults[name]
        ]
        if stray:
            raise ValueError(
                f"option(s) {', '.join(sorted(set(stray)))} do not apply to objective "
                f"{self.objective!r}"
            )
        make_objective(self.objective, self.num_particles, **self.objective_options())

    def resumable_from(self, saved: TrainConfig) -> None:
        """Raise ``ValueError`` unless a run saved with ``saved`` can continue under ``self``:
        every setting equal except ``epochs`` (may grow), ``progress`` and ``checkpoint_every``."""
        free = {"epochs", "progress", "checkpoint_every"}
        differing = [
            f"{name} ({getattr(saved, name)!r} saved, {getattr(self, name)!r} now)"
            for name in (f.name for f in dataclasses.fields(self))
            if name not in free and getattr(saved, name) != getattr(self, name)
        ]
        if differing:
            raise ValueError("cannot resume: training settings differ: " + ", ".join(differing))
