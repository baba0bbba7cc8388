"""Compiled training steps: the loss and gradients of an objective for a Pyro model and guide,
traced once per batch shape into a graph of ATen operations and replayed every step.

Tracing (``torch.fx.experimental.proxy_tensor.make_fx``) runs Pyro's effect handlers,
plates and distribution code once; the recorded graph holds only the tensor operations,
including the random draws, which stay random on every replay (they read the global torch
generator exactly as the traced code does, so a seeded replay reproduces the traced code's
loss and gradients bit for bit). With ``backend="inductor"`` the graph is further compiled
by ``torch.compile``.

What is frozen at trace time: Python control flow and any number read from a tensor. That
holds for the built-in VAE and for models whose structure does not depend on data values;
the equality test in ``tests/test_compiled.py`` guards it. The objective's own settings
(e.g. the annealed KL weight) are part of the cache key, so a change retraces.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from torch import nn
from torch.func import functional_call

BACKENDS = ("graph", "inductor")


def _objective_state(objective) -> tuple:
    return tuple(sorted((k, v) for k, v in vars(objective).items() if isinstance(v, float | int)))


class CompiledStep:
    """Loss and gradients of ``loss_module`` (an objective applied to model and guide).

    Parameters
    ----------
    loss_module : torch.nn.Module
        ``objective(model, guide)``; its forward returns the loss for a batch. The objective
        must not move values to the host inside the loss (Pyro's ``Trace_ELBO`` does; use
        :class:`pyrovae.objectives.MonteCarloELBO`, which is equal for reparameterized guides).
    backend : str
        ``"graph"`` replays the traced ATen graph; ``"inductor"`` compiles it further.

    Calling it with a batch sets ``.grad`` of every parameter of ``loss_module`` and returns
    the loss per data point (a detached tensor; no host synchronisation).
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

    def graph_for(self, batch: tuple) -> Callable:
        key = (
            tuple((tuple(t.shape), t.dtype, t.device) for t in batch),
            _objective_state(self.loss_module.elbo),
        )
        if key not in self._graphs:
            self._graphs[key] = self._trace(batch)
        return self._graphs[key]

    def _trace(self, batch: tuple) -> Callable:
        from torch.fx.experimental.proxy_tensor import make_fx

        params = [p.detach().requires_grad_(p.requires_grad) for p in self.parameters]
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if batch[0].is_cuda else None
        graph = make_fx(lambda params, batch: self.reference(params, batch))(params, batch)
        torch.set_rng_state(rng)  # tracing drew real random numbers: give them back
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        graph.graph.eliminate_dead_code()  # terms the objective computes but does not use
        graph.recompile()
        if self.backend == "inductor":
            return torch.compile(graph, dynamic=False)
        return graph

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """One batch of the model's arguments (e.g. ``x`` or ``x, y``); sets the gradients."""
        loss, grads = self.graph_for(batch)(list(self.parameters), batch)
        for parameter, grad in zip(self.parameters, grads, strict=True):
            parameter.grad = grad
        return loss
