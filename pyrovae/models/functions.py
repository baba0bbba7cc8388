"""Users' Pyro models and guides written as functions, made into modules that own every
parameter they use.

A Pyro user writes ``pyro.param("w", init, constraint=...)``, ``pyro.module("decoder",
net)`` or calls a :class:`~pyro.nn.PyroModule` inside a plain function (or a bound method).
Those parameters normally live in Pyro's global parameter store, where an ordinary
``torch.optim`` optimizer over ``model.parameters()`` never sees them, and a fit would
silently train only part of the model. :class:`PyroFunction` runs the callable under a
handler that serves every ``param`` statement from a :class:`ParamRegistry`, a module that
owns the parameters: created from the initial value on first use (in the unconstrained
space of the statement's constraint, as Pyro's store does) or adopted as the very
``nn.Parameter`` a ``pyro.module`` / ``PyroModule`` statement names. Model and guide
share one registry, so a guide may read a parameter the model created, by name, as with
Pyro's store.

Parameters are created lazily, on the first call:
:meth:`pyrovae.models.latent_variable.LatentVariableModel.fit` runs one call on a data
point before building its optimizer, and loading a file creates them by one call on the
inputs saved with it (or, for a file without them, restores them by name on first use and
refuses a mismatch then: :meth:`ParamRegistry.expect`).

:func:`pyro_parameters` names the parameters of a :class:`~pyro.nn.PyroModule` tree as Pyro's
own ``param`` statements do, so that every fitted value can be read by its Pyro name.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import transform_to

from pyrovae.checkpoint import CheckpointError
from pyrovae.models.base import (
    LocalParamsModule,
    is_param_store_statement,
    unconstrained_handle,
    unconstrained_parameter,
    with_handle,
)


def _encode(name: str) -> str:
    """A Pyro parameter name as a module attribute name (no dots, not empty)."""
    return "p_" + name.replace("%", "%25").replace(".", "%2E")


def _decode(attribute: str) -> str:
    return attribute[2:].replace("%2E", ".").replace("%25", "%")


def _constrained_value(parameter: torch.Tensor, constraint) -> torch.Tensor:
    """``transform_to(constraint)(parameter)`` as Pyro's store returns it: differentiable,
    with ``.unconstrained()`` giving the parameter (set on an alias, so that the parameter
    itself stays unmarked and picklable)."""
    value = transform_to(constraint)(parameter)
    value = value.view_as(value)
    value.unconstrained = lambda: parameter
    return value


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def parameter_mismatch(saved: dict[str, tuple], code: dict[str, tuple]) -> str | None:
    """What differs between the parameters a file holds and those the code uses (name ->
    shape each), one clause per kind naming every parameter, or ``None`` when they agree.

    A parameter only in the file and one only in the code with the same shape are reported
    as a rename (paired in order)."""
    dropped = [name for name in saved if name not in code]
    added = [name for name in code if name not in saved]
    reshaped = [name for name in saved if name in code and saved[name] != code[name]]
    renamed = []
    for old in list(dropped):
        new = next((n for n in added if code[n] == saved[old]), None)
        if new is not None:
            renamed.append(f"{old!r} -> {new!r} {saved[old]}")
            dropped.remove(old)
            added.remove(new)
    clauses = [
        ("renamed (in the file -> in the code, same shape)", renamed),
        ("added (used by the code, not in the file)", [f"{n!r} {code[n]}" for n in added]),
        ("dropped (in the file, not used by the code)", [f"{n!r} {saved[n]}" for n in dropped]),
        (
            "reshaped (in the file -> in the code)",
            [f"{n!r} {saved[n]} -> {code[n]}" for n in reshaped],
        ),
    ]
    listed = [f"{kind}: {', '.join(items)}" for kind, items in clauses if items]
    return "; ".join(listed) or None


def pyro_parameters(module: nn.Module, prefix: str | None = None):
    """``(name, unconstrained tensor, constraint)`` of every parameter of a module tree, named
    as Pyro's ``param`` statements name them inside a :class:`~pyro.nn.PyroModule`.

    A ``PyroModule``'s own parameter is ``prefix.attribute`` (a ``PyroParam`` its constrained
    name with its constraint), a plain ``nn.Module`` attribute's parameters are
    ``prefix.attribute$$$path`` (its ``pyro.module`` statement). ``prefix`` is the root's
    Pyro name (``""`` for :class:`~pyrovae.models.base.LocalParamsModule` s)."""
    if prefix is None:
        prefix = module.__dict__.get("_pyro_name", "") if isinstance(module, PyroModule) else ""
    pyro_params = module.__dict__.get("_pyro_params", {})
    for attribute, parameter in module._parameters.items():
        if parameter is None:
            continue
        base = attribute[: -len("_unconstrained")]
        if attribute.endswith("_unconstrained") and base in pyro_params:
            yield _joined(prefix, base), parameter, pyro_params[base][0]
        else:
            yield _joined(prefix, attribute), parameter, constraints.real
    for attribute, child in module._modules.items():
        if child is None:
            continue
        if isinstance(child, PyroModule):
            yield from pyro_parameters(child, _joined(prefix, attribute))
            continue
        module_name = _joined(prefix, attribute)  # its pyro.module statement's name
        for path, parameter in child.named_parameters():
            yield param_with_module_name(module_name, path), parameter, constraints.real


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class ParamRegistry(nn.Module):
    """The parameters of function-style Pyro programs, by Pyro parameter name.

    Each parameter is stored unconstrained (an ``nn.Parameter``); its constraint is the one
    given by the ``pyro.param`` statement that uses it. A parameter adopted from a
    ``pyro.module`` or ``PyroModule`` statement is that module's own ``nn.Parameter``
    (training updates the user's module). Values loaded from a file before the first call
    wait in :attr:`pending_` and are copied into each parameter when it first appears.

    Attributes
    ----------
    seen_ : dict
        Pyro name -> (unconstrained tensor, constraint) of every ``param`` statement answered
        but not registered here (a held owner module's parameters, PyroModules on Pyro's
        global store), so that every value the programs read has a name.
    users_, called_ : set of str
        Roles (``"model"``, ``"guide"``) of the programs sharing this registry, and those
        that completed a call; :attr:`used_` once every one did.
    """

    def __init__(self):
        super().__init__()
        self.constraints_: dict[str, constraints.Constraint] = {}
        self.pending_: dict[str, torch.Tensor] = {}
        self.adopted_: set[str] = set()
        self.global_store_: set[str] = set()
        self.seen_: dict[str, tuple[torch.Tensor, constraints.Constraint]] = {}
        self.users_: set[str] = set()
        self.called_: set[str] = set()
        self.expected_: dict[str, tuple[int, ...]] | None = None
        self.mismatch_: str | None = None

    @property
    def used_(self) -> bool:
        """Whether every program sharing the registry has run (its parameters exist)."""
        return bool(self.users_) and self.called_ >= self.users_

    def expect(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """Check the parameters against a file's (Pyro name -> shape) at the end of the first
        call of every program: a parameter the code adds, drops, renames or reshapes raises
        :class:`~pyrovae.checkpoint.CheckpointError` then, and at every later call."""
        self.expected_, self.source_ = dict(shapes), source
        self.called_ = set()

    def after_call(self, role: str) -> None:
        """Record that the program ``role`` completed a call; on the first complete use
        after :meth:`expect`, compare the parameters with the file's."""
        self.called_.add(role)
        if self.expected_ is None or not self.used_:
            return
        code = {name: _shape(self.parameter(name)) for name in self.names()}
        problem = parameter_mismatch(self.expected_, code)
        self.expected_ = None
        if problem is not None:
            self.mismatch_ = (
                f"the parameters in {self.source_} do not match the model and guide code: {problem}"
            )
            self.check()

    def check(self) -> None:
        """Raise the mismatch found by :meth:`after_call`, if any."""
        if self.mismatch_ is not None:
            raise CheckpointError(self.mismatch_)

    def _pending_fits(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether a value loaded for ``name`` fits a parameter of ``shape``; one that does
        not is dropped (under :meth:`expect` the mismatch is reported after the call)."""
        if name not in self.pending_ or _shape(self.pending_[name]) == shape:
            return True
        if self.expected_ is None:
            raise CheckpointError(
                f"the saved parameter {name!r} has shape {_shape(self.pending_[name])}, the "
                f"code's {shape}"
            )
        del self.pending_[name]
        return False

    def names(self) -> list[str]:
        return [_decode(attribute) for attribute in self._parameters]

    @staticmethod
    def pyro_name(attribute: str) -> str:
        """The Pyro name of a parameter held under the attribute (state-dict key) ``attribute``."""
        return _decode(attribute)

    def __contains__(self, name: str) -> bool:
        return _encode(name) in self._parameters

    def parameter(self, name: str) -> nn.Parameter:
        return self._parameters[_encode(name)]

    def adopt(self, name: str, parameter: torch.Tensor, constraint=constraints.real) -> None:
        """Own ``parameter`` (a user module's tensor, unconstrained for ``constraint``) under
        ``name``; a value loaded for that name is copied into it first."""
        if not isinstance(parameter, nn.Parameter) or not parameter.requires_grad:
            return
        self.constraints_.setdefault(name, constraint)
        current = self._parameters.get(_encode(name))
        if current is parameter:
            return
        if current is not None and name not in self.pending_:
            raise ValueError(
                f"Pyro parameter name {name!r} names two different tensors (one in each of "
                "two modules or pyro.module calls); give each module its own name"
            )
        if name in self.pending_ and self._pending_fits(name, _shape(parameter)):
            with torch.no_grad():
                parameter.copy_(self.pending_.pop(name))
        self.register_parameter(_encode(name), parameter)
        self.adopted_.add(name)

    def constrained(self, name: str, init, constraint) -> torch.Tensor:
        """The value of ``pyro.param(name, init, constraint)``: differentiable, with the
        ``.unconstrained()`` handle Pyro's SVI reads."""
        if name in self.pending_ and isinstance(init, nn.Parameter):
            self.adopt(name, init)
        if name not in self or name in self.pending_:
            self._create(name, init, constraint)
        constraint = self.constraints_.setdefault(name, constraint)
        parameter = self.parameter(name)
        if parameter is init:  # pyro.module: the caller compares identities only
            return unconstrained_handle(parameter)
        return _constrained_value(parameter, constraint)

    def read_store(self, name: str) -> torch.Tensor:
        """The constrained value of a parameter a global-store ``PyroModule`` put in Pyro's
        parameter store, with its ``.unconstrained()`` handle, not registered here."""
        store = pyro.get_param_store()
        parameter = store._params[name]
        self.global_store_.add(name)
        self.seen_[name] = (parameter, store._constraints[name])
        return _constrained_value(parameter, store._constraints[name])

    def _create(self, name: str, init, constraint) -> None:
        if self.expected_ is not None and name in self.pending_ and init is not None:
            with torch.random.fork_rng(devices=[]):  # the first call draws as it would have
                value = init() if callable(init) and not isinstance(init, torch.Tensor) else init
            self._pending_fits(name, _shape(torch.as_tensor(value)))
        pending = self.pending_.pop(name, None)
        if pending is not None:
            self.register_parameter(_encode(name), nn.Parameter(pending.clone()))
            return
        store = pyro.get_param_store()
        if init is None and name in store._params:
            # A PyroParam of a PyroModule on Pyro's global store: the module put its own
            # unconstrained parameter there just before this statement; adopt that tensor.
            self.constraints_[name] = store._constraints[name]
            self.adopt(name, store._params[name])
            self.global_store_.add(name)
            return
        if init is None:
            raise KeyError(
                f"pyro.param({name!r}) has no initial value and no earlier statement created "
                "it; give its first use an initial tensor"
            )
        if callable(init) and not isinstance(init, torch.Tensor):
            init = init()
        if isinstance(init, nn.Parameter) and constraint is constraints.real:
            self.adopt(name, init)
            return
        with torch.no_grad():
            unconstrained = transform_to(constraint).inv(torch.as_tensor(init).detach())
        self.constraints_[name] = constraint
        self.register_parameter(_encode(name), nn.Parameter(unconstrained.clone()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *rest):
        """Values for parameters not created yet wait until their first statement."""
        for key in list(state_dict):
            attribute = key[len(prefix) :]
            fresh = "." not in attribute and attribute not in self._parameters
            if key.startswith(prefix) and fresh:
                self.pending_[_decode(attribute)] = state_dict[key].detach().clone()
        local = {k: v for k, v in state_dict.items() if k[len(prefix) :] in self._parameters}
        super()._load_from_state_dict(local, prefix, local_metadata, strict, *rest)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for name, value in self.pending_.items():
            state[prefix + _encode(name)] = value
        return state


class RegistryParams(Messenger):
    """Serves every ``param`` statement of a function-style program from a registry.

    Tensors in ``owned`` (the parameters of a module that is already a submodule) are
    answered but not registered a second time."""

    def __init__(self, registry: ParamRegistry, owned: frozenset[int] = frozenset()):
        super().__init__()
        self.registry, self.owned = registry, owned

    def _pyro_param(self, msg: dict) -> None:
        """Wrap the statement's function (handlers outside, e.g. ``poutine.lift``, may still
        replace it); a statement another handler already answered is only adopted."""
        constraint = msg["kwargs"].get("constraint", constraints.real)
        if msg["done"]:
            self._adopt(msg["name"], msg["value"], constraint)
        elif is_param_store_statement(msg):
            msg["fn"] = self._store_statement
        else:
            msg["fn"] = self._module_statement(msg["name"], msg["fn"], constraint)

    def _store_statement(self, name: str, init=None, constraint=constraints.real, **_):
        """What ``pyro.param(name, init, constraint)`` returns here."""
        store = pyro.get_param_store()
        if _is_live_tensor(init) and (id(init) in self.owned or not isinstance(init, nn.Parameter)):
            # pyro.module on a module already held here, or on one whose parameters are
            # substituted (torch.func.functional_call in a compiled step): nothing to own.
            if isinstance(init, nn.Parameter):
                self.registry.seen_[name] = (init, constraints.real)
            return unconstrained_handle(init)
        if init is None and id(store._params.get(name)) in self.owned:
            # A PyroParam of a held PyroModule on the global store: its own tensor, in the
            # store just now; read it there (the module is on the store: not compilable).
            return self.registry.read_store(name)
        return self.registry.constrained(name, init, constraint)

    def _module_statement(self, name: str, statement, constraint):
        """A module-local PyroModule's stand-in statement, adopting the tensor behind it."""
        answer = with_handle(statement)

        def adopted(*args, **kwargs):
            value = answer(*args, **kwargs)
            self._adopt(name, value, constraint)
            return value

        return adopted

    def _adopt(self, name: str, value, constraint) -> None:
        parameter = unconstrained_parameter(value)
        if parameter is None:
            return
        if id(parameter) in self.owned:
            if isinstance(parameter, nn.Parameter):
                self.registry.seen_[name] = (parameter, constraint)
            return
        self.registry.adopt(name, parameter, constraint)


def _is_live_tensor(value) -> bool:
    """A tensor that takes gradients (a module's parameter, or its stand-in), not an
    initial value."""
    return isinstance(value, torch.Tensor) and value.requires_grad


class PyroFunction(nn.Module):
    """A function-style Pyro model or guide as a module owning all its parameters.

    Parameters
    ----------
    function : callable
        The model or guide: a function, a bound method, or a module (a ``PyroModule`` that
        uses Pyro's global parameter store, a plain ``nn.Module`` calling ``pyro.module``).
        A bound method's object, when it is an ``nn.Module``, becomes a submodule, so all
        its parameters are trained. The program runs in the caller's Pyro settings (its
        ``PyroModule`` s keep the parameter mode they were built in).
    registry : ParamRegistry
        Where the ``pyro.param`` parameters live; share one between a model and its guide.
    register : bool
        Hold ``registry`` as a submodule (``self.registry``), so that its parameters are
        among this module's and reach any optimizer or compiled step built from it. Of a
        model and guide sharing a registry, exactly one registers it (a second would
        write every parameter twice into a file).
    registered_owners : tuple of nn.Module
        Modules another program already holds: a bound method of one of them uses its
        parameters without holding the module a second time.
    role : str
        ``"model"`` or ``"guide"``: the registry knows when every program it serves has run.
    """

    def __init__(
        self,
        function: Callable,
        registry: ParamRegistry,
        register: bool = True,
        registered_owners: tuple[nn.Module, ...] = (),
        role: str = "model",
    ):
        super().__init__()
        registry.users_.add(role)
        self.role = role
        if register:
            self.registry = registry
        else:
            object.__setattr__(self, "registry", registry)
        owner = function if isinstance(function, nn.Module) else getattr(function, "__self__", None)
        if not isinstance(owner, nn.Module):
            owner = None
        if owner is not None and any(owner is other for other in registered_owners):
            # Held once, by the other program: a module under two names in one tree is not
            # restored by torch.func.functional_call (the compiled step's substitution).
            object.__setattr__(self, "shared_owner_", owner)
        elif owner is not None:
            self.owner = owner
        object.__setattr__(self, "function", function)

    def owner_module(self) -> nn.Module | None:
        """The module whose method this program is (held here or by the other program)."""
        return self._modules.get("owner", getattr(self, "shared_owner_", None))

    def forward(self, *args, **kwargs):
        owner = self.owner_module()
        owned = frozenset() if owner is None else frozenset(map(id, owner.parameters()))
        self.registry.check()
        with RegistryParams(self.registry, owned):
            result = self.function(*args, **kwargs)
        self.registry.after_call(self.role)
        return result

    def extra_repr(self) -> str:
        return f"function={getattr(self.function, '__qualname__', type(self.function).__name__)}"


def as_pyro_modules(model: Callable, guide: Callable) -> tuple[nn.Module, nn.Module]:
    """Model and guide as modules owning every parameter they use.

    A :class:`LocalParamsModule` stays as it is (its parameters are its own); any other
    program becomes a :class:`PyroFunction`. Wrapped programs share one
    :class:`ParamRegistry`, held as a submodule by the first of them."""
    for role, program in (("model", model), ("guide", guide)):
        if not callable(program):
            raise TypeError(f"the {role} must be callable, got {type(program).__name__}")
    registry, modules = ParamRegistry(), []
    for role, program in (("model", model), ("guide", guide)):
        if isinstance(program, LocalParamsModule):
            modules.append(program)
            continue
        wrapped = [m for m in modules if isinstance(m, PyroFunction)]
        owners = tuple(m.owner_module() for m in wrapped if m.owner_module() is not None)
        modules.append(PyroFunction(program, registry, not wrapped, owners, role))
    return modules[0], modules[1]
