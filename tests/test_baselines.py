"""Tests of the plain-PyTorch autoencoder baselines (pyrovae.baselines)."""

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from pyrovae.baselines import (
    ContractiveAutoencoder,
    DeepAutoencoder,
    DenoisingAutoencoder,
    LinearAutoencoder,
    SparseAutoencoder,
    corrupt,
    jacobian_frobenius,
)
from pyrovae.data import load_digits

ARCHITECTURE = {"latent_dim": 8, "hidden_sizes": (64,), "activation": "tanh"}
"""One architecture for every comparison between variants."""

BUDGET = {"epochs": 40, "batch_size": 64, "lr": 3e-3, "seed": 0}
"""One training budget for every comparison between variants."""


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def plain(digits):
    """Deep autoencoder without a penalty, the reference of the comparisons."""
    model = DeepAutoencoder(**ARCHITECTURE)
    model.fit(digits.train, **BUDGET)
    return model


# ----------------------------------------------------------------------------- linear = PCA


def test_linear_autoencoder_spans_principal_subspace(digits):
    # Baldi & Hornik (1989): every minimum of the squared loss of a linear autoencoder has
    # decoder columns spanning the top-L principal subspace. Full-batch Adam gets there to
    # ~1e-3 rad in 500 steps on the centred digits (largest angle measured over seeds 0-3:
    # 1.5e-3). The eigengap after the 4th component (explained variance 8.4% vs 5.8%) keeps
    # the subspace well defined; 0.05 rad (3 degrees) leaves a 30x margin while any mix-up
    # with the 5th component would show as an angle near pi/2.
    x = digits.train.numpy() - digits.train.numpy().mean(0)
    model = LinearAutoencoder(latent_dim=4)
    history = model.fit(x, epochs=500, batch_size=None, lr=3e-2, seed=0)
    pca = PCA(n_components=4).fit(x)
    angles = subspace_angles(model.components_.numpy(), pca.components_.T)
    assert angles.shape == (4,)
    assert angles.max() < 0.05
    pca_error = ((pca.inverse_transform(pca.transform(x)) - x) ** 2).sum(1).mean()
    assert history[-1] == pytest.approx(pca_error, rel=1e-3)
    assert float(model.reconstruction_error(x).mean()) == pytest.approx(pca_error, rel=1e-3)


def test_linear_autoencoder_jacobian_is_the_encoder_weight(digits):
    model = LinearAutoencoder(latent_dim=3)
    model.fit(digits.train, epochs=2, seed=0)
    norms = jacobian_frobenius(model, digits.test[:10])
    expected = model.encoder_[0].weight.detach().norm()
    torch.testing.assert_close(norms, expected.expand(10))
    # Any function of x works too, e.g. a VAE's posterior mean; here a fixed linear map.
    weight = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    by_function = jacobian_frobenius(lambda t: t @ weight.T, digits.test[:4], squared=True)
    torch.testing.assert_close(by_function, weight.pow(2).sum().expand(4))
    with pytest.raises(TypeError, match="callable"):
        jacobian_frobenius("encoder", digits.test[:4])


# ----------------------------------------------------------------------------- contractive


def test_jacobian_matches_closed_form_of_sigmoid_encoder(digits):
    # One sigmoid layer h = s(Wx + b): ||dh/dx||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ji^2
    # (Rifai et al., 2011, eq. 6).
    model = ContractiveAutoencoder(latent_dim=5, hidden_sizes=(), code_activation="sigmoid")
    model.fit(digits.train, epochs=1, seed=1)
    x = digits.test[:20]
    h = model.encode(x)
    weight = model.encoder_[0].weight.detach()
    closed_form = ((h * (1 - h)) ** 2 * weight.pow(2).sum(1)).sum(1)
    torch.testing.assert_close(jacobian_frobenius(model, x, squared=True), closed_form)
    torch.testing.assert_close(jacobian_frobenius(model, x), closed_form.sqrt())


def test_contractive_penalty_lowers_encoder_jacobian(digits, plain):
    contractive = ContractiveAutoencoder(**ARCHITECTURE, contraction=0.1)
    contractive.fit(digits.train, **BUDGET)
    held_out = digits.test
    plain_norm = float(jacobian_frobenius(plain, held_out).mean())
    contractive_norm = float(jacobian_frobenius(contractive, held_out).mean())
    # Measured over seeds 0-2: 13.8-14.5 for the plain autoencoder, 1.01-1.05 with the penalty.
    assert contractive_norm < 0.3 * plain_norm
    # ... while still reconstructing: far better than predicting the mean image.
    baseline = float(((held_out - digits.train.mean(0)) ** 2).sum(1).mean())
    assert float(contractive.reconstruction_error(held_out).mean()) < 0.5 * baseline


# ----------------------------------------------------------------------------- denoising


def test_denoising_reconstructs_corrupted_inputs_better(digits, plain):
    denoising = DenoisingAutoencoder(**ARCHITECTURE, noise=0.3, noise_type="masking")
    denoising.fit(digits.train, **BUDGET)
    clean = digits.test
    corrupted = corrupt(clean, 0.3, "masking", torch.Generator().manual_seed(123))
    plain_error = float(plain.reconstruction_error(corrupted, target=clean).mean())
    denoising_error = float(denoising.reconstruction_error(corrupted, target=clean).mean())
    # Measured over seeds 0-2: ratios 0.77-0.80.
    assert denoising_error < 0.9 * plain_error


def test_gaussian_noise_denoising_trains_and_corrupt_is_seeded(digits):
    x = digits.test[:50]
    first = corrupt(x, 0.2, "gaussian", torch.Generator().manual_seed(0))
    again = corrupt(x, 0.2, "gaussian", torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, again)
    assert float((first - x).std()) == pytest.approx(0.2, rel=0.1)
    masked = corrupt(x, 0.5, "masking", torch.Generator().manual_seed(0))
    assert set(torch.unique(masked[x > 0] == 0).tolist()) == {False, True}
    model = DenoisingAutoencoder(latent_dim=2, hidden_sizes=(16,), noise=0.2, noise_type="gaussian")
    history = model.fit(digits.train, epochs=3, seed=0)
    assert len(history) == 3 and all(np.isfinite(history))


# ----------------------------------------------------------------------------- sparse


def test_sparse_codes_are_smaller(digits):
    architecture = {**ARCHITECTURE, "code_activation": "relu"}
    dense = DeepAutoencoder(**architecture)
    dense.fit(digits.train, **BUDGET)
    sparse = SparseAutoencoder(**architecture, sparsity=0.1)
    sparse.fit(digits.train, **BUDGET)
    dense_codes, sparse_codes = dense.encode(digits.test), sparse.encode(digits.test)
    # Measured over seeds 0-2: ratios 0.06-0.07.
    assert float(sparse_codes.abs().mean()) < 0.5 * float(dense_codes.abs().mean())
    assert float((sparse_codes == 0).float().mean()) > float((dense_codes == 0).float().mean())


# ----------------------------------------------------------------------------- interface


def test_shapes_history_and_params(digits):
    model = DeepAutoencoder(latent_dim=3, hidden_sizes=(16, 8))
    assert model.get_params() == {
        "latent_dim": 3,
        "hidden_sizes": (16, 8),
        "activation": "tanh",
        "code_activation": "identity",
        "output_activation": "sigmoid",
    }
    assert repr(model).startswith("DeepAutoencoder(latent_dim=3")
    history = model.fit(digits.train.numpy(), epochs=3, batch_size=500, seed=0)
    assert len(history) == 3 and model.history_ is history
    x = digits.test[:7]
    assert model.encode(x).shape == (7, 3)
    assert model.decode(torch.zeros(4, 3)).shape == (4, 64)
    reconstruction = model.reconstruct(x)
    assert reconstruction.shape == (7, 64)
    assert float(reconstruction.min()) >= 0 and float(reconstruction.max()) <= 1
    assert model.reconstruction_error(x).shape == (7,)
    assert jacobian_frobenius(model, x).shape == (7,)
    assert SparseAutoencoder().get_params()["sparsity"] == 0.1
    assert DenoisingAutoencoder(noise=0.5).get_params()["noise"] == 0.5
    assert ContractiveAutoencoder(contraction=2.0).get_params()["contraction"] == 2.0
    assert LinearAutoencoder(5).get_params() == {"latent_dim": 5}


def test_fit_is_seeded_and_leaves_global_rng_alone(digits):
    state = torch.get_rng_state()
    first = DenoisingAutoencoder(latent_dim=2, hidden_sizes=(8,))
    second = DenoisingAutoencoder(latent_dim=2, hidden_sizes=(8,))
    assert first.fit(digits.train, epochs=2, seed=5) == second.fit(digits.train, epochs=2, seed=5)
    torch.testing.assert_close(first.encode(digits.test), second.encode(digits.test))
    assert torch.equal(torch.get_rng_state(), state)
    third = DenoisingAutoencoder(latent_dim=2, hidden_sizes=(8,))
    assert third.fit(digits.train, epochs=2, seed=6) != first.history_


@pytest.mark.parametrize(
    ("model", "fit_options", "message"),
    [
        (DeepAutoencoder(latent_dim=0), {}, "latent_dim"),
        (DeepAutoencoder(hidden_sizes=(0,)), {}, "hidden size"),
        (DeepAutoencoder(activation="swish"), {}, "unknown activation 'swish'"),
        (DeepAutoencoder(output_activation="softmax"), {}, "output_activation"),
        (SparseAutoencoder(sparsity=-1.0), {}, "sparsity"),
        (ContractiveAutoencoder(contraction=-0.1), {}, "contraction"),
        (DenoisingAutoencoder(noise_type="salt"), {}, "noise_type"),
        (DenoisingAutoencoder(noise=1.0), {}, "below 1"),
        (DeepAutoencoder(), {"epochs": 0}, "epochs"),
        (DeepAutoencoder(), {"batch_size": 0}, "batch_size"),
        (DeepAutoencoder(), {"lr": 0.0}, "lr"),
    ],
)
def test_invalid_settings_are_refused(digits, model, fit_options, message):
    with pytest.raises(ValueError, match=message):
        model.fit(digits.train, **fit_options)
    assert not hasattr(model, "encoder_")


def test_invalid_data_is_refused(digits):
    model = DeepAutoencoder(latent_dim=2, hidden_sizes=(8,))
    with pytest.raises(RuntimeError, match="not fitted"):
        model.encode(digits.test)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.decode(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="matrix"):
        model.fit(digits.train[0])
    bad = digits.train.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.fit(bad)
    with pytest.raises(TypeError, match="numeric"):
        model.fit(np.array([["a", "b"]]))
    model.fit(digits.train, epochs=1)
    with pytest.raises(ValueError, match="64"):
        model.encode(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="2"):
        model.decode(torch.zeros(2, 3))
