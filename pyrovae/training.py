"""Fitting by stochastic variational inference: minibatch SVI with a Pyro ELBO and Adam.

The objective's ``__call__(model, guide)`` gives a :class:`torch.nn.Module` (Pyro's
``ELBOModule``) whose forward pass is the differentiable loss, so one ordinary
:class:`torch.optim.Adam` updates all parameters of model and guide together. Nothing is
registered in Pyro's global parameter store.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.config import TrainConfig
from pyrovae.data import binarize, threshold
from pyrovae.objectives import ANALYTIC_KL_OBJECTIVES, make_objective

HISTORY_COLUMNS = ("epoch", "train_elbo", "valid_elbo", "seconds")


@dataclass
class History:
    """Per-epoch training record.

    ``train_elbo`` is the average over the epoch's steps of the minibatch ELBO per data
    point; ``valid_elbo`` the ELBO per data point on the validation data after the epoch
    (one draw per point, analytic KL when the objective uses it). Both in nats, higher is
    better; ``valid_elbo`` is ``None`` without validation data.
    """

    records: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def column(self, name: str) -> list:
        return [record[name] for record in self.records]

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.records)

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(self.records)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else CPU; other names are checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def prepare_data(vae, x, config: TrainConfig, name: str) -> torch.Tensor:
    """Validate data for fitting (after static binarization, if requested)."""
    if x is None:
        return None
    tensor = vae.check_data(x, name) if config.binarize == "none" else _binarizable(vae, x, name)
    if config.binarize == "static":
        tensor = threshold(tensor)
    return tensor


def _binarizable(vae, x, name: str) -> torch.Tensor:
    from pyrovae.validation import check_data

    tensor = check_data(x, vae.config.num_features, None, name)
    if bool(((tensor < 0) | (tensor > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1] to be binarized (got values outside)")
    return tensor


def fit(vae, train, validation, config: TrainConfig) -> History:
    """Fit ``vae`` (a :class:`pyrovae.VAE`) and return its :class:`History`.

    All inputs are validated before any parameter, RNG or optimizer state changes.
    """
    device = resolve_device(config.device)
    train = prepare_data(vae, train, config, "training data")
    validation = prepare_data(vae, validation, config, "validation data")
    if config.batch_size > train.shape[0]:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {train.shape[0]} training data points"
        )

    pyro.set_rng_seed(config.seed)
    vae.to(device)
    train = train.to(device=device, dtype=next(vae.parameters()).dtype)
    if validation is not None:
        validation = validation.to(train)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    loss_module = make_objective(config.objective, config.num_particles)(vae.model, vae.guide)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.learning_rate)
    vae.optimizer_, vae.train_config_ = optimizer, config
    history = History()
    vae.history_ = history
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_elbo = _train_epoch(loss_module, optimizer, train, config, generator, epoch)
        record = {
            "epoch": epoch,
            "train_elbo": train_elbo,
            "valid_elbo": _validation_elbo(vae, validation, config),
            "seconds": time.perf_counter() - started,
        }
        history.records.append(record)
        if config.progress:
            tqdm.write(_describe(record, config.epochs))
    return history


def _describe(record: dict, epochs: int) -> str:
    valid = "" if record["valid_elbo"] is None else f", valid ELBO {record['valid_elbo']:9.3f}"
    return (
        f"epoch {record['epoch']:>4}/{epochs}: train ELBO {record['train_elbo']:9.3f}{valid} "
        f"nats/point ({record['seconds']:.2f} s)"
    )


def _train_epoch(
    loss_module, optimizer, train, config: TrainConfig, generator, epoch: int
) -> float:
    order = torch.randperm(train.shape[0], device=train.device, generator=generator)
    batches = order.split(config.batch_size)
    total = torch.zeros((), device=train.device, dtype=torch.float64)
    bar = tqdm(
        batches, desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False
    )
    for step, index in enumerate(bar):
        batch = train[index]
        if config.binarize == "dynamic":
            batch = binarize(batch, generator=generator)
        with pyro.validation_enabled(epoch == 1 and step == 0):
            loss = loss_module(batch) / batch.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], config.clip_norm)
        optimizer.step()
        total += loss.detach() * batch.shape[0]
    train_elbo = -float(total) / train.shape[0]
    if not torch.isfinite(torch.tensor(train_elbo)):
        raise FloatingPointError(
            f"the training loss became NaN or infinite during epoch {epoch}; "
            "lower the learning rate or set clip_norm"
        )
    return train_elbo


def _validation_elbo(vae, validation, config: TrainConfig) -> float | None:
    if validation is None:
        return None
    if config.binarize == "dynamic":
        generator = torch.Generator(device=validation.device).manual_seed(config.seed + 1)
        validation = binarize(validation, generator=generator)
    analytic = config.objective in ANALYTIC_KL_OBJECTIVES
    return float(vae.elbo(validation, num_samples=1, analytic_kl=analytic).mean())
