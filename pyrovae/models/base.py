"""Base class for Pyro model and guide modules whose parameters stay local to the module,
the handler that makes such parameters visible to :class:`pyro.infer.SVI`, and the name of
the plate over data points that the built-in models and guides share."""

from __future__ import annotations

import sys
import weakref

import pyro
import torch
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger

DATA_PLATE = "data"
"""Name of the plate over data points, shared by the built-in models and guides."""


def is_param_store_statement(msg: dict) -> bool:
    """Whether a ``param`` message is a real ``pyro.param`` call (served by Pyro's parameter
    store) rather than the stand-in statement a module-local :class:`PyroModule` emits for
    its own parameters."""
    return getattr(msg["fn"], "__self__", None) is pyro.get_param_store()


def unconstrained_handle(parameter: torch.Tensor) -> torch.Tensor:
    """A detached alias of ``parameter`` whose ``.unconstrained()`` returns the parameter
    itself, as Pyro's parameter store does for its values; the parameter is not modified."""
    handle = parameter.detach()
    handle.unconstrained = weakref.ref(parameter)
    return handle


def unconstrained_parameter(value) -> torch.Tensor | None:
    """The trainable tensor behind a ``param`` site's value, or ``None`` for a non-tensor."""
    if hasattr(value, "unconstrained"):
        return value.unconstrained()
    return value if isinstance(value, torch.Tensor) else None


class ModuleParamSites(Messenger):
    """Gives the ``param`` sites of module-local parameters the ``.unconstrained()`` handle
    that :class:`pyro.infer.SVI` and ``pyro.optim`` read.

    Under ``module_local_params=True`` a :class:`PyroModule` announces each plain
    ``nn.Parameter`` with a stand-in ``param`` statement whose value is the bare parameter,
    which has no ``.unconstrained``; ``SVI.step`` then fails. This handler answers such a
    statement with :func:`unconstrained_handle` when the module reads the parameter (it
    ignores the statement's value then), and with the parameter itself when the module is
    creating it (``PyroModule.__setattr__`` stores the statement's value: a handle there
    would replace the parameter by a detached tensor that no optimizer sees, as Pyro's
    ``AutoMultivariateNormal`` does with its ``loc`` on its first call). Constrained
    ``PyroParam`` values and real ``pyro.param`` calls pass unchanged.
    The statement's function is wrapped rather than its value set, so that handlers outside
    (``poutine.lift`` turning parameters into sample sites) still decide what it returns.
    """

    def _pyro_param(self, msg: dict) -> None:
        if msg["done"] or is_param_store_statement(msg):
            return
        msg["fn"] = with_handle(msg["fn"])


def with_handle(statement):
    """``statement`` (a stand-in ``param`` function) returning a bare parameter as its
    :func:`unconstrained_handle`, any other value unchanged."""

    def answer(*args, **kwargs):
        value = statement(*args, **kwargs)
        if isinstance(value, torch.nn.Parameter) and not hasattr(value, "unconstrained"):
            if _inside_module_setattr():
                return value
            return unconstrained_handle(value)
        return value

    return answer


def _inside_module_setattr(depth: int = 12) -> bool:
    """Whether ``PyroModule.__setattr__`` is among the nearest ``depth`` callers: the
    statement then announces a parameter being created, whose value the module stores."""
    target = PyroModule.__setattr__.__code__
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False


class LocalParamsModule(PyroModule):
    """A :class:`~pyro.nn.PyroModule` that never touches Pyro's global parameter store.

    Construction and every call run under
    ``pyro.settings.context(module_local_params=True)``, so the module's parameters are
    ordinary ``torch.nn.Parameter`` s owned by the module: two models with the same
    attribute names live side by side in one process without colliding, and the user's
    own global Pyro settings are left as they were. Calls also run under
    :class:`ModuleParamSites`, so ``pyro.infer.SVI(model, guide, pyro.optim.Adam(...),
    Trace_ELBO())`` trains these parameters as it trains those of the parameter store.
    """

    def __init__(self, name: str = ""):
        with pyro.settings.context(module_local_params=True):
            super().__init__(name)

    def __call__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True), ModuleParamSites():
            return super().__call__(*args, **kwargs)
