"""Walking in latent space: interpolation between codes and attribute-vector arithmetic.

The functions work on torch tensors of codes (posterior means of a VAE, or any
autoencoder's codes) and keep their dtype and device.
"""

from __future__ import annotations

import numpy as np
import torch

INTERPOLATION_METHODS = ("linear", "spherical")
"""Methods accepted by :func:`interpolate`."""

PARALLEL_TOLERANCE = 1e-6
"""Slerp falls back to lerp when sin(angle between the endpoints) is below this value."""


def _as_codes(z, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(z)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if tensor.dim() not in (1, 2) or tensor.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (L,) or (N, L); got {tuple(tensor.shape)}")
    return tensor


def interpolate(z_a, z_b, steps: int = 10, method: str = "linear") -> torch.Tensor:
    """Points on the path from ``z_a`` to ``z_b``, endpoints included.

    Parameters
    ----------
    z_a, z_b : array-like of shape (L,) or (N, L)
        Start and end codes (N pairs when 2-D).
    steps : int
        Number of points, at least 2; the weights are ``t = linspace(0, 1, steps)``.
    method : str
        ``"linear"``: ``(1 - t) z_a + t z_b``. ``"spherical"`` (slerp, Shoemake 1985):
        ``sin((1 - t) w) / sin(w) z_a + sin(t w) / sin(w) z_b`` with w the angle between
        ``z_a`` and ``z_b``; it keeps the norm of equal-norm endpoints, which keeps the path in
        the shell where a high-dimensional Gaussian prior puts its mass. Nearly parallel
        endpoints (``sin w`` below :data:`PARALLEL_TOLERANCE`) fall back to linear.

    Returns
    -------
    torch.Tensor
        Shape (steps, L) for 1-D endpoints, (N, steps, L) for 2-D ones; the first point is
        exactly ``z_a`` and the last exactly ``z_b``.
    """
    if method not in INTERPOLATION_METHODS:
        raise ValueError(
            f"unknown method {method!r}; valid names: {', '.join(INTERPOLATION_METHODS)}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer of at least 2, got {steps!r}")
    a, b = _as_codes(z_a, "z_a"), _as_codes(z_b, "z_b")
    if a.shape != b.shape:
        raise ValueError(f"z_a and z_b differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    b = b.to(a)
    t = torch.linspace(0, 1, steps, dtype=a.dtype, device=a.device)[:, None]
    weight_a, weight_b = _weights(a, b, t, method)  # each (..., steps, 1)
    path = weight_a * a[..., None, :] + weight_b * b[..., None, :]
    path[..., 0, :], path[..., -1, :] = a, b
    return path


def _weights(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, method: str):
    """Interpolation weights of a and b, shape (..., steps, 1)."""
    linear = (1 - t, t)
    if method == "linear":
        return linear
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30)
    omega = torch.arccos(cosine.clamp(-1.0, 1.0))[..., None, None]  # (..., 1, 1)
    sine = torch.sin(omega)
    parallel = sine.abs() < PARALLEL_TOLERANCE
    safe = torch.where(parallel, torch.ones_like(sine), sine)
    spherical = (torch.sin((1 - t) * omega) / safe, torch.sin(t * omega) / safe)
    return tuple(
        torch.where(parallel, lin.expand_as(sph), sph)
        for lin, sph in zip(linear, spherical, strict=True)
    )


def attribute_vector(vae, x, labels, from_label, to_label) -> torch.Tensor:
    """Direction in latent space from one group of data to another (White, 2016).

    Parameters
    ----------
    vae : pyrovae.VAE or pyrovae.baselines.Autoencoder
        Anything whose ``encode(x)`` returns posterior means or codes (or a (mean, scale)
        pair, of which the mean is used).
    x : array-like of shape (N, D)
        Data.
    labels : array-like of shape (N,)
        A label per data point.
    from_label, to_label
        The two groups' labels.

    Returns
    -------
    torch.Tensor
        Shape (L,): mean code of the ``to_label`` group minus that of the ``from_label`` group.
    """
    codes = posterior_means(vae, x)
    labels = _as_label_array(labels)
    if labels.shape != codes.shape[:1]:
        raise ValueError(
            f"labels must have shape ({codes.shape[0]},), one per data point; "
            f"got {tuple(labels.shape)}"
        )
    means = []
    for label in (from_label, to_label):
        members = torch.from_numpy(np.asarray(labels == label, dtype=bool)).to(codes.device)
        if not bool(members.any()):
            raise ValueError(f"no data point has label {label!r}")
        means.append(codes[members].mean(0))
    return means[1] - means[0]


def _as_label_array(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def apply_attribute(z, vector, strength=1.0) -> torch.Tensor:
    """Move codes along an attribute vector: ``z + strength * vector``.

    Parameters
    ----------
    z : array-like of shape (L,) or (N, L)
        Codes.
    vector : array-like of shape (L,)
        Direction, e.g. from :func:`attribute_vector`.
    strength : float or sequence of float
        Multiple(s) of the vector to add. A sequence of S strengths gives S results
        stacked along a new second-to-last axis.

    Returns
    -------
    torch.Tensor
        Shape of ``z`` for a scalar strength; (S, L) or (N, S, L) for S strengths.
    """
    codes = _as_codes(z, "z")
    direction = torch.as_tensor(vector).to(codes)
    if direction.shape != codes.shape[-1:]:
        raise ValueError(
            f"vector must have shape ({codes.shape[-1]},); got {tuple(direction.shape)}"
        )
    strengths = torch.as_tensor(strength).to(codes)
    if strengths.dim() == 0:
        return codes + strengths * direction
    if strengths.dim() != 1:
        raise ValueError("strength must be a number or a 1-D sequence of numbers")
    return codes[..., None, :] + strengths[:, None] * direction


def posterior_means(model, x) -> torch.Tensor:
    """Codes of ``x``: the first element of ``model.encode(x)`` when it returns a pair
    (a VAE's posterior mean and scale), else its whole result (an autoencoder's codes)."""
    encoded = model.encode(x)
    return encoded[0] if isinstance(encoded, tuple) else encoded
