"""A Pyro model and an amortized guide, fitted by SVI and evaluated per data point.

:class:`LatentVariableModel` is what the built-in :class:`pyrovae.VAE` is made of, and what a
user's own Pyro model gets: the same :meth:`fit` (objectives, checkpoints, resuming,
non-finite guard, compiled steps), the same per-datapoint :meth:`elbo` and importance-sampled
:meth:`evaluate`.

Data convention: the model and guide are called as ``model(*inputs)``, every input a tensor
whose first axis indexes the data points of the plate ``data_plate``.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import torch
from torch import nn

from pyrovae.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from pyrovae.config import TrainConfig
from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.traces import particle_terms
from pyrovae.training import History, fit
from pyrovae.validation import as_data_tensor


class LatentVariableModel(nn.Module):
    """Fit and evaluate a Pyro ``model`` with an amortized ``guide``.

    Parameters
    ----------
    model, guide : torch.nn.Module
        A Pyro model and guide with the same latent sites, all inside the plate
        ``data_plate`` (e.g. :class:`pyrovae.models.base.LocalParamsModule` subclasses, or a
        guide built by :class:`pyrovae.models.autoguide.AmortizedGuide`).
    data_plate : str
        Name of the plate over data points.

    Attributes
    ----------
    history_, train_config_, optimizer_ :
        Record, settings and optimizer of the last :meth:`fit`.
    metadata_ : dict
        Free-form JSON-like information saved with the parameters.
    """

    def __init__(self, model: nn.Module, guide: nn.Module, data_plate: str = "data"):
        super().__init__()
        self.model, self.guide, self.data_plate = model, guide, data_plate
        self.history_: History | None = None
        self.train_config_: TrainConfig | None = None
        self.optimizer_: torch.optim.Optimizer | None = None
        self.saved_optimizer_state_: dict | None = None
        self.metadata_: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- data --------------------------------------------------------------------------
    def inputs(self, *args, name: str = "data") -> tuple[torch.Tensor, ...]:
        """Validated model inputs: numeric, finite, non-empty, with one row per data point,
        on the parameters' device and floating dtype."""
        tensors = tuple(as_data_tensor(arg, f"{name} argument {i}") for i, arg in enumerate(args))
        if not tensors:
            raise ValueError(f"{name}: pass the data tensor(s) the model takes")
        rows = {t.shape[0] if t.dim() else None for t in tensors}
        if len(rows) != 1 or None in rows or 0 in rows:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise ValueError(
                f"{name}: every input needs the same non-zero number of rows, got shapes {shapes}"
            )
        for i, tensor in enumerate(tensors):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} argument {i} contains NaN or infinite values")
        dtype = next(self.parameters()).dtype
        return tuple(t.to(device=self.device, dtype=dtype) for t in tensors)

    def training_inputs(self, data, config: TrainConfig, name: str) -> tuple[torch.Tensor, ...]:
        """Inputs for :func:`pyrovae.training.fit`; ``data`` is a tensor or a tuple of them."""
        if config.binarize != "none":
            raise ValueError("binarize applies to the built-in VAE; binarize the data yourself")
        return self.inputs(*(data if isinstance(data, tuple) else (data,)), name=name)

    # -- fitting -----------------------------------------------------------------------
    def check_objective(self, config: TrainConfig) -> None:
        """Raise if ``config``'s objective cannot fit this model (before anything changes).

        Any objective can try a user's model; :class:`pyrovae.VAE` refuses analytic-KL
        objectives for families without a closed-form KL."""

    def fit(
        self,
        train,
        validation=None,
        checkpoint_path=None,
        resume=False,
        best_path=None,
        **train_options,
    ):
        """Fit by stochastic variational inference; see :class:`pyrovae.config.TrainConfig`
        for ``train_options`` and :func:`pyrovae.training.fit` for checkpointing and resuming.

        ``train`` and ``validation`` are the model's input tensor, or a tuple of them.

        Returns
        -------
        pyrovae.training.History
            Per-epoch train and validation ELBO (nats per data point, higher is better).
        """
        config = TrainConfig.from_dict(train_options)
        return fit(
            self,
            train,
            validation,
            config,
            checkpoint_path=checkpoint_path,
            resume=resume,
            best_path=best_path,
        )

    # -- evaluation --------------------------------------------------------------------
    def elbo_of(
        self,
        inputs: tuple,
        num_samples: int = 1,
        analytic_kl: bool = False,
        seed: int | None = None,
        max_pairs: int = 2**20,
    ) -> torch.Tensor:
        """Per-datapoint ELBO (nats, float64, shape (N,)) of already validated inputs."""
        if seed is not None:
            pyro.set_rng_seed(seed)
        terms = particle_terms(
            self.model,
            self.guide,
            *inputs,
            num_particles=num_samples,
            data_plate=self.data_plate,
            max_pairs=max_pairs,
        )
        per_draw = terms.log_p_obs - terms.kl if analytic_kl else terms.log_weights
        return per_draw.double().mean(0)

    def evaluate_of(self, inputs: tuple, **options):
        """:func:`pyrovae.evaluation.importance.evaluate` of already validated inputs."""
        return evaluate(self.model, self.guide, *inputs, data_plate=self.data_plate, **options)

    def elbo(
        self,
        *args,
        num_samples: int = 1,
        analytic_kl: bool = False,
        seed: int | None = None,
        max_pairs: int = 2**20,
    ) -> torch.Tensor:
        """Per-datapoint evidence lower bound, in nats (higher is better), shape (N,); the
        KL term in closed form with ``analytic_kl`` where the guide and prior allow it."""
        return self.elbo_of(self.inputs(*args), num_samples, analytic_kl, seed, max_pairs)

    def evaluate(
        self,
        *args,
        num_samples: int = 1000,
        ks=(1, 5, 50),
        seed: int | None = None,
        max_pairs: int = 2**20,
        latent_diagnostics: bool = True,
        progress: bool = False,
    ):
        """Importance-sampled log-likelihood, ELBOs and IWAE_k bounds per data point (see
        :func:`pyrovae.evaluation.importance.evaluate`)."""
        return self.evaluate_of(
            self.inputs(*args),
            num_samples=num_samples,
            ks=ks,
            seed=seed,
            max_pairs=max_pairs,
            latent_diagnostics=latent_diagnostics,
            progress=progress,
        )

    # -- files -------------------------------------------------------------------------
    def payload(self, metadata: dict | None = None, training_state: dict | None = None) -> dict:
        """Everything :meth:`save` writes (plain data and tensors)."""
        from pyrovae import __version__

        return {
            "training_state": training_state,
            "metadata": dict(metadata or self.metadata_),
            "library_version": __version__,
            "config": None,
            "model_state": self.state_dict(),
            "train_config": None if self.train_config_ is None else self.train_config_.to_dict(),
            "optimizer_state": None if self.optimizer_ is None else self.optimizer_.state_dict(),
            "history": None if self.history_ is None else list(self.history_.records),
        }

    def save(
        self, path: str | Path, metadata: dict | None = None, training_state: dict | None = None
    ) -> Path:
        """Write parameters, optimizer state and history to one file (atomically); a
        ``training_state`` (from :func:`pyrovae.training.fit`) makes it resumable."""
        return write_checkpoint(self.payload(metadata, training_state), path)

    def check_resumable(self, payload: dict, path) -> None:
        """Raise unless ``payload``'s parameters fit this model exactly (names and shapes)."""
        saved = {name: tuple(t.shape) for name, t in payload["model_state"].items()}
        mine = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        if saved != mine:
            raise ValueError(f"cannot resume: the parameters in {path} do not match this model")

    def load_state(self, path: str | Path) -> LatentVariableModel:
        """Load parameters, history and settings saved by :meth:`save` into this model."""
        payload = read_checkpoint(path, device=self.device)
        try:
            self.check_resumable(payload, path)
            self.load_state_dict(payload["model_state"])
            self.restore_records(payload)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} does not hold a compatible model: {error}") from error
        return self

    def restore_records(self, payload: dict) -> None:
        """Training settings, history, optimizer state and metadata from a saved payload."""
        if payload.get("train_config") is not None:
            self.train_config_ = TrainConfig.from_dict(payload["train_config"])
        if payload.get("history") is not None:
            self.history_ = History([dict(record) for record in payload["history"]])
        optimizer_state = payload.get("optimizer_state")
        if optimizer_state is not None and not isinstance(optimizer_state, dict):
            raise TypeError(f"optimizer state is a {type(optimizer_state).__name__}")
        self.saved_optimizer_state_ = optimizer_state
        self.metadata_ = dict(payload.get("metadata") or {})
