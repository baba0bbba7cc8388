"""pyrovae: latent-variable models in Pyro, fitted by amortized variational inference, with
honest per-datapoint bounds on log p(x).
"""

__version__ = "0.1.0"

from pyrovae.config import TrainConfig, VAEConfig  # noqa: E402
from pyrovae.models.vae import VAE, VAEGuide, VAEModel  # noqa: E402

__all__ = ["VAE", "VAEConfig", "VAEGuide", "VAEModel", "TrainConfig", "__version__"]
