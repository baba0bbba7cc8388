"""Learning-rate schedules for :func:`pyrovae.training.fit`, with state that checkpoints.

``"constant"`` keeps Adam's step size. ``"plateau"`` multiplies it by ``lr_decay`` whenever
the validation ELBO has not improved for ``lr_patience`` epochs and ends training
(converged) when a further decay would take it below ``min_learning_rate``: a fit to
convergence on the validation ELBO, with the best epoch remembered.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class PlateauSchedule:
    """Reduce-on-plateau state: the best validation ELBO (nats per data point, higher is
    better), its epoch, the epochs since, and whether training has converged."""

    decay: float
    patience: int
    min_learning_rate: float
    best_elbo: float = -math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    converged: bool = False

    def step(self, epoch: int, valid_elbo: float, optimizer, adjust: bool = True) -> bool:
        """Record one epoch's validation ELBO; with ``adjust``, lower the optimizer's step
        size after ``patience`` epochs without improvement. Returns whether the epoch is the
        best so far."""
        if valid_elbo > self.best_elbo:
            self.best_elbo, self.best_epoch = valid_elbo, epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        if adjust and self.epochs_without_improvement >= self.patience:
            self.epochs_without_improvement = 0
            current = optimizer.param_groups[0]["lr"]
            lowered = current * self.decay
            if lowered < self.min_learning_rate * (1 - 1e-9):
                self.converged = True
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lowered
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
