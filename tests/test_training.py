"""Fitting by SVI on the 8x8 digits: the validation ELBO improves by a clear, statistically
resolved margin; every objective trains; runs are reproducible; histories export; devices
resolve; static and dynamic binarization behave as documented.
"""

import csv
import json
import math

import pytest
import torch

from pyrovae import VAE, VAEConfig
from pyrovae.data import binarize, load_digits, threshold
from pyrovae.training import HISTORY_COLUMNS, History, resolve_device

CONFIG = VAEConfig(num_features=64, latent_dim=4, hidden_sizes=(64,))
TINY = VAEConfig(num_features=64, latent_dim=2, hidden_sizes=(16,))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def valid_binarized(digits) -> torch.Tensor:
    """The validation digits binarized once with a fixed generator, for before/after ELBOs."""
    return binarize(digits.valid, generator=torch.Generator().manual_seed(123))


def build(config: VAEConfig, init_seed: int = 0) -> VAE:
    torch.manual_seed(init_seed)
    return VAE(config)


def records_without_time(history: History) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history.records]


def test_training_raises_validation_elbo_by_a_clear_margin(digits, valid_binarized):
    vae = build(CONFIG)
    before = vae.elbo(valid_binarized, num_samples=10, seed=1)
    history = vae.fit(
        digits.train,
        digits.valid,
        binarize="dynamic",
        epochs=10,
        batch_size=64,
        learning_rate=3e-3,
        seed=0,
        progress=False,
    )
    after = vae.elbo(valid_binarized, num_samples=10, seed=1)
    improvement = after - before  # per data point, nats; paired on the same data
    mean = float(improvement.mean())
    standard_error = float(improvement.std()) / math.sqrt(improvement.shape[0])
    assert mean > 10.0, mean
    assert mean > 10.0 * standard_error, (mean, standard_error)
    # A bound on log p(x) of 64 binary pixels: below 0, and a trained model beats the
    # uniform-pixel model's 64 log 2 = 44.4 nats.
    assert float(after.max()) < 0
    assert float(after.mean()) > -64 * math.log(2)
    assert len(history) == 10
    assert history.column("train_elbo")[-1] > history.column("train_elbo")[0]
    assert history.column("valid_elbo")[-1] > history.column("valid_elbo")[0]


@pytest.mark.parametrize(
    ("objective", "num_particles"),
    [
        ("trace_elbo", 1),
        ("trace_meanfield_elbo", 1),
        ("trace_elbo", 4),
        ("trace_meanfield_elbo", 3),
    ],
)
def test_objectives_and_particles_train(objective, num_particles, digits):
    vae = build(TINY)
    history = vae.fit(
        digits.train,
        digits.valid,
        objective=objective,
        num_particles=num_particles,
        binarize="dynamic",
        epochs=3,
        batch_size=128,
        learning_rate=3e-3,
        seed=0,
        progress=False,
    )
    assert len(history) == 3
    assert history.column("epoch") == [1, 2, 3]
    for name in ("train_elbo", "valid_elbo", "seconds"):
        assert all(math.isfinite(value) for value in history.column(name)), name
    assert all(value > 0 for value in history.column("seconds"))
    assert all(value < 0 for value in history.column("valid_elbo"))
    assert history.column("valid_elbo")[-1] > history.column("valid_elbo")[0]
    assert vae.train_config_.objective == objective
    assert vae.train_config_.num_particles == num_particles
    assert vae.history_ is history


def test_same_seed_reproduces_history_and_parameters(digits):
    options = dict(binarize="dynamic", epochs=2, batch_size=128, seed=5, progress=False)
    first = build(TINY)
    first_history = first.fit(digits.train, digits.valid, **options)
    second = build(TINY)
    torch.rand(10)  # the global RNG state before fitting does not matter: fit seeds it
    second_history = second.fit(digits.train, digits.valid, **options)
    assert records_without_time(first_history) == records_without_time(second_history)
    second_state = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(value, second_state[name]), name
    first_adam, second_adam = first.optimizer_.state_dict(), second.optimizer_.state_dict()
    for index, state in first_adam["state"].items():
        assert torch.equal(state["exp_avg"], second_adam["state"][index]["exp_avg"])

    third = build(TINY)
    third_history = third.fit(digits.train, digits.valid, **{**options, "seed": 6})
    train_first = first_history.column("train_elbo")
    train_third = third_history.column("train_elbo")
    assert all(a != b for a, b in zip(train_first, train_third, strict=True))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), third.state_dict().values(), strict=True)
    )


def test_history_exports_to_jsonl_and_csv(digits, tmp_path):
    vae = build(TINY)
    history = vae.fit(
        digits.train[:256],
        digits.valid,
        binarize="dynamic",
        epochs=2,
        batch_size=64,
        progress=False,
    )
    assert HISTORY_COLUMNS == ("epoch", "train_elbo", "valid_elbo", "seconds", "learning_rate")

    jsonl = tmp_path / "history.jsonl"
    history.to_jsonl(jsonl)
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]
    assert [list(record) for record in parsed] == [list(HISTORY_COLUMNS)] * 2
    assert parsed == history.records

    table = tmp_path / "history.csv"
    history.to_csv(table)
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == list(HISTORY_COLUMNS)
    assert len(rows) == 2
    for row, record in zip(rows, history.records, strict=True):
        assert int(row["epoch"]) == record["epoch"]
        for name in ("train_elbo", "valid_elbo", "seconds"):
            assert float(row[name]) == record[name]  # repr round-trips floats exactly


def test_history_without_validation_exports_empty_valid_elbo(digits, tmp_path):
    vae = build(TINY)
    history = vae.fit(
        digits.train[:128], binarize="static", epochs=1, batch_size=64, progress=False
    )
    assert history.column("valid_elbo") == [None]
    history.to_jsonl(tmp_path / "h.jsonl")
    history.to_csv(tmp_path / "h.csv")
    assert json.loads((tmp_path / "h.jsonl").read_text())["valid_elbo"] is None
    with open(tmp_path / "h.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["valid_elbo"] == "" and math.isfinite(float(row["train_elbo"]))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device 'not-a-device'"):
        resolve_device("not-a-device")


def test_fit_on_unavailable_cuda_fails_before_changing_state(digits):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    vae = build(TINY)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(ValueError, match="CUDA is not available"):
        vae.fit(digits.train[:64], device="cuda", batch_size=32, progress=False)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert vae.history_ is None and vae.optimizer_ is None


def test_static_binarization_accepts_grey_data_and_thresholds_it(digits):
    grey_train, grey_valid = digits.train[:256], digits.valid[:64]
    assert bool(((grey_train > 0) & (grey_train < 1)).any())  # genuinely grey
    options = dict(epochs=2, batch_size=64, seed=2, progress=False)

    static = build(TINY)
    static_history = static.fit(grey_train, grey_valid, binarize="static", **options)
    manual = build(TINY)
    manual_history = manual.fit(
        threshold(grey_train), threshold(grey_valid), binarize="none", **options
    )
    # Static binarization is exactly thresholding at 0.5, for training and validation data.
    assert records_without_time(static_history) == records_without_time(manual_history)
    for a, b in zip(static.state_dict().values(), manual.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # Without binarization the same grey data is refused by the Bernoulli likelihood.
    with pytest.raises(ValueError, match="support of the 'bernoulli' likelihood"):
        build(TINY).fit(grey_train, binarize="none", **options)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("role", ["train", "validation"])
def test_binarization_rejects_data_outside_unit_interval(mode, role, digits):
    vae = build(TINY)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    good = digits.train[:64]
    for bad in (good * 2.0, good - 0.25):
        train, validation = (bad, good) if role == "train" else (good, bad)
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\] to be binarized"):
            vae.fit(train, validation, binarize=mode, epochs=1, batch_size=32, progress=False)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert vae.history_ is None


def test_dynamic_binarization_leaves_binary_data_unchanged(digits):
    """Bernoulli(0) and Bernoulli(1) draws are constant: on already-binary data, one epoch with
    dynamic binarization is the same computation as one without."""
    binary = threshold(digits.train[:128])
    options = dict(epochs=1, batch_size=64, progress=False)
    dynamic = build(TINY)
    dynamic_history = dynamic.fit(binary, binarize="dynamic", seed=4, **options)
    plain = build(TINY)
    plain_history = plain.fit(binary, binarize="none", seed=4, **options)
    assert records_without_time(dynamic_history) == records_without_time(plain_history)
    for a, b in zip(dynamic.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
