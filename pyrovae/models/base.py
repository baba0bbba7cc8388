"""Base class for Pyro model and guide modules whose parameters stay local to the module."""

from __future__ import annotations

import pyro
from pyro.nn import PyroModule


class LocalParamsModule(PyroModule):
    """A :class:`~pyro.nn.PyroModule` that never touches Pyro's global parameter store.

    Construction and every call run under
    ``pyro.settings.context(module_local_params=True)``, so the module's parameters are
    ordinary ``torch.nn.Parameter`` s owned by the module: two models with the same
    attribute names live side by side in one process without colliding, and the user's
    own global Pyro settings are left as they were.
    """

    def __init__(self, name: str = ""):
        with pyro.settings.context(module_local_params=True):
            super().__init__(name)

    def __call__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)
