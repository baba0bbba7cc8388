"""Figures without torchvision: image grids written with NumPy and Matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(
    images, image_shape: tuple[int, int], num_columns: int | None = None, padding: int = 1
) -> np.ndarray:
    """Tile flattened images into one 2-D array, row by row, with gaps of value 0 between tiles.

    Parameters
    ----------
    images : array-like of shape (N, H*W)
        Pixel intensities in [0, 1].
    image_shape : (int, int)
        Height and width H, W of one image.
    num_columns : int, optional
        Tiles per row; defaults to ceil(sqrt(N)).
    padding : int
        Gap between tiles, in pixels.

    Returns
    -------
    numpy.ndarray
        Array of shape (rows*(H+padding)+padding, cols*(W+padding)+padding), values in [0, 1].
    """
    array = (
        images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    )
    height, width = image_shape
    if array.ndim != 2 or array.shape[1] != height * width:
        raise ValueError(
            f"images must have shape (N, {height * width}) for image_shape {image_shape}; "
            f"got {array.shape}"
        )
    count = array.shape[0]
    columns = num_columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding))
    for index, image in enumerate(np.clip(array, 0.0, 1.0)):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image.reshape(height, width)
    return grid


def save_image_grid(
    images,
    path: str | Path,
    image_shape: tuple[int, int],
    num_columns: int | None = None,
    scale: int = 4,
) -> Path:
    """Write :func:`image_grid` as a PNG: dark strokes on white, ``scale`` times enlarged.

    Returns the path written.
    """
    import matplotlib.image

    grid = image_grid(images, image_shape, num_columns)
    enlarged = np.kron(grid, np.ones((scale, scale)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, 1.0 - enlarged, cmap="gray", vmin=0.0, vmax=1.0)
    return path
