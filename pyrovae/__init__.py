"""pyrovae: latent-variable models in Pyro, fitted by amortized variational inference, with
honest per-datapoint bounds on log p(x).
"""

__version__ = "0.1.0"

__all__ = ["VAE", "TrainConfig", "VAEConfig", "VAEGuide", "VAEModel", "__version__"]

_LAZY = {
    "TrainConfig": "pyrovae.config",
    "VAEConfig": "pyrovae.config",
    "VAE": "pyrovae.models.vae",
    "VAEGuide": "pyrovae.models.vae",
    "VAEModel": "pyrovae.models.vae",
}


def __getattr__(name: str):
    """The public classes, imported on first use: ``import pyrovae.cli`` (and so
    ``pyrovae --help``) does not import torch."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyrovae' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
