"""The plateau learning-rate schedule: decays after `lr_patience` epochs without a better
validation ELBO, stops when converged, keeps the best epoch's model, resumes bitwise."""

from __future__ import annotations

import pytest

from pyrovae import VAE
from pyrovae.data import load_digits
from pyrovae.schedules import PlateauSchedule


class FakeOptimizer:
    def __init__(self, lr: float):
        self.param_groups = [{"lr": lr}, {"lr": lr}]


def test_plateau_halves_after_patience_and_converges_below_the_minimum():
    schedule, optimizer = PlateauSchedule(0.5, 2, 0.25), FakeOptimizer(1.0)
    elbos = [-10.0, -9.0, -9.5, -9.2, -9.1, -9.3, -8.0, -8.5, -8.6, -8.7, -8.8]
    best = [schedule.step(epoch, elbo, optimizer) for epoch, elbo in enumerate(elbos, 1)]
    assert best == [True, True, False, False, False, False, True] + [False] * 4
    # two epochs without improvement after epochs 2 and 4 halve the rate (1 -> 0.5 -> 0.25);
    # after epoch 7 two more would take it to 0.125 < 0.25: converged, rate kept
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]
    assert schedule.converged and schedule.best_epoch == 7 and schedule.best_elbo == -8.0
    restored = PlateauSchedule(0.5, 2, 0.25)
    restored.load_state_dict(schedule.state_dict())
    assert restored == schedule


@pytest.fixture(scope="module")
def digits():
    return load_digits()


OPTIONS = dict(
    binarize="dynamic",
    batch_size=64,
    learning_rate=3e-3,
    seed=1,
    progress=False,
    lr_schedule="plateau",
    lr_patience=1,
    lr_decay=0.5,
    min_learning_rate=1e-3,
    compile="none",
)


def build() -> VAE:
    return VAE(num_features=64, latent_dim=2, hidden_sizes=(16,), seed=0)


def test_fit_with_plateau_stops_converged_keeps_best_and_resumes_bitwise(digits, tmp_path):
    train, valid = digits.train[:256], digits.valid[:128]
    straight = build()
    history = straight.fit(train, valid, epochs=60, best_path=tmp_path / "best.pt", **OPTIONS)
    rates = history.column("learning_rate")
    assert len(history) < 60  # converged before the maximum
    assert rates[0] == 3e-3 and min(rates) >= 1e-3 and rates == sorted(rates, reverse=True)
    best_epoch = max(history.records, key=lambda r: r["valid_elbo"])["epoch"]
    best = VAE.load(tmp_path / "best.pt")
    assert len(best.history_) == best_epoch
    assert best.saved_optimizer_state_ is None

    path = tmp_path / "run.pt"
    build().fit(train, valid, epochs=4, checkpoint_path=path, **OPTIONS)
    resumed = build()
    resumed.fit(train, valid, epochs=60, checkpoint_path=path, resume=True, **OPTIONS)
    assert resumed.history_.column("train_elbo") == history.column("train_elbo")
    assert resumed.history_.column("learning_rate") == rates


def test_plateau_needs_validation_data(digits):
    with pytest.raises(ValueError, match="pass validation data"):
        build().fit(digits.train[:128], epochs=2, **OPTIONS)
    with pytest.raises(ValueError, match="lr_decay must lie in"):
        build().fit(digits.train[:128], digits.valid[:64], epochs=2, **{**OPTIONS, "lr_decay": 1.0})
