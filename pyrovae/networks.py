"""Neural networks used by models and guides: a configurable MLP and the Gaussian encoder.

Scales are parameterised stably: ``softplus(raw) + min_scale``, so they are positive,
differentiable everywhere and never collapse to zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}

MIN_SCALE = 1e-4
"""Smallest standard deviation any scale head can produce (in data or latent units)."""


def positive_scale(raw: torch.Tensor, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """Map an unconstrained tensor to a strictly positive scale: ``softplus(raw) + min_scale``."""
    return F.softplus(raw) + min_scale


def activation_module(name: str) -> nn.Module:
    """Return a fresh activation module by name; raises ``ValueError`` listing valid names."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; valid names: {valid}") from None


class MLP(nn.Sequential):
    """Fully connected network ``in -> hidden[0] -> ... -> hidden[-1]`` with an activation after
    every layer.

    Parameters
    ----------
    in_features : int
        Input width.
    hidden_sizes : sequence of int
        Widths of the hidden layers; may be empty (then the MLP is the identity).
    activation : str
        Name in :data:`ACTIVATIONS`.
    """

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], activation: str = "relu"):
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), activation_module(activation)]
            width = size
        super().__init__(*layers)
        self.out_features = width

    @staticmethod
    def make_head(in_features: int, out_features: int) -> nn.Module:
        """Output layer for a likelihood on top of this network: a dense linear map."""
        return nn.Linear(in_features, out_features)


def _flatten_leading(x: torch.Tensor, trailing: int) -> tuple[torch.Tensor, torch.Size]:
    """Merge all but the last ``trailing`` dims into one batch dim; return the merged shape."""
    leading = x.shape[: x.dim() - trailing]
    return x.reshape((-1,) + x.shape[x.dim() - trailing :]), leading


class ConvEncoder(nn.Module):
    """Convolutional trunk for flattened grey-scale images (H*W features, H and W divisible
    by 4): two stride-2 convolutions, then a dense layer of width ``out_features``.

    Accepts any leading batch dims; extra input features beyond H*W (e.g. a condition) are
    appended to the flattened convolutional features.
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        channels: Sequence[int] = (32, 64),
        out_features: int = 256,
        activation: str = "relu",
        extra_features: int = 0,
    ):
        super().__init__()
        height, width = image_shape
        if height % 4 or width % 4:
            raise ValueError(
                f"convolutional networks need H and W divisible by 4, got {image_shape}"
            )
        self.image_shape, self.extra_features = (height, width), extra_features
        first, second = channels
        self.convolutions = nn.Sequential(
            nn.Conv2d(1, first, 3, stride=2, padding=1),
            activation_module(activation),
            nn.Conv2d(first, second, 3, stride=2, padding=1),
            activation_module(activation),
        )
        flat = second * (height // 4) * (width // 4) + extra_features
        self.dense = nn.Sequential(nn.Linear(flat, out_features), activation_module(activation))
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.image_shape[0] * self.image_shape[1]
        images, extra = x[..., :pixels], x[..., pixels:]
        flat, leading = _flatten_leading(images, 1)
        features = self.convolutions(flat.reshape(-1, 1, *self.image_shape)).flatten(1)
        features = features.reshape(leading + features.shape[-1:])
        return self.dense(torch.cat([features, extra], -1) if self.extra_features else features)


class ConvDecoder(nn.Module):
    """Convolutional trunk from a latent vector to per-pixel features: a dense layer to a
    (C, H/4, W/4) map and two stride-2 transposed convolutions to (``pixel_channels``, H, W).

    The output is flattened to ``pixel_channels * H * W`` features; likelihood heads built by
    :meth:`make_head` act on each pixel's channels (a 1x1 convolution), so the output layer
    does not grow with the square of the number of pixels.
    """

    def __init__(
        self,
        in_features: int,
        image_shape: tuple[int, int],
        channels: Sequence[int] = (64, 32),
        pixel_channels: int = 16,
        activation: str = "relu",
    ):
        super().__init__()
        height, width = image_shape
        if height % 4 or width % 4:
            raise ValueError(
                f"convolutional networks need H and W divisible by 4, got {image_shape}"
            )
        self.image_shape, self.pixel_channels = (height, width), pixel_channels
        first, second = channels
        self.start = (first, height // 4, width // 4)
        self.dense = nn.Sequential(
            nn.Linear(in_features, first * (height // 4) * (width // 4)),
            activation_module(activation),
        )
        self.deconvolutions = nn.Sequential(
            nn.ConvTranspose2d(first, second, 4, stride=2, padding=1),
            activation_module(activation),
            nn.ConvTranspose2d(second, pixel_channels, 4, stride=2, padding=1),
            activation_module(activation),
        )
        self.out_features = pixel_channels * height * width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, leading = _flatten_leading(z, 1)
        maps = self.deconvolutions(self.dense(flat).reshape(-1, *self.start))
        return maps.reshape(leading + (self.out_features,))

    def make_head(self, in_features: int, out_features: int) -> nn.Module:
        return PixelwiseLinear(self.pixel_channels, self.image_shape, out_features)


class PixelwiseLinear(nn.Module):
    """A linear map applied to each pixel's channels: (..., C*H*W) -> (..., H*W*k), with
    k = out_features / (H*W) outputs per pixel, pixel-major (as a likelihood that reshapes
    its head to (..., D, k) expects)."""

    def __init__(self, channels: int, image_shape: tuple[int, int], out_features: int):
        super().__init__()
        pixels = image_shape[0] * image_shape[1]
        if out_features % pixels:
            raise ValueError(f"out_features={out_features} is not a multiple of {pixels} pixels")
        self.channels, self.pixels, self.per_pixel = channels, pixels, out_features // pixels
        self.weight = nn.Parameter(torch.randn(self.per_pixel, channels) / channels**0.5)
        self.bias = nn.Parameter(torch.zeros(self.per_pixel))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        maps = hidden.reshape(hidden.shape[:-1] + (self.channels, self.pixels))
        out = torch.einsum("...cp,kc->...pk", maps, self.weight) + self.bias
        return out.reshape(hidden.shape[:-1] + (self.pixels * self.per_pixel,))
