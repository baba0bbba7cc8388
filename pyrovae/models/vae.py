"""The built-in VAE: a Pyro model p(z) p(x|z), an amortized Pyro guide q(z|x), and the
user-facing :class:`VAE` that fits, evaluates, saves and loads them.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import __version__
from pyrovae.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from pyrovae.config import TrainConfig, VAEConfig
from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.traces import particle_terms
from pyrovae.likelihoods import make_likelihood
from pyrovae.models.base import LocalParamsModule
from pyrovae.networks import MLP, GaussianEncoder
from pyrovae.training import History, fit, resolve_device
from pyrovae.validation import check_data

DATA_PLATE = "data"
"""Name of the plate over data points, shared by the model and the guide."""


class VAEModel(LocalParamsModule):
    """Generative model: z ~ Normal(0, I_L), x | z ~ likelihood(decoder(z)).

    ``forward(x)`` scores observed data (sites ``"z"`` and ``"x"`` inside the plate
    ``"data"``); ``forward(None, num_samples=n)`` generates n new data points.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.decoder = MLP(
            config.latent_dim, tuple(reversed(config.hidden_sizes)), config.activation
        )
        self.likelihood = make_likelihood(
            config.likelihood, self.decoder.out_features, config.num_features
        )

    def prior(self, reference: torch.Tensor) -> dist.TorchDistribution:
        """p(z) = Normal(0, I_L), on the device and dtype of ``reference``."""
        zero = reference.new_zeros(())
        return dist.Normal(zero, zero + 1.0).expand([self.latent_dim]).to_event(1)

    def observation(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) with event dimension 1 over the features."""
        return self.likelihood(self.decoder(z))

    def forward(self, x: torch.Tensor | None = None, num_samples: int | None = None):
        reference = x if x is not None else next(self.parameters())
        size = x.shape[0] if x is not None else num_samples
        with pyro.plate(DATA_PLATE, size):
            z = pyro.sample("z", self.prior(reference))
            return pyro.sample("x", self.observation(z), obs=x)


class VAEGuide(LocalParamsModule):
    """Amortized guide q(z|x) = Normal(mu_phi(x), diag sigma_phi(x)^2), site ``"z"``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.encoder = GaussianEncoder(
            config.num_features, config.hidden_sizes, config.latent_dim, config.activation
        )

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def forward(self, x: torch.Tensor, num_samples: int | None = None):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample("z", self.posterior(x))


class VAE(nn.Module):
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
    history_ : pyrovae.training.History or None
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

    def __init__(self, config: VAEConfig | None = None, seed: int | None = None, **options):
        super().__init__()
        if config is None:
            config = VAEConfig.from_dict(options)
        elif options:
            raise TypeError("pass either a VAEConfig or keyword options, not both")
        self.config = config
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.model = VAEModel(config)
            self.guide = VAEGuide(config)
        self.history_ = None
        self.train_config_: TrainConfig | None = None
        self.optimizer_: torch.optim.Optimizer | None = None
        self.saved_optimizer_state_: dict | None = None
        self.metadata_: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_data(self, x, name: str = "data") -> torch.Tensor:
        """Validate x (shape, finiteness, likelihood support) and move it to the model's device."""
        tensor = check_data(x, self.config.num_features, self.model.likelihood, name)
        return tensor.to(device=self.device, dtype=next(self.parameters()).dtype)

    def fit(self, train, validation=None, checkpoint_path=None, resume=False, **train_options):
        """Fit by stochastic variational inference; see :class:`pyrovae.config.TrainConfig`
        for ``train_options`` and :func:`pyrovae.training.fit` for checkpointing and resuming.

        Returns
        -------
        pyrovae.training.History
            Per-epoch train and validation ELBO (nats per data point, higher is better).
        """
        config = TrainConfig.from_dict(train_options)
        return fit(self, train, validation, config, checkpoint_path=checkpoint_path, resume=resume)

    @torch.no_grad()
    def encode(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of q(z|x), each of shape (N, L)."""
        return self.guide.encoder(self.check_data(x))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Expected observation E[x|z] (pixel probabilities for Bernoulli), shape (N, D)."""
        z = torch.as_tensor(z, device=self.device, dtype=next(self.parameters()).dtype)
        return self.model.likelihood.mean(self.model.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x) -> torch.Tensor:
        """Decoder mean at the posterior mean, E[x | z = mu_phi(x)], shape (N, D)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(
        self, num_samples: int, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw z ~ p(z) and x ~ p(x|z).

        Returns
        -------
        means : torch.Tensor
            E[x|z] for each draw, shape (num_samples, D).
        observations : torch.Tensor
            One draw x ~ p(x|z) per z, shape (num_samples, D).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if seed is not None:
            pyro.set_rng_seed(seed)
        reference = next(self.parameters())
        z = self.model.prior(reference).sample((num_samples,))
        hidden = self.model.decoder(z)
        return self.model.likelihood.mean(hidden), self.model.likelihood(hidden).sample()

    def elbo(
        self,
        x,
        num_samples: int = 1,
        analytic_kl: bool = False,
        seed: int | None = None,
        max_pairs: int = 2**20,
    ) -> torch.Tensor:
        """Per-datapoint evidence lower bound, in nats (higher is better), shape (N,).

        Parameters
        ----------
        x : array-like of shape (N, D)
            Data.
        num_samples : int
            Draws z ~ q(z|x) averaged per data point.
        analytic_kl : bool
            Use the closed-form KL(q(z|x) || p(z)) instead of its Monte Carlo estimate.
        seed : int, optional
            Fix the draws (``pyro.set_rng_seed``), for reproducible comparisons.
        max_pairs : int
            Memory bound: most (draw, data point) pairs evaluated at once.
        """
        data = self.check_data(x)
        if seed is not None:
            pyro.set_rng_seed(seed)
        terms = particle_terms(
            self.model,
            self.guide,
            data,
            num_particles=num_samples,
            data_plate=DATA_PLATE,
            max_pairs=max_pairs,
            max_plate_nesting=1,
        )
        per_draw = terms.log_p_obs - terms.kl if analytic_kl else terms.log_weights
        return per_draw.double().mean(0)

    def evaluate(
        self,
        x,
        num_samples: int = 1000,
        ks=(1, 5, 50),
        seed: int | None = None,
        max_pairs: int = 2**20,
        latent_diagnostics: bool = True,
        progress: bool = False,
    ):
        """Importance-sampled log-likelihood, ELBOs and IWAE_k bounds per data point.

        See :func:`pyrovae.evaluation.importance.evaluate`; this traces the same Pyro
        model and guide that training used.

        Returns
        -------
        pyrovae.evaluation.importance.EvaluationResult
        """
        return evaluate(
            self.model,
            self.guide,
            self.check_data(x),
            num_samples=num_samples,
            ks=ks,
            data_plate=DATA_PLATE,
            max_pairs=max_pairs,
            seed=seed,
            latent_diagnostics=latent_diagnostics,
            progress=progress,
        )

    def save(
        self, path: str | Path, metadata: dict | None = None, training_state: dict | None = None
    ) -> Path:
        """Write config, parameters, optimizer state and history to one file (atomically).

        ``metadata`` (plain JSON-like values, e.g. the dataset name) is stored alongside and
        restored as ``metadata_``. ``training_state`` (epoch and RNG states, written by
        :func:`pyrovae.training.fit`) makes the file a checkpoint that training can resume.
        """
        payload = {
            "training_state": training_state,
            "metadata": dict(metadata or self.metadata_),
            "library_version": __version__,
            "config": self.config.to_dict(),
            "model_state": self.state_dict(),
            "train_config": None if self.train_config_ is None else self.train_config_.to_dict(),
            "optimizer_state": None if self.optimizer_ is None else self.optimizer_.state_dict(),
            "history": None if self.history_ is None else list(self.history_.records),
        }
        return write_checkpoint(payload, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VAE:
        """Load a model saved by :meth:`save`; never executes code from the file."""
        device = resolve_device(device)
        payload = read_checkpoint(path, device=device)
        try:
            vae = cls(VAEConfig.from_dict(payload["config"]))
            vae.load_state_dict(payload["model_state"])
            if payload.get("train_config") is not None:
                vae.train_config_ = TrainConfig.from_dict(payload["train_config"])
            if payload.get("history") is not None:
                vae.history_ = History([dict(record) for record in payload["history"]])
            optimizer_state = payload.get("optimizer_state")
            if optimizer_state is not None and not isinstance(optimizer_state, dict):
                raise TypeError(f"optimizer state is a {type(optimizer_state).__name__}")
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} does not hold a compatible VAE: {error}") from error
        vae.to(device)
        vae.saved_optimizer_state_ = payload.get("optimizer_state")
        vae.metadata_ = dict(payload.get("metadata") or {})
        return vae
