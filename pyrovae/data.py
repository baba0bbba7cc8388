"""Datasets for the VAE experiments: loaders, file readers and binarization.

Three datasets are available through :func:`load_dataset`:

``"binarized-mnist"``
    The statically binarized MNIST of Larochelle & Murray (2011), the standard
    split (50000 / 10000 / 10000) for reporting VAE test log-likelihoods.
``"mnist"``
    Grey-level MNIST from LeCun's IDX files, scaled to [0, 1]; the 60000
    training images are split into 50000 train and 10000 validation images.
``"digits"``
    scikit-learn's 8x8 handwritten digits, which ship with scikit-learn and
    need no file at all.

Files are looked up in a data directory: the ``data_dir`` argument, else the
``PYROVAE_DATA_DIR`` environment variable, else ``~/.cache/pyrovae``.  Missing
files are downloaded from their canonical location when ``download`` is true;
otherwise (or when the download fails) a :class:`DataNotFoundError` explains
how to provide them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BINARIZED_MNIST_URL",
    "CHECKSUMS",
    "DATASETS",
    "DATA_DIR_ENV",
    "MNIST_URL",
    "SPLIT_NAMES",
    "DataNotFoundError",
    "DatasetSplits",
    "binarize",
    "load_binarized_mnist",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist_test",
    "read_amat",
    "read_idx",
    "resolve_data_dir",
    "threshold",
]

DATA_DIR_ENV = "PYROVAE_DATA_DIR"
"""Environment variable naming the data directory."""

DEFAULT_DATA_DIR = Path("~") / ".cache" / "pyrovae"
"""Data directory used when neither an argument nor the variable gives one."""

BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)
"""Canonical location of the binarized MNIST ``.amat`` files (``{split}`` is the split)."""

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
"""Mirror of the original MNIST IDX files (the one torchvision uses)."""

DOWNLOAD_TIMEOUT = 30.0
"""Seconds to wait for a server before a download counts as failed."""

SPLIT_NAMES = ("train", "valid", "test")

BINARIZED_MNIST_NPZ = "binarized_mnist.npz"
MNIST_TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

CHECKSUMS: dict[str, tuple[str, str]] = {
    BINARIZED_MNIST_NPZ: (
        "sha256",
        "7b16a0f8a86c2e1283e8cd0bfbf60a7a787bb5f687be73a7b37e60d797c84eed",
    ),
    "t10k-images-idx3-ubyte.gz": (
        "sha256",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "sha256",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
    # torchvision's published MD5 sums of the training files.
    "train-images-idx3-ubyte.gz": ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
}
"""Known ``(algorithm, hex digest)`` of data files, checked after a download only."""

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_PIXELS = 28 * 28


class DataNotFoundError(FileNotFoundError):
    """A data file is absent from the data directory and could not be downloaded."""


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset divided into train / validation / test splits.

    Attributes
    ----------
    name : str
        Dataset name, e.g. ``"binarized-mnist"``.
    train, valid, test : torch.Tensor
        Float32 tensors of shape ``(N, D)`` with values in [0, 1].
    image_shape : tuple of int
        ``(height, width)`` of one image; ``height * width == D``.
    train_labels, valid_labels, test_labels : torch.Tensor or None
        Int64 class labels of shape ``(N,)``, or None where unavailable.
    binary : bool
        True when every value is exactly 0 or 1.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int]
    train_labels: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    binary: bool = False

    def __post_init__(self) -> None:
        for split in SPLIT_NAMES:
            data, labels = self.split(split)
            _check_split(self.name, split, data, labels, self.num_features)
        height, width = self.image_shape
        if height * width != self.num_features:
            raise ValueError(
                f"{self.name}: image_shape {self.image_shape} does not match "
                f"{self.num_features} features"
            )

    @property
    def num_features(self) -> int:
        """Number of features ``D`` per example (pixels per image)."""
        return int(self.train.shape[-1])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the ``(data, labels)`` pair of one split.

        Parameters
        ----------
        name : str
            One of ``"train"``, ``"valid"``, ``"test"``.

        Returns
        -------
        tuple
            The ``(N, D)`` data tensor and the labels (or None).

        Raises
        ------
        ValueError
            If ``name`` is not a split name.
        """
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; valid names: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name), getattr(self, f"{name}_labels")


def _check_split(
    dataset: str,
    split: str,
    data: torch.Tensor,
    labels: torch.Tensor | None,
    num_features: int,
) -> None:
    """Raise ValueError unless one split has the documented shapes and dtypes."""
    where = f"{dataset} {split} split"
    if data.dim() >= 1 and data.shape[0] == 0:
        raise ValueError(f"{where} is empty: it has no data points")
    if data.dtype != torch.float32 or data.dim() != 2 or data.shape[1] != num_features:
        raise ValueError(
            f"{where}: expected float32 of shape (N, {num_features}), "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != data.shape[:1]):
        raise ValueError(
            f"{where}: expected int64 labels of shape ({data.shape[0]},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )


# --------------------------------------------------------------------------- locations


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory where data files are looked up.

    Parameters
    ----------
    data_dir : path-like, optional
        Explicit directory; takes precedence over everything else.

    Returns
    -------
    pathlib.Path
        ``data_dir`` if given, else ``$PYROVAE_DATA_DIR`` if set and non-empty,
        else ``~/.cache/pyrovae`` (user directory expanded).
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _not_found(names: list[str], directory: Path, url: str, reason: str = "") -> DataNotFoundError:
    """Build the error for files ``names`` missing from ``directory``."""
    message = (
        f"data file(s) not found: {', '.join(names)} in {directory}{reason}. "
        f"Put the file(s) in a directory and point to it with the {DATA_DIR_ENV} "
        f"environment variable, the data_dir argument or the CLI's --data-dir option; "
        f"canonical download: {url}"
    )
    return DataNotFoundError(message)


def _find(directory: Path, name: str) -> Path | None:
    """Return ``directory / name``, or its un-gzipped variant, if either exists."""
    for candidate in (name, name.removesuffix(".gz")):
        path = directory / candidate
        if path.is_file():
            return path
    return None


# --------------------------------------------------------------------------- downloads


def _verify_checksum(path: Path, name: str) -> None:
    """Raise ValueError if ``path`` does not match the known checksum of ``name``."""
    if name not in CHECKSUMS:
        return
    algorithm, expected = CHECKSUMS[name]
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"downloaded {name} has {algorithm} {digest.hexdigest()}, expected {expected}"
        )


def _download(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` atomically and verify its checksum.

    The bytes go to a temporary file in the same directory, which replaces
    ``destination`` only once complete and verified, so an interrupted
    download leaves nothing half-written.

    Raises
    ------
    DataNotFoundError
        On any network or file-system failure, or a checksum mismatch,
        chained from the original exception.
    """
    directory = destination.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{destination.name}.")
    except OSError as error:
        raise _not_found([destination.name], directory, url, f" (cannot write: {error})") from error
    try:
        with (
            os.fdopen(handle, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response,
        ):
            shutil.copyfileobj(response, out)
        _verify_checksum(Path(temporary), destination.name)
        os.replace(temporary, destination)
    except (OSError, ValueError, http.client.HTTPException) as error:
        reason = f" (download failed: {error})"
        raise _not_found([destination.name], directory, url, reason) from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# --------------------------------------------------------------------------- file formats


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an array stored in LeCun's IDX format.

    Parameters
    ----------
    path : path-like
        The file; it is decompressed with gzip when its name ends with ``.gz``.

    Returns
    -------
    numpy.ndarray
        The array with the shape given in the header, in native byte order.

    Raises
    ------
    ValueError
        If the magic number is invalid or the data length does not match the
        header (a truncated or padded file).
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    dtype, shape = _parse_idx_header(raw, path)
    offset = 4 + 4 * len(shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: IDX file truncated or corrupt: header announces {expected} "
            f"data bytes, found {len(raw) - offset}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _parse_idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """Return the dtype and shape announced by an IDX header."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX file truncated inside its header")
    shape = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return _IDX_DTYPES[raw[2]], tuple(int(size) for size in shape)


def read_amat(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a binarized-MNIST ``.amat`` text file.

    Parameters
    ----------
    path : path-like
        Text file with one image per line as whitespace-separated 0/1 values
        (784 per line for MNIST).

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``(num_images, values_per_line)``.

    Raises
    ------
    ValueError
        If the lines differ in length or a value is not 0 or 1.
    """
    try:
        array = np.loadtxt(path, dtype=np.uint8, ndmin=2)
    except ValueError:  # e.g. values written as "0.0"; slower, but still exact
        array = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{path}: .amat values must be 0 or 1")
    return array.astype(np.uint8)


# --------------------------------------------------------------------------- loaders


def _as_float(images: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """Flatten images to ``(N, D)`` row-major float32 (each data point contiguous, so that
    gathering a minibatch is fast) and divide by ``scale``."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float32, order="C")
    if scale != 1.0:
        flat /= np.float32(scale)
    return torch.from_numpy(flat)


def _as_labels(labels: np.ndarray | None) -> torch.Tensor | None:
    """Convert labels to an int64 tensor (None stays None)."""
    return None if labels is None else torch.from_numpy(np.asarray(labels).astype(np.int64))


def _check_images(
    array: np.ndarray, rows: int | None, features: int, source: Path, split: str | None = None
) -> None:
    """Raise ValueError unless ``array`` holds ``rows`` images of ``features`` pixels (at
    least one image when ``rows`` is None)."""
    if array.ndim == 0 or array.shape[0] == 0:
        part = f"the {split} split" if split else "the file"
        raise ValueError(f"{source}: {part} holds no images (shape {array.shape})")
    flat_features = int(np.prod(array.shape[1:], dtype=np.int64)) if array.ndim > 1 else -1
    if flat_features != features or (rows is not None and array.shape[0] != rows):
        expected = f"({rows if rows is not None else 'N'}, {features})"
        raise ValueError(f"{source}: expected images of shape {expected}, got {array.shape}")


def _check_numbers(array: np.ndarray, source: Path, name: str, integers: bool = False) -> None:
    """Raise ValueError unless ``array`` holds numbers (integers, with ``integers``): an
    array of strings such as ``'1'`` would otherwise be converted silently."""
    kinds = "iu" if integers else "biuf"
    if array.dtype.kind not in kinds:
        wanted = "integers" if integers else "numbers"
        held = "strings" if array.dtype.kind in "SU" else "values"
        raise ValueError(
            f"{source}: array {name!r} holds {held} of dtype {array.dtype}, not {wanted}"
        )


def _check_binary(array: np.ndarray, source: Path, name: str) -> None:
    """Raise ValueError unless the numbers in ``array`` are all 0 or 1 (one pass over
    unsigned integers, the usual storage)."""
    if array.dtype.kind == "b" or (array.dtype.kind == "u" and array.max(initial=0) <= 1):
        return
    other = (array != 0) & (array != 1)
    if other.any():
        first = tuple(int(i) for i in np.argwhere(other)[0])
        raise ValueError(
            f"{source}: array {name!r} of binarized images holds values other than 0 and 1 "
            f"({int(other.sum())} entries, first at {first}: {array[first]!r})"
        )


def load_binarized_mnist(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> DatasetSplits:
    """Load statically binarized MNIST (Larochelle & Murray, 2011).

    ``binarized_mnist.npz`` (keys ``train``, ``valid``, ``test`` and optionally
    ``test_labels``) is preferred; otherwise the three files
    ``binarized_mnist_{train,valid,test}.amat`` are read, and the test labels
    are then unavailable.

    Parameters
    ----------
    data_dir : path-like, optional
        Directory holding the files (see :func:`resolve_data_dir`).
    download : bool
        Download missing ``.amat`` files from :data:`BINARIZED_MNIST_URL`.

    Returns
    -------
    DatasetSplits
        50000 / 10000 / 10000 images of 784 values in {0, 1}; the train and
        valid splits carry no labels.

    Raises
    ------
    DataNotFoundError
        If the files are absent and cannot be downloaded.
    """
    directory = resolve_data_dir(data_dir)
    npz = directory / BINARIZED_MNIST_NPZ
    if npz.is_file():
        return _binarized_from_npz(npz)
    paths = {split: directory / f"binarized_mnist_{split}.amat" for split in SPLIT_NAMES}
    missing = [split for split, path in paths.items() if not path.is_file()]
    if missing and not download:
        amat = ", ".join(path.name for path in paths.values())
        url = BINARIZED_MNIST_URL.format(split="{train,valid,test}")
        raise _not_found([f"{BINARIZED_MNIST_NPZ} (or all of {amat})"], directory, url)
    for split in missing:
        _download(BINARIZED_MNIST_URL.format(split=split), paths[split])
    arrays = {split: read_amat(path) for split, path in paths.items()}
    return _binarized_splits(arrays, None, paths["train"].parent)


def _binarized_from_npz(path: Path) -> DatasetSplits:
    """Build the binarized-MNIST splits from the ``.npz`` archive."""
    with np.load(path) as archive:
        missing = [split for split in SPLIT_NAMES if split not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: no array named {', '.join(map(repr, missing))} (it holds "
                f"{', '.join(map(repr, archive.files)) or 'nothing'}; expected train, valid, test)"
            )
        arrays = {split: archive[split] for split in SPLIT_NAMES}
        labels = archive["test_labels"] if "test_labels" in archive.files else None
    return _binarized_splits(arrays, labels, path)


def _binarized_splits(
    arrays: dict[str, np.ndarray], test_labels: np.ndarray | None, source: Path
) -> DatasetSplits:
    """Wrap binarized-MNIST arrays into :class:`DatasetSplits`."""
    for split, array in arrays.items():
        _check_numbers(array, source, split)
        _check_images(array, None, _MNIST_PIXELS, source, split)
        _check_binary(array, source, split)
    if test_labels is not None:
        _check_numbers(test_labels, source, "test_labels", integers=True)
    return DatasetSplits(
        name="binarized-mnist",
        train=_as_float(arrays["train"]),
        valid=_as_float(arrays["valid"]),
        test=_as_float(arrays["test"]),
        image_shape=(28, 28),
        test_labels=_as_labels(test_labels),
        binary=True,
    )


def _mnist_files(
    names: tuple[str, ...], data_dir: str | os.PathLike[str] | None, download: bool
) -> list[Path]:
    """Locate (downloading if allowed) the MNIST IDX files ``names``."""
    directory = resolve_data_dir(data_dir)
    found = {name: _find(directory, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing and not download:
        listed = missing[0] if len(missing) == 1 else "{" + ",".join(missing) + "}"
        raise _not_found(missing, directory, MNIST_URL + listed)
    for name in missing:
        found[name] = directory / name
        _download(MNIST_URL + name, found[name])
    return [found[name] for name in names]


def _read_mnist_pair(images: Path, labels: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one MNIST image / label file pair of ``rows`` entries."""
    image_array, label_array = read_idx(images), read_idx(labels)
    _check_images(image_array, rows, _MNIST_PIXELS, images)
    if label_array.shape != (rows,):
        raise ValueError(f"{labels}: expected labels of shape ({rows},), got {label_array.shape}")
    return image_array, label_array


def load_mnist_test(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load only the 10000 grey-level MNIST test images and their labels.

    Parameters
    ----------
    data_dir : path-like, optional
        Directory holding ``t10k-images-idx3-ubyte.gz`` and
        ``t10k-labels-idx1-ubyte.gz`` (or their un-gzipped versions).
    download : bool
        Download missing files from :data:`MNIST_URL`.

    Returns
    -------
    tuple of torch.Tensor
        Images ``(10000, 784)`` float32 in [0, 1] and labels ``(10000,)`` int64.

    Raises
    ------
    DataNotFoundError
        If the files are absent and cannot be downloaded.
    """
    images, labels = _read_mnist_pair(*_mnist_files(MNIST_TEST_FILES, data_dir, download), 10000)
    return _as_float(images, 255.0), _as_labels(labels)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> DatasetSplits:
    """Load grey-level MNIST from the four IDX files.

    The first 50000 of the 60000 training images form the train split, the
    last 10000 the validation split; the 10000 test images the test split.

    Parameters
    ----------
    data_dir : path-like, optional
        Directory holding the IDX files, gzipped or not.
    download : bool
        Download missing files from :data:`MNIST_URL`.

    Returns
    -------
    DatasetSplits
        Float32 values in [0, 1] (grey level / 255) with labels for every split.

    Raises
    ------
    DataNotFoundError
        If files are absent and cannot be downloaded.
    """
    paths = _mnist_files(MNIST_TRAIN_FILES + MNIST_TEST_FILES, data_dir, download)
    train_images, train_labels = _read_mnist_pair(paths[0], paths[1], 60000)
    test_images, test_labels = _read_mnist_pair(paths[2], paths[3], 10000)
    return DatasetSplits(
        name="mnist",
        train=_as_float(train_images[:50000], 255.0),
        valid=_as_float(train_images[50000:], 255.0),
        test=_as_float(test_images, 255.0),
        image_shape=(28, 28),
        train_labels=_as_labels(train_labels[:50000]),
        valid_labels=_as_labels(train_labels[50000:]),
        test_labels=_as_labels(test_labels),
        binary=False,
    )


def load_digits(seed: int = 0) -> DatasetSplits:
    """Load scikit-learn's 8x8 handwritten digits, scaled to [0, 1].

    Parameters
    ----------
    seed : int
        Seed of the ``numpy.random.default_rng`` permutation that assigns the
        1797 images to 1297 train / 250 valid / 250 test.

    Returns
    -------
    DatasetSplits
        Float32 values (pixel / 16) with labels, ``image_shape == (8, 8)``.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = bunch.data.astype(np.float32) / np.float32(16.0)
    order = np.random.default_rng(seed).permutation(len(images))
    parts = np.split(order, [1297, 1297 + 250])
    splits = {
        split: (images[part], bunch.target[part])
        for split, part in zip(SPLIT_NAMES, parts, strict=False)
    }
    return DatasetSplits(
        name="digits",
        train=torch.from_numpy(splits["train"][0]),
        valid=torch.from_numpy(splits["valid"][0]),
        test=torch.from_numpy(splits["test"][0]),
        image_shape=(8, 8),
        train_labels=_as_labels(splits["train"][1]),
        valid_labels=_as_labels(splits["valid"][1]),
        test_labels=_as_labels(splits["test"][1]),
        binary=False,
    )


# --------------------------------------------------------------------------- binarization


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamically binarize: draw ``Bernoulli(x)`` element-wise.

    Parameters
    ----------
    x : torch.Tensor
        Floating-point probabilities in [0, 1].
    generator : torch.Generator, optional
        Source of randomness, for reproducible draws.

    Returns
    -------
    torch.Tensor
        0/1 values with the dtype and device of ``x``.

    Raises
    ------
    ValueError
        If ``x`` is not floating point or has values outside [0, 1] (or NaN).
    """
    if not x.is_floating_point():
        raise ValueError(f"binarize needs floating-point probabilities, got {x.dtype}")
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError("binarize needs probabilities in [0, 1]")
    return torch.bernoulli(x, generator=generator)


def threshold(x: torch.Tensor, level: float = 0.5) -> torch.Tensor:
    """Statically binarize: 1.0 where ``x >= level``, else 0.0.

    Parameters
    ----------
    x : torch.Tensor
        Values to binarize.
    level : float
        Threshold.

    Returns
    -------
    torch.Tensor
        0/1 values with the dtype of ``x`` (the default float dtype if ``x``
        is not floating point).
    """
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return (x >= level).to(dtype)


# --------------------------------------------------------------------------- registry


def _load_digits_dataset(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> DatasetSplits:
    """:func:`load_digits` with the common loader signature (arguments unused)."""
    del data_dir, download
    return load_digits()


DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "binarized-mnist": load_binarized_mnist,
    "digits": _load_digits_dataset,
    "mnist": load_mnist,
}
"""Dataset names mapped to loaders called as ``loader(data_dir=..., download=...)``."""


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> DatasetSplits:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`: ``"binarized-mnist"``, ``"digits"`` or ``"mnist"``.
    data_dir : path-like, optional
        Data directory (ignored by ``"digits"``).
    download : bool
        Whether missing files may be downloaded (ignored by ``"digits"``).

    Returns
    -------
    DatasetSplits

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    DataNotFoundError
        If files are absent and cannot be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_dir=data_dir, download=download)
