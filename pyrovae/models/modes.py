"""Evaluation in eval mode: dropout off, BatchNorm on its running statistics.

A bound on log p(x) is a property of the fitted model, not of one random dropout mask or of
the batch statistics of whichever points share a block: :func:`evaluation_mode` switches every
torch module behind a model and guide to eval mode for the duration of an evaluation and
restores each module's own previous mode afterwards (also after an exception), as
``model.eval()`` / ``model.train()`` would in a PyTorch evaluation loop.

The modules behind a program are found statically (the program when it is an ``nn.Module``,
e.g. a :class:`~pyrovae.models.base.LocalParamsModule` tree or a
:class:`~pyrovae.models.latent_variable.LatentVariableModel`; a bound method's object; the
owner of a :class:`~pyrovae.models.functions.PyroFunction`; the modules a function reaches
through its closure or global names), and any other module the programs call inside the
context (a ``pyro.module`` argument built elsewhere, a ``PyroModule`` held in a dict) is
switched by a global forward pre-hook at its first call and restored with the others.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.module import register_module_forward_pre_hook

from pyrovae.models.functions import PyroFunction

NOTE = "evaluating with dropout off and BatchNorm running statistics"
"""Start of the one-line warning :func:`evaluation_mode` gives when it switches layers."""

_SHOWN = 6


def _is_mode_dependent(module: nn.Module) -> bool:
    """Dropout and batch-norm layers: their output depends on ``module.training``."""
    return isinstance(module, _DropoutNd | _BatchNorm)


def _closure_modules(function: Callable) -> Iterator[tuple[str, nn.Module]]:
    """Modules a plain function names through its closure cells or global names."""
    function = inspect.unwrap(function)
    if not inspect.isfunction(function):
        return
    try:
        names = inspect.getclosurevars(function)
    except (TypeError, ValueError):
        return
    for scope in (names.nonlocals, names.globals):
        for name, value in scope.items():
            if isinstance(value, nn.Module):
                yield name, value


def modules_behind(program, label: str = "") -> list[tuple[str, nn.Module]]:
    """The torch modules behind a Pyro program, each with a label naming it.

    ``program`` may be an ``nn.Module`` (a :class:`~pyrovae.models.functions.PyroFunction`
    contributes its owner module and the modules its function names), a bound method of
    one, or a function; anything else has none."""
    found: list[tuple[str, nn.Module]] = []
    if isinstance(program, PyroFunction):
        owner = program.owner_module()
        if owner is not None:
            found.append((label or type(owner).__name__, owner))
        function = program.function
        if function is not owner:
            found += modules_behind(function, label)
        return found
    if isinstance(program, nn.Module):
        children = [(n, m) for n, m in program.named_children() if isinstance(m, PyroFunction)]
        for name, child in children:  # e.g. a LatentVariableModel's model and guide
            found += modules_behind(child, ".".join(p for p in (label, name) if p))
        return [*found, (label, program)]
    owner = getattr(program, "__self__", None)
    if isinstance(owner, nn.Module):
        return modules_behind(owner, label or type(owner).__name__)
    return [(name, module) for name, module in _closure_modules(program)]


def _layers(roots: list[tuple[str, nn.Module]]) -> dict[int, tuple[str, nn.Module]]:
    """Every module under ``roots``, by identity, with a dotted name (the first found)."""
    layers: dict[int, tuple[str, nn.Module]] = {}
    for label, root in roots:
        for path, module in root.named_modules(remove_duplicate=False):
            name = ".".join(part for part in (label, path) if part)
            layers.setdefault(id(module), (name or type(module).__name__, module))
    return layers


def _describe(named: list[tuple[str, nn.Module]]) -> str:
    shown = ", ".join(f"{name} ({type(module).__name__})" for name, module in named[:_SHOWN])
    more = f" and {len(named) - _SHOWN} more" if len(named) > _SHOWN else ""
    return shown + more


@contextlib.contextmanager
def evaluation_mode(*programs, warn: bool = True, stacklevel: int = 3) -> Iterator[None]:
    """Run the enclosed evaluation with every module behind ``programs`` in eval mode.

    Parameters
    ----------
    *programs
        Models, guides or fitted models (modules, bound methods, functions; see
        :func:`modules_behind`). Modules they call that are not found statically are
        switched at their first call inside the context.
    warn : bool
        Warn once, in one line naming the layers switched, when dropout or batch-norm layers
        were in training mode (their outputs change: dropout off, BatchNorm on its running
        statistics). Nested contexts find the layers already switched and say nothing.
    stacklevel : int
        Frame the warning points to: 3 is the ``with`` statement.

    Every module's own ``training`` flag is restored on exit, also after an exception, so
    that training continues as it was.
    """
    layers = _layers([root for program in programs for root in modules_behind(program)])
    previous: dict[int, tuple[nn.Module, bool]] = {}
    switched: list[tuple[str, nn.Module]] = []

    def switch(name: str, module: nn.Module) -> None:
        if id(module) in previous:
            return
        previous[id(module)] = (module, module.training)
        if module.training:
            module.training = False
            if _is_mode_dependent(module):
                switched.append((name, module))

    def late(module: nn.Module, _inputs) -> None:
        if not module.training:
            return None
        before = len(switched)
        for path, inner in module.named_modules(remove_duplicate=False):
            switch(".".join(p for p in (type(module).__name__, path) if p), inner)
        if warn and not before and switched:
            warnings.warn(f"{NOTE}: switched {_describe(switched)} to eval mode", stacklevel=2)
        return None

    try:
        for name, module in layers.values():
            switch(name, module)
        if warn and switched:
            warnings.warn(
                f"{NOTE}: switched {_describe(switched)} to eval mode for this evaluation "
                "(their training modes are restored afterwards)",
                stacklevel=stacklevel,
            )
        with contextlib.ExitStack() as stack:
            stack.callback(register_module_forward_pre_hook(late).remove)
            yield
    finally:
        for module, training in previous.values():
            module.training = training


def evaluates(*names: str) -> Callable:
    """Decorate a function to run in :func:`evaluation_mode` of its arguments ``names`` (a
    model, a guide, a fitted model, or a dict of them), bound by the function's signature.

    Example
    -------
    >>> @evaluates("model", "guide")                                    # doctest: +SKIP
    ... def evaluate(model, guide, *args, **options): ...
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def in_evaluation_mode(*args, **kwargs):
            try:
                arguments = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:  # the function's own call reports it
                return function(*args, **kwargs)
            programs = []
            for name in names:
                value = arguments.get(name)
                programs += list(value.values()) if isinstance(value, dict) else [value]
            with evaluation_mode(*programs, stacklevel=4):
                return function(*args, **kwargs)

        return in_evaluation_mode

    return decorate
