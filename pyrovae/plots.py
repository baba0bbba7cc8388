"""Figures without torchvision: image grids written with NumPy and Matplotlib, and the
figures of a fitted model (prior samples, reconstructions, training curves, latent scatter,
2-D manifold, interpolation, attribute arithmetic) and of model comparisons.
"""

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
    """Write :func:`image_grid` as an image: dark strokes on white, ``scale`` times enlarged.

    The format follows the suffix of ``path`` (``.png``, ``.pdf``, ... as Matplotlib writes
    them); a path without such a suffix gets ``.png`` added, as :func:`save_figure` does.
    Written atomically, never over a file of another kind (:func:`pyrovae.outputs.write_file`).
    Returns the path written.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    from pyrovae.outputs import write_file

    path = Path(path)
    extension = path.suffix.lower().lstrip(".")
    if extension not in FigureCanvasBase.get_supported_filetypes():
        path, extension = path.with_name(f"{path.name}.png"), "png"
    writer = image_grid_writer(images, image_shape, extension, num_columns, scale)
    return write_file(path, writer, output_kind(extension)).path


def image_grid_writer(images, image_shape, extension: str, num_columns=None, scale: int = 4):
    """``write(handle)`` writing :func:`image_grid` in format ``extension`` (see
    :func:`save_image_grid`), for :func:`pyrovae.outputs.write_file`."""
    import matplotlib.image

    grid = image_grid(images, image_shape, num_columns)
    enlarged = np.kron(grid, np.ones((scale, scale)))
    return lambda handle: matplotlib.image.imsave(
        handle, 1.0 - enlarged, cmap="gray", vmin=0.0, vmax=1.0, format=extension
    )


def output_kind(extension: str) -> str:
    """The :data:`pyrovae.outputs.KINDS` entry of a figure format."""
    return extension if extension in ("png", "pdf") else "binary"


# --------------------------------------------------------------------------- figures
#
# Every function below returns a ``matplotlib.figure.Figure`` drawn on the non-interactive
# Agg canvas, built directly (no pyplot), so importing this module or calling these
# functions never changes Matplotlib's global backend or state. Images show dark strokes on
# a white background (``gray_r``: pixel value 1 is black) with light-grey gaps between tiles.

TILE_INCHES = 0.42
"""Displayed size of one image tile, in inches."""

GAP_VALUE = 0.18
"""Grey level of the gaps between tiles (0 white, 1 black)."""

SAMPLE_KINDS = ("mean", "observation")
"""What :func:`prior_samples_figure` shows: decoder means E[x|z] or draws x ~ p(x|z)."""


def _new_figure(width: float, height: float):
    """A constrained-layout Figure of ``width`` x ``height`` inches on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _image_shape_of(model, image_shape=None) -> tuple[int, int]:
    """``image_shape`` if given, else the model's ``config.image_shape``."""
    if image_shape is None:
        config = getattr(model, "config", None)
        image_shape = getattr(config, "image_shape", None)
    if image_shape is None:
        raise ValueError("the model's data are not images (no image_shape); pass image_shape")
    return tuple(image_shape)


def _tiles(images, image_shape, num_columns: int) -> np.ndarray:
    """:func:`image_grid` with the gaps (and empty tiles) set to :data:`GAP_VALUE`."""
    array = _numpy(images)
    grid = image_grid(array, image_shape, num_columns)
    inside = image_grid(np.ones_like(array), image_shape, num_columns) > 0
    return np.where(inside, grid, GAP_VALUE)


def _show_tiles(ax, images, image_shape, num_columns: int) -> np.ndarray:
    """Draw images as tiles on ``ax`` without ticks; returns the tiled array."""
    grid = _tiles(images, image_shape, num_columns)
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return grid


def _tile_centres(count: int, size: int, padding: int = 1) -> np.ndarray:
    """Pixel coordinates of the centres of ``count`` tiles of ``size`` pixels."""
    return padding + np.arange(count) * (size + padding) + (size - 1) / 2


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def prior_samples_figure(vae, num: int = 64, kind: str = "mean", seed: int = 0):
    """Images generated from the prior: z ~ N(0, I), then E[x|z] or x ~ p(x|z).

    Parameters
    ----------
    vae : pyrovae.VAE
        A model whose config has an ``image_shape``.
    num : int
        Number of samples, tiled in a near-square grid.
    kind : str
        ``"mean"``: decoder means E[x|z] (pixel probabilities for Bernoulli);
        ``"observation"``: one draw x ~ p(x|z) per z.
    seed : int
        Seed of the draws (``pyro.set_rng_seed``).

    Returns
    -------
    matplotlib.figure.Figure
        One axes; the title names what is shown.
    """
    _check_count("num", num)
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid names: {', '.join(SAMPLE_KINDS)}")
    shape = _image_shape_of(vae)
    means, observations = vae.sample(num, seed=seed)
    columns = math.ceil(math.sqrt(num))
    rows = math.ceil(num / columns)
    figure = _new_figure(max(3.2, columns * TILE_INCHES + 0.4), rows * TILE_INCHES + 0.7)
    ax = figure.add_subplot()
    _show_tiles(ax, means if kind == "mean" else observations, shape, columns)
    what = "decoder means E[x|z]" if kind == "mean" else "draws x ~ p(x|z)"
    ax.set_title(f"{num} samples from the prior z ~ N(0, I):\n{what}", fontsize=10)
    return figure


def reconstruction_figure(vae, x, num: int = 16, image_shape=None):
    """Data (top row) above their reconstructions E[x | z = mu(x)] (bottom row).

    Parameters
    ----------
    vae : pyrovae.VAE or pyrovae.baselines.Autoencoder
        Anything with ``reconstruct(x)``.
    x : array-like of shape (N, D)
        Data; the first ``num`` rows are shown.
    num : int
        Images per row (at most 16 per row; more wrap onto further rows).
    image_shape : (int, int), optional
        Defaults to ``vae.config.image_shape``.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes, labelled ``data x`` and ``reconstruction``.
    """
    _check_count("num", num)
    shape = _image_shape_of(vae, image_shape)
    data = _numpy(x)[:num]
    reconstructions = vae.reconstruct(data)
    columns = min(len(data), 16)
    rows = math.ceil(len(data) / columns)
    figure = _new_figure(max(4.0, columns * TILE_INCHES + 1.8), 2 * rows * TILE_INCHES + 0.9)
    top, bottom = figure.subplots(2, 1)
    for ax, images, label in (
        (top, data, "data x"),
        (bottom, reconstructions, "reconstruction\nE[x | z = μ(x)]"),
    ):
        _show_tiles(ax, images, shape, columns)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    top.set_title("Reconstructions through the posterior mean", fontsize=10)
    return figure


def _records(history) -> list[dict]:
    records = getattr(history, "records", history)
    if records is None or len(records) == 0:
        raise ValueError("the history holds no epochs to plot")
    return list(records)


def _curve_columns(records: list[dict]) -> list[str]:
    """History columns plotted by :func:`training_curves_figure`, in a fixed order."""
    keys = {key for record in records for key in record}
    iwae = sorted(key for key in keys if "iwae" in key.lower())
    return [key for key in ("train_elbo", "valid_elbo") if key in keys] + iwae


CURVE_LABELS = {
    "train_elbo": "train ELBO (average over the epoch's minibatches)",
    "valid_elbo": "validation ELBO (after the epoch)",
}


def training_curves_figure(history):
    """Train and validation ELBO per epoch, in nats per data point (higher is better).

    Parameters
    ----------
    history : pyrovae.history.History or list of dict
        Per-epoch records with ``epoch``, ``train_elbo`` and ``valid_elbo``; every column
        whose name contains ``iwae`` (e.g. ``valid_iwae_5``) is drawn too. ``None`` entries
        (no validation data) are skipped.

    Returns
    -------
    matplotlib.figure.Figure
        One axes with a legend; x: epoch, y: nats per data point. When the first tenth of
        the epochs lies far below the rest, the y-axis is clipped and the title says so.
    """
    records = _records(history)
    series = _curve_series(records)
    if not series:
        raise ValueError("the history has no train_elbo, valid_elbo or iwae values to plot")
    figure = _new_figure(6.4, 4.0)
    ax = figure.add_subplot()
    marker = "o" if len(records) <= 30 else None
    for column, (epochs, values) in series.items():
        label = CURVE_LABELS.get(column, column)
        ax.plot(epochs, values, marker=marker, markersize=3, label=label)
    note = _clip_first_epochs(ax, series, len(records))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point (higher is better)")
    ax.set_title("Training curves" + note, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return figure


def _curve_series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Column name to (epochs, values), without the epochs where the value is None."""
    series = {}
    for column in _curve_columns(records):
        points = [
            (record.get("epoch", index + 1), record[column])
            for index, record in enumerate(records)
            if record.get(column) is not None
        ]
        if points:
            epochs, values = zip(*points, strict=True)
            series[column] = (np.asarray(epochs, dtype=float), np.asarray(values, dtype=float))
    return series


def _clip_first_epochs(ax, series: dict, num_epochs: int) -> str:
    """Keep the first epochs' much lower ELBOs from flattening the rest of the curves: limit
    the y-axis to the values after the first tenth of the epochs (with a margin) when some
    earlier value falls well below them. Returns a note for the title ("" if not clipped)."""
    if num_epochs < 10:
        return ""
    first_kept = min(epochs[0] for epochs, _ in series.values()) + num_epochs // 10
    later = np.concatenate([values[epochs >= first_kept] for epochs, values in series.values()])
    every = np.concatenate([values for _, values in series.values()])
    if later.size == 0:
        return ""
    low, high = float(later.min()), float(every.max())
    margin = 0.08 * (high - low) or 1.0
    hidden = every < low - margin
    if not hidden.any():
        return ""
    ax.set_ylim(low - margin, high + margin)
    return f"\n(y-axis clipped: {int(hidden.sum())} early value(s), lowest {every.min():.1f})"


def latent_scatter_figure(vae, x, labels, title: str | None = None):
    """Scatter of the posterior means mu(x), coloured by label.

    Parameters
    ----------
    vae : pyrovae.VAE or pyrovae.baselines.Autoencoder
        Its ``encode(x)`` gives the posterior means (or codes).
    x : array-like of shape (N, D)
        Data.
    labels : array-like of shape (N,)
        Class labels (a legend, for up to 20 classes) or any numbers (a colour bar).
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        The means themselves when L <= 2; their first two principal components
        (``sklearn.decomposition.PCA``) when L > 2, said so on the axis labels.
    """
    from pyrovae.latent_space import posterior_means

    codes = _numpy(posterior_means(vae, x))
    figure = _new_figure(6.2, 4.8)
    ax = figure.add_subplot()
    artist = _scatter_codes(ax, codes, labels, "posterior mean")
    _label_colours(figure, [ax], artist, labels)
    ax.set_title(title or f"Posterior means of q(z|x), {codes.shape[1]}-D latent", fontsize=10)
    return figure


def _scatter_codes(ax, codes: np.ndarray, labels, what: str):
    """Scatter 1-D, 2-D, or (PCA-projected) higher-dimensional codes; returns the artist."""
    labels = _numpy(labels)
    if labels.shape != codes.shape[:1]:
        raise ValueError(f"labels must have shape ({codes.shape[0]},); got {labels.shape}")
    latent_dim = codes.shape[1]
    if latent_dim > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(codes)
        points = pca.transform(codes)
        for axis, (setter, share) in enumerate(
            zip((ax.set_xlabel, ax.set_ylabel), pca.explained_variance_ratio_, strict=True)
        ):
            setter(f"PC {axis + 1} of the {latent_dim}-D {what}s ({share:.0%} of variance)")
    elif latent_dim == 2:
        points = codes
        ax.set_xlabel(f"$z_1$ ({what})")
        ax.set_ylabel(f"$z_2$ ({what})")
    else:
        points = np.column_stack([codes[:, 0], labels.astype(float)])
        ax.set_xlabel(f"$z_1$ ({what})")
        ax.set_ylabel("label")
    colours, cmap = _colour_values(labels)
    return ax.scatter(points[:, 0], points[:, 1], c=colours, cmap=cmap, s=7, alpha=0.75, lw=0)


def _is_categorical(labels: np.ndarray) -> bool:
    return labels.dtype.kind in "biuUSO" and len(np.unique(labels)) <= 20


def _colour_values(labels: np.ndarray):
    """Colour numbers and colour map: category indices on tab10/tab20, or raw values."""
    if _is_categorical(labels):
        classes = np.unique(labels)
        cmap = "tab10" if len(classes) <= 10 else "tab20"
        return np.searchsorted(classes, labels), cmap
    return labels.astype(float), "viridis"


def _label_colours(figure, axes: list, artist, labels) -> None:
    """A legend of classes (categorical labels) or a colour bar (numeric labels)."""
    labels = _numpy(labels)
    if not _is_categorical(labels):
        figure.colorbar(artist, ax=axes, label="label", shrink=0.9)
        return
    classes = np.unique(labels)
    handles = [
        axes[-1].scatter([], [], color=artist.cmap(artist.norm(index)), s=30, label=str(value))
        for index, value in enumerate(classes)
    ]
    figure.legend(handles=handles, title="label", loc="outside right center", fontsize=8)


def manifold_figure(vae, grid: int = 15):
    """Decoder means over a grid of prior quantiles of a 2-D latent space (Kingma & Welling,
    2014, fig. 4).

    The grid is ``z_i = Phi^{-1}(q)`` for ``q = linspace(0.05, 0.95, grid)`` in each latent
    coordinate (Phi the standard normal CDF), so equal steps carry equal prior mass; z_1
    grows to the right and z_2 upwards.

    Parameters
    ----------
    vae : pyrovae.VAE
        A model with ``config.latent_dim == 2`` and an ``image_shape``.
    grid : int
        Points per axis (at least 2).

    Returns
    -------
    matplotlib.figure.Figure
        One axes, ticks in latent units.

    Raises
    ------
    ValueError
        If the latent space is not 2-D.
    """
    from scipy.stats import norm

    latent_dim = vae.config.latent_dim
    if latent_dim != 2:
        raise ValueError(
            f"manifold_figure needs a 2-D latent space; this model has latent_dim={latent_dim} "
            "(use latent_scatter_figure or interpolation_figure instead)"
        )
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer of at least 2, got {grid!r}")
    shape = _image_shape_of(vae)
    values = norm.ppf(np.linspace(0.05, 0.95, grid))
    z1, z2 = np.meshgrid(values, values[::-1])  # top row: largest z_2
    codes = torch.as_tensor(np.column_stack([z1.ravel(), z2.ravel()]), dtype=torch.float32)
    figure = _new_figure(min(9.0, grid * TILE_INCHES + 1.3), min(9.0, grid * TILE_INCHES + 1.2))
    ax = figure.add_subplot()
    _show_tiles(ax, vae.decode(codes), shape, grid)
    _latent_ticks(ax, values, shape)
    ax.set_xlabel("$z_1$ (prior quantiles 0.05 to 0.95)")
    ax.set_ylabel("$z_2$ (prior quantiles 0.05 to 0.95)")
    ax.set_title("Decoder means E[x|z] over the 2-D latent space", fontsize=10)
    return figure


def _latent_ticks(ax, values: np.ndarray, shape: tuple[int, int]) -> None:
    """Label tile centres with their latent values (every other one past 8 tiles)."""
    every = 1 if len(values) <= 8 else 2
    columns = _tile_centres(len(values), shape[1])[::every]
    rows = _tile_centres(len(values), shape[0])[::every]
    ax.set_xticks(columns, [_signed(value) for value in values[::every]], fontsize=8)
    ax.set_yticks(rows, [_signed(value) for value in values[::-1][::every]], fontsize=8)


def _signed(value: float) -> str:
    """One decimal, with a typographic minus sign like Matplotlib's own tick labels."""
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text.replace("-", "\N{MINUS SIGN}")


def interpolation_figure(vae, x_a, x_b, steps: int = 10, method: str = "linear", image_shape=None):
    """Decoded paths between the posterior means of ``x_a`` and ``x_b``, one row per pair.

    Parameters
    ----------
    vae : pyrovae.VAE or pyrovae.baselines.Autoencoder
        Anything with ``encode`` and ``decode``.
    x_a, x_b : array-like of shape (D,) or (P, D)
        Start and end images (P pairs).
    steps : int
        Points on each path, endpoints included.
    method : str
        ``"linear"`` or ``"spherical"``; see :func:`pyrovae.latent_space.interpolate`.
    image_shape : (int, int), optional
        Defaults to ``vae.config.image_shape``.

    Returns
    -------
    matplotlib.figure.Figure
        Three axes: the inputs x_a, the decoded path E[x | z_t] against t, the inputs x_b.
    """
    from pyrovae.latent_space import interpolate, posterior_means

    shape = _image_shape_of(vae, image_shape)
    start, end = (np.atleast_2d(_numpy(x)) for x in (x_a, x_b))
    path = interpolate(posterior_means(vae, start), posterior_means(vae, end), steps, method)
    decoded = vae.decode(path.reshape(-1, path.shape[-1]))
    pairs = start.shape[0]
    figure = _new_figure(max(5.0, (steps + 2) * TILE_INCHES + 1.0), pairs * TILE_INCHES + 1.4)
    left, middle, right = figure.subplots(1, 3, width_ratios=[1, steps, 1])
    _show_tiles(left, start, shape, 1)
    _show_tiles(middle, decoded, shape, steps)
    _show_tiles(right, end, shape, 1)
    left.set_title("$x_a$", fontsize=10)
    right.set_title("$x_b$", fontsize=10)
    name = "Linear" if method == "linear" else "Spherical (slerp)"
    middle.set_title(f"{name} interpolation of posterior means, decoded", fontsize=10)
    ts = np.linspace(0, 1, steps)
    middle.set_xticks(_tile_centres(steps, shape[1]), [f"{t:.2f}" for t in ts], fontsize=7)
    middle.set_xlabel("t  (0: $x_a$, 1: $x_b$)")
    return figure


def arithmetic_figure(
    vae,
    x,
    labels,
    from_label,
    to_label,
    strengths=(0.0, 0.5, 1.0, 1.5),
    num: int = 6,
    image_shape=None,
):
    """Attribute-vector arithmetic: move codes of the ``from_label`` group along
    v = mean z[to_label] - mean z[from_label] and decode z + s v for each strength s.

    Parameters
    ----------
    vae : pyrovae.VAE or pyrovae.baselines.Autoencoder
        Anything with ``encode`` and ``decode``.
    x : array-like of shape (N, D)
        Data; v is estimated from all of it.
    labels : array-like of shape (N,)
        Group of each data point.
    from_label, to_label
        The two groups; the first ``num`` points labelled ``from_label`` are shown.
    strengths : sequence of float
        Multiples s of v, one column each.
    num : int
        Rows (source images).
    image_shape : (int, int), optional
        Defaults to ``vae.config.image_shape``.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the source images and the decoded grid (rows: sources, columns: s).
    """
    from pyrovae.latent_space import apply_attribute, attribute_vector, posterior_means

    _check_count("num", num)
    shape = _image_shape_of(vae, image_shape)
    vector = attribute_vector(vae, x, labels, from_label, to_label)
    sources = _numpy(x)[np.asarray(_numpy(labels) == from_label, dtype=bool)][:num]
    moved = apply_attribute(posterior_means(vae, sources), vector, list(strengths))
    decoded = vae.decode(moved.reshape(-1, moved.shape[-1]))
    columns = len(strengths)
    figure = _new_figure(
        max(4.5, (columns + 1) * TILE_INCHES + 1.6), len(sources) * TILE_INCHES + 1.5
    )
    left, right = figure.subplots(1, 2, width_ratios=[1, columns])
    _show_tiles(left, sources, shape, 1)
    _show_tiles(right, decoded, shape, columns)
    left.set_title("input", fontsize=9)
    right.set_xticks(_tile_centres(columns, shape[1]), [f"{s:g}" for s in strengths], fontsize=8)
    right.set_xlabel("strength s in decode(μ(x) + s·v)")
    right.set_title(
        f"v = mean μ(x) of '{to_label}' − mean μ(x) of '{from_label}'  (|v| = "
        f"{float(vector.norm()):.2f})",
        fontsize=9,
    )
    return figure


def image_rows_figure(rows: dict, image_shape: tuple[int, int], title: str | None = None):
    """Rows of images, one labelled row per entry (e.g. data and several models'
    reconstructions of it).

    Parameters
    ----------
    rows : dict of str to array-like of shape (n, H*W)
        Row label to images (pixel values in [0, 1]); rows may differ in length.
    image_shape : (int, int)
        Height and width of one image.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per row, its y-label the row's name.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    columns = max(len(_numpy(images)) for images in rows.values())
    figure = _new_figure(
        max(4.5, columns * TILE_INCHES + 1.8), len(rows) * (TILE_INCHES + 0.08) + 0.6
    )
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (label, images) in zip(axes, rows.items(), strict=True):
        _show_tiles(ax, images, image_shape, columns)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def latent_comparison_figure(codes: dict, labels, title: str | None = None):
    """Side-by-side scatters of several models' codes of the same data, coloured by label.

    Parameters
    ----------
    codes : dict of str to array-like of shape (N, L)
        Model name to codes (posterior means for a VAE); codes with L > 2 are projected on
        their first two principal components.
    labels : array-like of shape (N,)
        Label of each data point.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per model (at most three per row) and one legend or colour bar.
    """
    if not codes:
        raise ValueError("codes is empty: nothing to plot")
    columns = min(3, len(codes))
    rows = math.ceil(len(codes) / columns)
    figure = _new_figure(3.7 * columns + 1.0, 3.3 * rows + 0.5)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    artist = None
    for ax, (name, values) in zip(axes, codes.items(), strict=False):
        artist = _scatter_codes(ax, _numpy(values), labels, "code")
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    for ax in axes[len(codes) :]:
        ax.set_visible(False)
    _label_colours(figure, list(axes[: len(codes)]), artist, labels)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


FIGURE_FORMATS = ("png", "pdf")
"""Formats :func:`save_figure` writes by default."""


def save_figure(figure, path: str | Path, formats=FIGURE_FORMATS, dpi: int = 150) -> list[Path]:
    """Write a figure as PNG and PDF files with the same stem.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        The figure.
    path : str or Path
        Output path; a ``.png`` or ``.pdf`` suffix is replaced by each format's.
        Parent directories are created.
    formats : sequence of str
        Subset of ``("png", "pdf")``.
    dpi : int
        Resolution of the PNG, in dots per inch.

    Returns
    -------
    list of Path
        The files written, in the order of ``formats``.
    """
    from pyrovae.outputs import write_file

    unknown = sorted(set(formats) - set(FIGURE_FORMATS))
    if unknown or not formats:
        raise ValueError(f"formats must be among {', '.join(FIGURE_FORMATS)}; got {formats!r}")
    path = Path(path)
    if path.suffix.lower() in {".png", ".pdf"}:
        path = path.with_suffix("")
    written = []
    for extension in formats:
        target = path.with_name(f"{path.name}.{extension}")
        write_file(target, figure_writer(figure, extension, dpi), extension)
        written.append(target)
    return written


def figure_writer(figure, extension: str, dpi: int = 150):
    """``write(handle)`` saving ``figure`` as ``extension`` with fixed metadata, for
    :func:`pyrovae.outputs.write_file` (used by :func:`save_figure` and ``pyrovae plot``)."""
    return lambda handle: figure.savefig(
        handle, dpi=dpi, format=extension, metadata=_metadata(extension)
    )


def _metadata(extension: str) -> dict:
    """Fixed metadata, so that re-running a script rewrites identical PDFs."""
    if extension == "pdf":
        return {"Creator": "pyrovae", "Producer": "pyrovae", "CreationDate": None}
    return {"Software": "pyrovae"}


# --------------------------------------------------------------------------- by name

MODEL_FIGURE_KINDS = ("samples", "reconstructions", "curves", "latent", "manifold", "interpolation")
"""Figure kinds of :func:`model_figure` (and of ``pyrovae plot``)."""

DATA_FIGURE_KINDS = ("reconstructions", "latent", "interpolation")
"""Kinds of :func:`model_figure` that need data (``latent`` needs labels too)."""


def model_figure(
    kind: str,
    vae,
    data=None,
    labels=None,
    num: int | None = None,
    seed: int = 0,
    method: str = "linear",
):
    """One of the figures of a fitted VAE, by name (the ``pyrovae plot`` command).

    Parameters
    ----------
    kind : str
        One of :data:`MODEL_FIGURE_KINDS`.
    vae : pyrovae.VAE
        The model.
    data : array-like of shape (N, D), optional
        Data for the kinds in :data:`DATA_FIGURE_KINDS`, in the likelihood's support.
    labels : array-like of shape (N,), optional
        Labels of ``data``, for ``latent``.
    num : int, optional
        Samples (``samples``, default 64), images (``reconstructions``, 16), points
        (``latent``, at most 2000), grid points per axis (``manifold``, 15) or pairs
        (``interpolation``, 4; drawn at random with ``seed``); ignored by ``curves``.
    seed : int
        Seed of the prior draws or of the choice of interpolation pairs.
    method : str
        Interpolation method, ``"linear"`` or ``"spherical"``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if kind not in MODEL_FIGURE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid names: {', '.join(MODEL_FIGURE_KINDS)}")
    if kind in DATA_FIGURE_KINDS and data is None:
        raise ValueError(f"the {kind} figure needs data")
    if kind == "samples":
        return prior_samples_figure(vae, num or 64, seed=seed)
    if kind == "reconstructions":
        return reconstruction_figure(vae, data, num or 16)
    if kind == "curves":
        if vae.history_ is None:
            raise ValueError("the model holds no training history to plot")
        return training_curves_figure(vae.history_)
    if kind == "latent":
        if labels is None:
            raise ValueError("the latent figure needs labels; this split has none")
        count = num or 2000
        return latent_scatter_figure(vae, _numpy(data)[:count], _numpy(labels)[:count])
    if kind == "manifold":
        return manifold_figure(vae, num or 15)
    return _random_pairs_figure(vae, _numpy(data), num or 4, seed, method)


def _random_pairs_figure(vae, data: np.ndarray, pairs: int, seed: int, method: str):
    """:func:`interpolation_figure` between ``pairs`` random pairs of distinct data points."""
    if 2 * pairs > len(data):
        raise ValueError(f"{pairs} pairs need {2 * pairs} data points; there are {len(data)}")
    order = np.random.default_rng(seed).permutation(len(data))[: 2 * pairs]
    return interpolation_figure(vae, data[order[:pairs]], data[order[pairs:]], method=method)
