"""Hamiltonian Monte Carlo transitions on a geometric annealing path, vectorized over chains
and data points.

The states are flat unconstrained latent vectors ``u`` of shape (C, N, D): C chains for each
of N data points, D unconstrained latent coordinates per data point. The annealed target at
inverse temperature beta in [0, 1] is the geometric path of Neal (2001)

    log pi_beta(u) = (1 - beta) log r(u) + beta log p(x, u) + const,

with r the starting density (the guide q(z|x) or the prior p(z)) and both densities taken in
the unconstrained space (each includes ``log |det dz/du|``). :class:`PathState` caches the two
log densities and their gradients at a state, so the density and gradient at *any* beta are
linear combinations and one gradient evaluation serves two consecutive temperatures.

One transition (:func:`hmc_transition`) draws a momentum p ~ N(0, I_D), runs
``num_leapfrog`` leapfrog steps of size ``step_size[n]`` (one step size per data point,
shared by its chains) and accepts by Metropolis-Hastings on H(u, p) = -log pi_beta(u) +
``|p|^2 / 2``, so it leaves pi_beta exactly invariant for any fixed step size and number of
steps (Neal, 2011). Proposals with a non-finite energy are rejected.

References
----------
Neal, R. M. (2001). Annealed importance sampling. Statistics and Computing 11, 125-139.
Neal, R. M. (2011). MCMC using Hamiltonian dynamics. Handbook of Markov Chain Monte Carlo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass
class PathState:
    """A batch of states on the annealing path with cached densities and gradients.

    Attributes
    ----------
    position : torch.Tensor of shape (C, N, D)
        Unconstrained latent vectors u.
    log_joint : torch.Tensor of shape (C, N)
        log p(x, z(u)) in nats (constrained space, no Jacobian).
    log_ref : torch.Tensor of shape (C, N)
        log r(z(u)) in nats, the starting density (guide or prior; no Jacobian).
    log_det : torch.Tensor of shape (C, N)
        ``log |det dz/du|`` in nats.
    grad_joint, grad_ref : torch.Tensor of shape (C, N, D)
        Gradients in u of ``log_joint + log_det`` and ``log_ref + log_det``.
    """

    position: torch.Tensor
    log_joint: torch.Tensor
    log_ref: torch.Tensor
    log_det: torch.Tensor
    grad_joint: torch.Tensor
    grad_ref: torch.Tensor

    @property
    def log_ratio(self) -> torch.Tensor:
        """log p(x, z) - log r(z), shape (C, N): the AIS weight increment per unit of beta."""
        return self.log_joint - self.log_ref

    def log_density(self, beta: float) -> torch.Tensor:
        """Unnormalized log pi_beta(u) in unconstrained space, shape (C, N)."""
        return (1 - beta) * self.log_ref + beta * self.log_joint + self.log_det

    def grad(self, beta: float) -> torch.Tensor:
        """Gradient of log pi_beta(u) in u, shape (C, N, D)."""
        return (1 - beta) * self.grad_ref + beta * self.grad_joint

    def where(self, accept: torch.Tensor, other: PathState) -> PathState:
        """This state where ``accept`` (shape (C, N)) is true, ``other`` elsewhere."""
        parts = {}
        for field in fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            mask = accept.reshape(accept.shape + (1,) * (mine.dim() - accept.dim()))
            parts[field.name] = torch.where(mask, mine, theirs)
        return PathState(**parts)


Evaluator = Callable[[torch.Tensor], PathState]
"""Maps positions u of shape (C, N, D) to their :class:`PathState`."""


def _per_point(step_size: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Step sizes of shape (N,) broadcast against (C, N, D)."""
    return step_size.to(like).reshape(1, -1, 1)


def leapfrog(
    state: PathState,
    momentum: torch.Tensor,
    evaluate: Evaluator,
    beta: float,
    step_size: torch.Tensor,
    num_leapfrog: int,
) -> tuple[PathState, torch.Tensor]:
    """Integrate Hamilton's equations for ``H = -log pi_beta(u) + |p|^2 / 2`` (identity mass).

    Uses ``num_leapfrog`` gradient evaluations (the gradient at the start is cached).

    Returns
    -------
    (PathState, torch.Tensor)
        The proposed state and the final momentum, shape (C, N, D).
    """
    eps = _per_point(step_size, state.position)
    momentum = momentum + 0.5 * eps * state.grad(beta)
    for step in range(num_leapfrog):
        state = evaluate(state.position + eps * momentum)
        scale = 0.5 if step == num_leapfrog - 1 else 1.0
        momentum = momentum + scale * eps * state.grad(beta)
    return state, momentum


def hmc_transition(
    state: PathState,
    evaluate: Evaluator,
    beta: float,
    step_size: torch.Tensor,
    num_leapfrog: int,
) -> tuple[PathState, torch.Tensor]:
    """One HMC transition leaving pi_beta invariant, for every chain and data point at once.

    Parameters
    ----------
    state : PathState
        Current states, positions of shape (C, N, D).
    evaluate : callable
        Maps positions to their :class:`PathState`.
    beta : float
        Inverse temperature of the target, in [0, 1].
    step_size : torch.Tensor of shape (N,)
        Leapfrog step size per data point (units of u), fixed during the transition.
    num_leapfrog : int
        Leapfrog steps per proposal.

    Returns
    -------
    (PathState, torch.Tensor)
        The next states and the Metropolis-Hastings acceptance probabilities
        min(1, exp(-Delta H)), shape (C, N) (0 for a non-finite proposal).
    """
    momentum = torch.randn_like(state.position)
    proposal, final_momentum = leapfrog(state, momentum, evaluate, beta, step_size, num_leapfrog)
    start_energy = -state.log_density(beta) + 0.5 * momentum.square().sum(-1)
    end_energy = -proposal.log_density(beta) + 0.5 * final_momentum.square().sum(-1)
    log_accept = (start_energy - end_energy).clamp(max=0.0)
    finite = torch.isfinite(end_energy) & torch.isfinite(proposal.position).all(-1)
    accept_prob = torch.where(finite, log_accept.exp(), torch.zeros_like(log_accept))
    accept = torch.rand_like(accept_prob) < accept_prob
    return proposal.where(accept, state), accept_prob
