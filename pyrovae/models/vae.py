"""The built-in VAE: a Pyro model p(z) p(x|z), an amortized Pyro guide q(z|x), and the
user-facing :class:`VAE` that fits, evaluates, saves and loads them.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.util
import torch
from torch import nn

from pyrovae.checkpoint import CheckpointError, check_optimizer_state, read_checkpoint
from pyrovae.config import TrainConfig, VAEConfig
from pyrovae.data import threshold
from pyrovae.likelihoods import make_likelihood
from pyrovae.models.base import DATA_PLATE, LocalParamsModule
from pyrovae.models.hierarchical import TwoLayerGuide, TwoLayerModel
from pyrovae.models.latent_variable import LatentVariableModel
from pyrovae.networks import MLP, ConvDecoder, ConvEncoder
from pyrovae.objectives import ANALYTIC_KL_OBJECTIVES
from pyrovae.posteriors import POSTERIORS, Posterior, posterior_moments
from pyrovae.priors import PRIORS, MixturePrior, Prior, VampPrior
from pyrovae.randomness import check_seed
from pyrovae.training import resolve_device
from pyrovae.validation import (
    as_data_tensor,
    cast_checked,
    check_data,
    check_dense,
    check_finite,
    positive_int,
)


def join_condition(tensor: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """Append the condition y to the last axis of ``tensor`` (broadcast over draw dims)."""
    if condition is None:
        return tensor
    return torch.cat([tensor, condition.expand(tensor.shape[:-1] + condition.shape[-1:])], -1)


def encoder_trunk(config: VAEConfig) -> nn.Module:
    """The guide's network from x (and the condition) to hidden features."""
    if config.network == "conv":
        return ConvEncoder(
            config.image_shape,
            out_features=config.hidden_sizes[-1] if config.hidden_sizes else 256,
            activation=config.activation,
            extra_features=config.condition_dim,
        )
    return MLP(config.num_features + config.condition_dim, config.hidden_sizes, config.activation)


def decoder_trunk(config: VAEConfig, latent_dim: int) -> nn.Module:
    """The model's network from z (and the condition) to the likelihood head's features."""
    if config.network == "conv":
        return ConvDecoder(
            latent_dim + config.condition_dim, config.image_shape, activation=config.activation
        )
    return MLP(
        latent_dim + config.condition_dim, tuple(reversed(config.hidden_sizes)), config.activation
    )


def make_posterior(config: VAEConfig, trunk: nn.Module) -> Posterior:
    options = {"low-rank": {"rank": config.guide_rank}, "flow": {"num_flows": config.num_flows}}
    return POSTERIORS[config.guide](trunk, config.latent_dim, **options.get(config.guide, {}))


def make_prior(config: VAEConfig, posterior: Posterior) -> Prior:
    if config.prior == "vamp":
        return VampPrior(
            config.latent_dim, config.num_features, posterior.distribution, config.prior_components
        )
    if config.prior == "mixture":
        return MixturePrior(config.latent_dim, config.prior_components)
    return PRIORS[config.prior](config.latent_dim)


class VAEModel(LocalParamsModule):
    """Generative model: z ~ p(z) (a :mod:`pyrovae.priors` family), x | z ~ likelihood(decoder(z)).

    ``forward(x)`` scores observed data (sites ``"z"`` and ``"x"`` inside the plate
    ``"data"``); ``forward(None, num_samples=n)`` generates n new data points. With a
    condition y (``config.condition_dim > 0``) the decoder sees (z, y).
    """

    def __init__(self, config: VAEConfig, posterior: Posterior):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.latent_prior = make_prior(config, posterior)
        self.decoder = decoder_trunk(config, config.latent_dim)
        self.likelihood = make_likelihood(
            config.likelihood,
            self.decoder.out_features,
            config.num_features,
            head=self.decoder.make_head,
        )

    def prior(self, reference: torch.Tensor) -> dist.TorchDistribution:
        """p(z), on the device and dtype of ``reference``."""
        return self.latent_prior(reference)

    def observation(self, z: torch.Tensor, condition: torch.Tensor | None = None):
        """p(x | z) with event dimension 1 over the features."""
        return self.likelihood(self.decoder(join_condition(z, condition)))

    def generate(self, num_samples: int, condition: torch.Tensor | None = None):
        """(E[x|z], x) for z ~ p(z), ``num_samples`` of each."""
        z = self.prior(next(self.parameters())).sample((num_samples,))
        hidden = self.decoder(join_condition(z, condition))
        return self.likelihood.mean(hidden), self.likelihood(hidden).sample()

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(join_condition(z, condition)))

    def forward(self, x=None, condition=None, num_samples: int | None = None):
        reference = x if x is not None else next(self.parameters())
        size = x.shape[0] if x is not None else num_samples
        with pyro.plate(DATA_PLATE, size):
            z = pyro.sample("z", self.prior(reference))
            return pyro.sample("x", self.observation(z, condition), obs=x)


class VAEGuide(LocalParamsModule):
    """Amortized guide q(z|x) (a :mod:`pyrovae.posteriors` family), site ``"z"``.

    ``encoder`` is the posterior family with its trunk: ``encoder(x)`` returns the family's
    parameters (``(loc, scale)`` for the diagonal Gaussian), ``encoder.distribution(x)``
    the distribution.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.encoder = make_posterior(config, encoder_trunk(config))

    def posterior(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        return self.encoder.distribution(join_condition(x, condition))

    def forward(self, x, condition=None, num_samples: int | None = None):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample("z", self.posterior(x, condition))


def build_model_and_guide(config: VAEConfig) -> tuple[LocalParamsModule, LocalParamsModule]:
    """The Pyro model and guide a :class:`VAEConfig` describes."""
    if config.top_latent_dim is not None:
        return TwoLayerModel(config), TwoLayerGuide(config)
    guide = VAEGuide(config)
    return VAEModel(config, guide.encoder), guide


class VAE(LatentVariableModel):
    """Variational autoencoder fitted by amortized variational inference.

    Parameters
    ----------
    config : VAEConfig, optional
        Architecture. When omitted, keyword ``options`` build one, e.g.
        ``VAE(num_features=64, latent_dim=2)``.
    seed : int, optional
        Seed of the initial weights (drawn from a private copy of torch's RNG, so the global
        stream is left as it was); ``None`` draws them from the global stream.

    Attributes
    ----------
    model : VAEModel
        The Pyro model p(z) p(x|z).
    guide : VAEGuide
        The Pyro guide q(z|x).
    history_ : pyrovae.history.History or None
        Per-epoch record of the last :meth:`fit`.
    train_config_ : TrainConfig or None
        Settings of the last :meth:`fit`.
    optimizer_ : torch.optim.Optimizer or None
        The optimizer of the last :meth:`fit`, kept so that saving captures its state.

    Examples
    --------
    >>> from pyrovae import VAE
    >>> from pyrovae.data import load_digits
    >>> digits = load_digits()
    >>> vae = VAE(num_features=64, latent_dim=4, hidden_sizes=(128,), likelihood="bernoulli")
    >>> history = vae.fit(digits.train, digits.valid, binarize="dynamic", epochs=2, progress=False)
    """

    max_plate_nesting = 1  # the plate over data points; the likelihoods add none

    def __init__(self, config: VAEConfig | None = None, seed: int | None = None, **options):
        if config is None:
            config = VAEConfig.from_dict(options)
        elif options:
            raise TypeError("pass either a VAEConfig or keyword options, not both")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(check_seed(seed))
            model, guide = build_model_and_guide(config)
        super().__init__(model, guide, DATA_PLATE)
        self.config = config

    def check_data(self, x, name: str = "data") -> torch.Tensor:
        """Validate x (shape, finiteness, likelihood support) and move it to the model's device."""
        dtype = next(self.parameters()).dtype
        tensor = check_data(x, self.config.num_features, self.model.likelihood, name, dtype)
        return tensor.to(device=self.device, dtype=dtype)

    def inputs(self, x, condition=None, name: str = "data") -> tuple[torch.Tensor, ...]:
        """The model's arguments: validated ``(x,)`` or, for a conditional VAE, ``(x, y)``."""
        return self.with_condition(self.check_data(x, name), condition, name)

    def training_inputs(self, data, config: TrainConfig, name: str) -> tuple[torch.Tensor, ...]:
        """x (binarized as ``config.binarize`` asks) or ``(x, y)``, validated for fitting."""
        x, condition = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
        if config.binarize == "none":
            return self.with_condition(self.check_data(x, name), condition, name)
        tensor = check_data(x, self.config.num_features, None, name)
        if bool(((tensor < 0) | (tensor > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1] to be binarized (got values outside)")
        tensor = tensor.to(device=self.device, dtype=next(self.parameters()).dtype)
        if config.binarize == "static":
            tensor = threshold(tensor)
        return self.with_condition(tensor, condition, name)

    def check_objective(self, config: TrainConfig) -> None:
        """Analytic-KL objectives need a guide and prior with a closed-form KL."""
        if config.objective not in ANALYTIC_KL_OBJECTIVES:
            return
        lacking = [
            f"{kind} {name!r}"
            for kind, name, registry in (
                ("guide", self.config.guide, POSTERIORS),
                ("prior", self.config.prior, PRIORS),
            )
            if not registry[name].closed_form_kl
        ]
        if lacking:
            raise ValueError(
                f"objective {config.objective!r} needs the KL in closed form, which the "
                f"{' and the '.join(lacking)} do not have; use 'trace_elbo' (or 'iwae', "
                "'stl', 'dreg')"
            )

    def with_condition(self, data: torch.Tensor, condition, name: str = "data"):
        """``(data,)``, or ``(data, y)`` with the condition y checked against the data."""
        if not self.config.condition_dim:
            if condition is not None:
                raise ValueError("this model takes no condition (condition_dim is 0)")
            return (data,)
        if condition is None:
            raise ValueError(
                f"this conditional VAE needs a condition of width "
                f"{self.config.condition_dim} for every data point"
            )
        condition = check_data(
            condition, self.config.condition_dim, None, f"{name} condition", data.dtype
        )
        if condition.shape[0] != data.shape[0]:
            raise ValueError(
                f"{name} has {data.shape[0]} data points but its condition has "
                f"{condition.shape[0]} rows"
            )
        return data, condition.to(data)

    def _condition(self, condition, rows: int) -> torch.Tensor | None:
        """The condition y for ``rows`` points: one row for all, or one row each."""
        if condition is None:
            return None
        width = self.config.condition_dim
        tensor = check_dense(as_data_tensor(condition, "condition"), "condition")
        if tuple(tensor.shape) not in {(width,), (1, width), (rows, width)}:
            raise ValueError(
                f"condition must have shape ({rows}, {width}) (one row per point) or "
                f"({width},) (one for all), got {tuple(tensor.shape)}"
            )
        return self._model_tensor(tensor, "condition").expand(rows, width)

    def _latent_codes(self, z) -> torch.Tensor:
        """z checked to be (N, L) with L the model's latent width, finite, on its device."""
        width = self.config.latent_dim
        tensor = check_dense(as_data_tensor(z, "z"), "z")
        if tensor.dim() != 2 or tensor.shape[1] != width or tensor.shape[0] == 0:
            raise ValueError(
                f"z must have shape (num_points, {width}), one row of the model's {width} "
                f"latent dimensions per point; got shape {tuple(tensor.shape)}"
            )
        return self._model_tensor(tensor, "z")

    def _model_tensor(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """``tensor`` (finite) in the model's dtype, on its device."""
        dtype = next(self.parameters()).dtype
        return cast_checked(check_finite(tensor, name), dtype, name).to(self.device)

    @torch.no_grad()
    def encode(self, x, condition=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of q(z|x), each of shape (N, L) (Monte Carlo
        over 256 draws for flow guides, whose moments have no closed form)."""
        return posterior_moments(self.guide.posterior(*self.inputs(x, condition)))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, condition=None) -> torch.Tensor:
        """Expected observation E[x|z] (pixel probabilities for Bernoulli), shape (N, D), for
        latent codes z of shape (N, L)."""
        z = self._latent_codes(z)
        return self.model.decode(z, self._condition(condition, z.shape[0]))

    @torch.no_grad()
    def reconstruct(self, x, condition=None) -> torch.Tensor:
        """Decoder mean at the posterior mean, E[x | z = mu_phi(x)], shape (N, D)."""
        return self.decode(self.encode(x, condition)[0], condition)

    @torch.no_grad()
    def sample(
        self, num_samples: int, seed: int | None = None, condition=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw z ~ p(z) and x ~ p(x|z) (given ``condition`` for a conditional VAE: one row
        for all samples or one per sample).

        Returns
        -------
        means : torch.Tensor
            E[x|z] for each draw, shape (num_samples, D).
        observations : torch.Tensor
            One draw x ~ p(x|z) per z, shape (num_samples, D).
        """
        num_samples = positive_int(num_samples, "num_samples")
        if bool(self.config.condition_dim) != (condition is not None):
            raise ValueError("pass a condition exactly when the model is conditional")
        if seed is not None:
            pyro.set_rng_seed(check_seed(seed))
        return self.model.generate(num_samples, self._condition(condition, num_samples))

    def elbo(
        self,
        x,
        num_samples: int = 1,
        analytic_kl: bool = False,
        seed: int | None = None,
        max_pairs: int = 2**20,
        *,
        condition=None,
    ) -> torch.Tensor:
        """Per-datapoint evidence lower bound, in nats (higher is better), shape (N,).

        Parameters
        ----------
        x : array-like of shape (N, D)
            Data.
        condition : array-like of shape (N, C), optional
            The condition y of each data point, for a conditional VAE.
        num_samples : int
            Draws z ~ q(z|x) averaged per data point.
        analytic_kl : bool
            Use the closed-form KL(q(z|x) || p(z)) instead of its Monte Carlo estimate.
        seed : int, optional
            Fix the draws (``pyro.set_rng_seed``), for reproducible comparisons.
        max_pairs : int
            Memory bound: most (draw, data point) pairs evaluated at once.
        """
        inputs = self.inputs(x, condition)
        state = pyro.util.get_rng_state()
        values = self.elbo_of(inputs, num_samples, analytic_kl, seed, max_pairs)
        try:
            return self._finite_bound(values, inputs[0])
        except ValueError:
            pyro.util.set_rng_state(state)  # a refused call leaves the random streams alone
            raise

    def _finite_bound(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``values`` (per-datapoint bounds), or ``ValueError`` where one is NaN or
        infinite: the ELBO of finite data under this model is finite, so such a value means
        the network's arithmetic overflowed (data far from the scale it works at)."""
        bad = ~torch.isfinite(values)
        if not bool(bad.any()):
            return values
        first = int(bad.nonzero()[0])
        largest = float(x[first].abs().max())
        raise ValueError(
            f"the ELBO is {float(values[first])} for {int(bad.sum())} of {len(values)} data "
            f"points (first: point {first}, largest |x| there {largest:.3g}): the model's "
            f"{str(x.dtype).removeprefix('torch.')} arithmetic overflows on data this large; "
            "rescale the data (e.g. to unit variance) before fitting and evaluating"
        )

    def evaluate(
        self,
        x,
        num_samples: int = 1000,
        ks=(1, 5, 50),
        seed: int | None = None,
        max_pairs: int = 2**20,
        latent_diagnostics: bool = True,
        progress: bool = False,
        memory_budget: int | None = None,
        drop_large_ks: bool = False,
        float64_fallback: bool = True,
        *,
        condition=None,
    ):
        """Importance-sampled log-likelihood, ELBOs and IWAE_k bounds per data point.

        See :func:`pyrovae.evaluation.importance.evaluate`; this traces the same Pyro
        model and guide that training used.

        Returns
        -------
        pyrovae.evaluation.importance.EvaluationResult
        """
        return self.evaluate_of(
            self.inputs(x, condition),
            num_samples=num_samples,
            ks=ks,
            max_pairs=max_pairs,
            seed=seed,
            latent_diagnostics=latent_diagnostics,
            progress=progress,
            memory_budget=memory_budget,
            drop_large_ks=drop_large_ks,
            float64_fallback=float64_fallback,
        )

    def payload(
        self,
        metadata: dict | None = None,
        training_state: dict | None = None,
        include_training_state: bool = True,
    ) -> dict:
        """What :meth:`save` writes: also the config, so that :meth:`load` can rebuild."""
        payload = super().payload(metadata, training_state, include_training_state)
        return {**payload, "config": self.config.to_dict()}

    def check_resumable(self, payload: dict, path) -> None:
        """Raise unless ``payload`` holds this architecture and an optimizer state that fits
        its parameters."""
        if payload.get("config") is None:
            raise ValueError(f"cannot resume: {path} does not hold a built-in VAE")
        if VAEConfig.from_dict(payload["config"]) != self.config:
            raise ValueError(
                f"cannot resume: the model in {path} has config {payload['config']}, "
                f"not {self.config.to_dict()}"
            )
        check_optimizer_state(payload.get("optimizer_state"), self.parameters(), path)

    @classmethod
    def load(  # type: ignore[override]
        cls, path: str | Path, device: str | torch.device = "cpu", allow_nonfinite: bool = False
    ) -> VAE:
        """Load a model saved by :meth:`save`; never executes code from the file. The
        optimizer and resume state come along: saving it again writes them back. NaN or
        infinite parameters are refused unless ``allow_nonfinite``."""
        try:
            device = resolve_device(device)
        except RuntimeError:  # a name torch does not know
            raise ValueError(
                f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from None
        payload = read_checkpoint(path, device=device, allow_nonfinite=allow_nonfinite)
        if "config" in payload and payload["config"] is None:  # as LatentVariableModel saves
            raise CheckpointError(
                f"{path} holds a model built from your own Pyro code (LatentVariableModel), "
                "not a built-in VAE: load it with LatentVariableModel.load(path, model, guide)"
            )
        try:
            vae = cls(VAEConfig.from_dict(payload["config"]))
            vae.load_state_dict(payload["model_state"])
            vae.restore_records(payload)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} does not hold a compatible VAE: {error}") from error
        check_optimizer_state(vae.saved_optimizer_state_, vae.parameters(), path)
        return vae.to(device)
