"""Baselines for the VAE: deterministic autoencoders in plain PyTorch."""

from pyrovae.baselines.autoencoders import (
    Autoencoder,
    ContractiveAutoencoder,
    DeepAutoencoder,
    DenoisingAutoencoder,
    LinearAutoencoder,
    SparseAutoencoder,
    corrupt,
    jacobian_frobenius,
)

__all__ = [
    "Autoencoder",
    "ContractiveAutoencoder",
    "DeepAutoencoder",
    "DenoisingAutoencoder",
    "LinearAutoencoder",
    "SparseAutoencoder",
    "corrupt",
    "jacobian_frobenius",
]
