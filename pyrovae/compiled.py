"""Compiled training steps: the loss and gradients of an objective for a Pyro model and guide,
traced once per batch shape into a graph of ATen operations and replayed every step.

Tracing (``torch.fx.experimental.proxy_tensor.make_fx``) runs Pyro's effect handlers,
plates and distribution code once; the recorded graph holds only the tensor operations,
including the random draws, which stay random on every replay (they read the global torch
generator exactly as the traced code does, so a seeded replay reproduces the traced code's
loss and gradients bit for bit). With ``backend="inductor"`` the graph is further compiled
by ``torch.compile``.

Before replay the graph is simplified without changing any value: dead code is dropped, and
so is every view operation whose result has the same shape, strides, storage offset and
dtype as a tensor it is a view of (Pyro's broadcasting leaves many: expands and views to the
shape a tensor already has, transposes of transposes, detaches). Replay runs with autograd
off: the graph already holds the backward pass, so recording it again would only cost time
and keep every intermediate tensor alive through the gradients.

The method :meth:`CompiledStep.loss_and_norm` also computes the gradients' global 2-norm
(and clips them) inside the graph, with the operations of ``torch.nn.utils.clip_grad_norm_``.

What is frozen at trace time: Python control flow and any number read from a tensor. That
holds for the built-in VAE and for models whose structure does not depend on data values;
the equality test in ``tests/test_compiled.py`` guards it. The objective's own settings
(e.g. the annealed KL weight) are part of the cache key, so a change retraces. Site scales
(``poutine.scale``, plate subsampling scales) are Python numbers at trace time and enter the
graph as constants: the compiled traceable objectives honour them exactly as the eager ones
(``tests/test_pyro_elbo.py`` compares them with Pyro's ``Trace_ELBO``). A model whose plate
depth the objective must guess is run once eagerly before tracing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import pyro
import torch
from torch import fx, nn
from torch.func import functional_call

BACKENDS = ("graph", "inductor")

_UNTRACKED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})
"""View operations whose schema does not declare that the result aliases the input."""

_BIT_VIEWS = frozenset(
    {torch.ops.aten._conj.default, torch.ops.aten.conj.default, torch.ops.aten._neg_view.default}
)
"""Views that change values through a conjugate or negative bit, which the traced metadata
does not record: never taken for identities."""


def _objective_state(objective) -> tuple:
    """The objective's numeric settings (public attributes): part of the graph cache key."""
    return tuple(
        sorted(
            (k, v)
            for k, v in vars(objective).items()
            if isinstance(v, float | int) and not k.startswith("_")
        )
    )


def _prepare_objective(loss_module: nn.Module, batch: tuple) -> None:
    """Settle what the objective finds out on its first call (the model's plate depth) before
    tracing, so that the guess runs eagerly and not into the graph."""
    elbo = getattr(loss_module, "elbo", None)
    plate_nesting = getattr(elbo, "plate_nesting", None)
    if plate_nesting is not None:
        with torch.no_grad():
            plate_nesting(loss_module.model, loss_module.guide, batch, {})


def _layout(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _is_view(node: fx.Node) -> bool:
    """``node`` returns a view of its first argument (a tensor node), nothing else."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in _UNTRACKED_VIEWS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or node.target in _BIT_VIEWS or schema.is_mutable:
        return False
    if len(schema.returns) != 1 or not schema.arguments:
        return False
    returned, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return (
        returned is not None
        and first is not None
        and not returned.is_write
        and set(returned.before_set) == set(first.before_set)
    )


def _metadata(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    return (*_layout(value), value.storage_offset())


def drop_identity_views(graph: fx.Graph) -> int:
    """Replace every view operation whose result is indistinguishable from a tensor it views
    (same shape, strides, storage offset, dtype and device: e.g. ``t(t(w))``, an expand or
    view to the shape it already has, ``detach``) by that tensor; return how many were
    replaced. Conjugate and negative views are kept.

    Values and aliasing are unchanged: the replaced result and its replacement share storage
    and layout. Needs the ``"val"`` metadata ``make_fx`` records; nodes without it are kept.
    """
    replaced = 0
    for node in list(graph.nodes):
        if not _is_view(node):
            continue
        target = _metadata(node)
        source = node.args[0]
        while target is not None and isinstance(source, fx.Node):
            if _metadata(source) == target:
                node.replace_all_uses_with(source)
                replaced += 1
                break
            source = source.args[0] if _is_view(source) else None
    graph.eliminate_dead_code()
    return replaced


_aten = torch.ops.aten
_IDENTITY_OPERAND = {
    # op: (position of the operand that leaves the other one unchanged, its neutral values)
    _aten.mul.Tensor: (1, (1, 1.0)),
    _aten.mul.Scalar: (1, (1, 1.0)),
    _aten.div.Tensor: (1, (1, 1.0)),
    _aten.div.Scalar: (1, (1, 1.0)),
    _aten.pow.Tensor_Scalar: (1, (1, 1.0)),
    _aten.sub.Tensor: (1, (0, 0.0)),  # x - 0 is x even for x = -0.0 (x + 0 is not)
}


def _mutations_are_fills(graph: fx.Graph) -> bool:
    """Whether every in-place operation in ``graph`` writes a fresh intermediate that nothing
    else uses (e.g. ``normal_`` of an ``empty``), so that no tensor changes after its uses."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for argument, value in zip(schema.arguments, node.args, strict=False):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and (
                not isinstance(value, fx.Node)
                or value.op != "call_function"
                or len(value.users) != 1
            ):
                return False
        if node.kwargs:
            return False
    return True


def _may_alias_first_argument(node: fx.Node) -> bool:
    """``node``'s result may share storage with its first argument (views, including those
    returning several tensors, and items taken from them)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.getitem or node.target in _UNTRACKED_VIEWS:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _seen_by_caller(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose result (or a view of it) the graph returns."""
    seen: set[fx.Node] = set()
    pending = [n for n in graph.find_nodes(op="output")[0].all_input_nodes]
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            if _may_alias_first_argument(node):
                pending.append(node.args[0])
    return seen


def drop_exact_identities(graph: fx.Graph) -> int:
    """Replace ``x * 1``, ``x / 1``, ``x ** 1`` and ``x - 0`` (exact in IEEE arithmetic, signed
    zeros and NaNs included) by ``x`` where the result has the same shape, strides, dtype and
    device as ``x``; return how many were replaced (autograd formulas and unit weights leave
    several in the traced graph).

    The result then shares ``x``'s storage instead of being a copy, so the pass only runs
    when no tensor is modified in place after its uses (see :func:`_mutations_are_fills`), and
    it keeps every result the graph returns (callers may modify the gradients in place).
    """
    if not _mutations_are_fills(graph):
        return 0
    returned = _seen_by_caller(graph)
    replaced = 0
    for node in list(graph.nodes):
        rule = _IDENTITY_OPERAND.get(node.target) if node.op == "call_function" else None
        if rule is None or node in returned or len(node.args) != 2 or node.kwargs:
            continue
        position, neutral = rule
        operand, source = node.args[position], node.args[1 - position]
        exact = type(operand) in (int, float) and operand in neutral
        if not exact or not isinstance(source, fx.Node):
            continue
        target, original = _metadata(node), _metadata(source)
        if target is not None and original is not None and target[:4] == original[:4]:
            node.replace_all_uses_with(source)
            replaced += 1
    graph.eliminate_dead_code()
    return replaced


class CompiledStep:
    """Loss and gradients of ``loss_module`` (an objective applied to model and guide).

    Parameters
    ----------
    loss_module : torch.nn.Module
        ``objective(model, guide)``; its forward returns the loss for a batch. The objective
        must not move values to the host inside the loss (Pyro's ``Trace_ELBO`` does; use
        :class:`pyrovae.objectives.MonteCarloELBO`, which is equal for reparameterized guides,
        ``poutine.scale`` and subsampled plates included).
    backend : str
        ``"graph"`` replays the traced ATen graph; ``"inductor"`` compiles it further.

    Calling it with a batch sets ``.grad`` of every parameter of ``loss_module`` and returns
    the loss per data point (a detached tensor; no host synchronisation); the method
    ``loss_and_norm`` also returns the gradients' global 2-norm.
    """

    def __init__(self, loss_module: nn.Module, backend: str = "graph"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid names: {', '.join(BACKENDS)}")
        self.loss_module, self.backend = loss_module, backend
        self.names, self.parameters = zip(*loss_module.named_parameters(), strict=True)
        self._graphs: dict[tuple, Callable] = {}

    def reference(self, params, batch: tuple):
        """The traced function: the loss per data point and its gradients, computed eagerly."""
        state = dict(zip(self.names, params, strict=True))
        with pyro.validation_enabled(False):
            loss = functional_call(self.loss_module, state, batch) / batch[0].shape[0]
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    def reference_with_norm(self, params, batch: tuple, clip_norm: float | None = None):
        """The traced function of :meth:`loss_and_norm`: loss, gradients (clipped to global
        2-norm ``clip_norm`` when given) and their 2-norm before clipping, computed eagerly
        with the operations of ``torch.nn.utils.clip_grad_norm_``."""
        loss, grads = self.reference(params, batch)
        norm = torch.nn.utils.get_total_norm(grads)
        if clip_norm is not None:
            # torch.nn.utils.clip_grads_with_norm_, out of place (the gradients are fresh)
            coefficient = torch.clamp(float(clip_norm) / (norm + 1e-6), max=1.0)
            grads = torch._foreach_mul(grads, coefficient)
        return loss, tuple(grads), norm

    def same_parameters(self, parameters: Sequence[torch.Tensor]) -> bool:
        """Whether ``parameters`` are this step's parameters, in the same order (the order of
        the norm :meth:`loss_and_norm` computes; e.g. an optimizer's parameter list)."""
        return len(parameters) == len(self.parameters) and all(
            a is b for a, b in zip(parameters, self.parameters, strict=True)
        )

    def _key(self, batch: tuple, *extra) -> tuple:
        return (
            tuple(_layout(t) for t in batch),
            _objective_state(self.loss_module.elbo),
            *extra,
        )

    def graph_for(self, batch: tuple) -> Callable:
        """The replayable function ``(params, batch) -> (loss, grads)`` for this batch's
        shapes and the objective's current settings (traced on first use, then cached)."""
        key = self._key(batch)
        if key not in self._graphs:
            self._graphs[key] = self._trace(batch)
        return self._graphs[key]

    def norm_graph_for(self, batch: tuple, clip_norm: float | None = None) -> Callable:
        """As :meth:`graph_for`, for ``(params, batch) -> (loss, grads, norm)``."""
        key = self._key(batch, "norm", clip_norm)
        if key not in self._graphs:
            self._graphs[key] = self._trace(batch, clip_norm=clip_norm, with_norm=True)
        return self._graphs[key]

    def _trace(self, batch: tuple, clip_norm: float | None = None, with_norm: bool = False):
        from torch.fx.experimental.proxy_tensor import make_fx

        _prepare_objective(self.loss_module, batch)
        params = [p.detach().requires_grad_(p.requires_grad) for p in self.parameters]
        if with_norm:
            function = lambda params, batch: self.reference_with_norm(params, batch, clip_norm)  # noqa: E731
        else:
            function = lambda params, batch: self.reference(params, batch)  # noqa: E731
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if batch[0].is_cuda else None
        graph = make_fx(function)(params, batch)
        torch.set_rng_state(rng)  # tracing drew real random numbers: give them back
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        graph.graph.eliminate_dead_code()  # terms the objective computes but does not use
        drop_identity_views(graph.graph)
        drop_exact_identities(graph.graph)
        graph.recompile()
        if self.backend == "inductor":
            return torch.compile(graph, dynamic=False)
        return graph

    def _set_grads(self, grads) -> None:
        for parameter, grad in zip(self.parameters, grads, strict=True):
            parameter.grad = grad

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """One batch of the model's arguments (e.g. ``x`` or ``x, y``); sets the gradients."""
        graph = self.graph_for(batch)
        with torch.no_grad():
            loss, grads = graph(list(self.parameters), batch)
        self._set_grads(grads)
        return loss

    def loss_and_norm(
        self, *batch: torch.Tensor, clip_norm: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As calling the step, and also the gradients' global 2-norm (over
        :attr:`parameters`, in order) before clipping; with ``clip_norm`` the gradients set are
        clipped to that norm. Equal to ``torch.nn.utils.clip_grad_norm_`` (or
        ``get_total_norm`` without clipping) applied after the call."""
        graph = self.norm_graph_for(batch, clip_norm)
        with torch.no_grad():
            loss, grads, norm = graph(list(self.parameters), batch)
        self._set_grads(grads)
        return loss, norm
