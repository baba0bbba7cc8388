"""Data export: per-point results and training histories as pandas DataFrames (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

from pyrovae import VAE
from pyrovae.data import load_digits, threshold
from pyrovae.training import HISTORY_COLUMNS, History

pandas = pytest.importorskip("pandas")


def test_evaluation_result_and_history_to_dataframe():
    digits = load_digits()
    vae = VAE(num_features=64, latent_dim=2, hidden_sizes=(16,), seed=0)
    history = vae.fit(threshold(digits.train[:200]), threshold(digits.valid[:50]), epochs=2,
                      batch_size=50, seed=0, progress=False)
    result = vae.evaluate(threshold(digits.test[:30]), num_samples=20, ks=(1, 5), seed=0)
    frame = result.to_dataframe()
    assert frame.shape == (30, len(result.per_datapoint))
    assert frame.index.name == "data_point"
    for name, values in result.per_datapoint.items():
        np.testing.assert_array_equal(frame[name].to_numpy(), values)
    epochs = history.to_dataframe()
    assert list(epochs.columns) == list(HISTORY_COLUMNS) and len(epochs) == 2
    assert epochs["valid_elbo"].tolist() == history.column("valid_elbo")
    assert vae.history_.to_dataframe().equals(epochs)  # the fitted model keeps its history


def test_an_empty_history_has_the_columns():
    assert list(History().to_dataframe().columns) == list(HISTORY_COLUMNS)
