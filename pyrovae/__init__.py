"""pyrovae: latent-variable models in Pyro, fitted by amortized variational inference, with
honest per-datapoint bounds on log p(x).
"""

__version__ = "0.1.0"

from pyrovae.config import TrainConfig, VAEConfig
from pyrovae.models.vae import VAE, VAEGuide, VAEModel

__all__ = ["VAE", "TrainConfig", "VAEConfig", "VAEGuide", "VAEModel", "__version__"]
