"""Tests of pyrovae.data: loaders on the real files, file formats, downloads, binarization."""

import dataclasses
import gzip
import io
import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae import data
from pyrovae.data import (
    DATA_DIR_ENV,
    DATASETS,
    DataNotFoundError,
    DatasetSplits,
    binarize,
    load_binarized_mnist,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist_test,
    read_amat,
    read_idx,
    resolve_data_dir,
    threshold,
)

MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """Encode ``array`` in IDX format (big-endian) with type ``code``."""
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.asarray(array, dtype=dtypes[code]).tobytes()


def write_amat(path: Path, array: np.ndarray, fmt: str = "%d") -> None:
    """Write a 2-D 0/1 array in the ``.amat`` text format."""
    np.savetxt(path, array, fmt=fmt, delimiter=" ")


def random_bits(rows: int, seed: int, columns: int = 784) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, columns)) < 0.3).astype(np.uint8)


def write_amat_splits(directory: Path, rows=(5, 3, 2)) -> dict[str, np.ndarray]:
    """Write three small synthetic binarized-MNIST ``.amat`` files; return their arrays."""
    arrays = {}
    for seed, (split, count) in enumerate(zip(("train", "valid", "test"), rows, strict=False)):
        arrays[split] = random_bits(count, seed)
        write_amat(directory / f"binarized_mnist_{split}.amat", arrays[split])
    return arrays


def no_network(*args, **kwargs):
    raise AssertionError("tests must not touch the network")


@pytest.fixture(autouse=True)
def forbid_network(monkeypatch):
    """Any accidental download attempt fails the test instead of reaching out."""
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)


@pytest.fixture(scope="module")
def binarized(data_dir) -> DatasetSplits:
    return load_binarized_mnist(data_dir, download=False)


@pytest.fixture(scope="module")
def mnist_test(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist_test(data_dir, download=False)


# --------------------------------------------------------------------------- real data


def test_binarized_mnist_shapes_and_values(binarized):
    assert binarized.name == "binarized-mnist"
    assert binarized.image_shape == (28, 28)
    assert binarized.binary is True
    assert binarized.num_features == 784
    for split, rows in (("train", 50000), ("valid", 10000), ("test", 10000)):
        values, labels = binarized.split(split)
        assert values.shape == (rows, 784)
        assert values.dtype == torch.float32
        assert bool(((values == 0) | (values == 1)).all())
        assert labels is (binarized.test_labels if split == "test" else None)
    # about 13% of binarized MNIST pixels are on
    assert 0.10 < binarized.train.mean().item() < 0.16


def test_binarized_mnist_test_labels_sorted_by_class(binarized):
    labels = binarized.test_labels
    assert labels.dtype == torch.int64 and labels.shape == (10000,)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert bool((labels[1:] >= labels[:-1]).all()), "README: test split ordered by class"
    assert torch.bincount(labels).tolist() == MNIST_TEST_CLASS_COUNTS


def test_mnist_test_images_and_labels(mnist_test):
    images, labels = mnist_test
    assert images.shape == (10000, 784) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == MNIST_TEST_CLASS_COUNTS
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_threshold_of_test_image_is_close_to_it(mnist_test):
    images, _ = mnist_test
    image = images[0]
    binary = threshold(image)
    assert binary.shape == image.shape == (784,)
    assert binary.dtype == image.dtype
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    # MNIST strokes are nearly saturated: thresholding moves few pixels much
    assert (binary - image).abs().mean().item() < 0.06
    assert binary.reshape(28, 28).sum().item() == pytest.approx(image.sum().item(), rel=0.2)


def test_binarized_test_split_is_a_bernoulli_draw_of_grey_test_split(binarized, mnist_test):
    """Per class, the binarized pixel mean matches the grey-level mean within 5 s.e."""
    images, labels = mnist_test
    for digit in range(10):
        grey = images[labels == digit].double()
        bits = binarized.test[binarized.test_labels == digit].double()
        standard_error = (grey * (1 - grey)).sum().sqrt() / grey.numel()
        assert abs(bits.mean() - grey.mean()) < 5 * standard_error, digit


def test_load_mnist_test_accepts_uncompressed_files(data_dir, mnist_test, tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data_dir / f"{name}.gz", "rb") as source:
            (tmp_path / name).write_bytes(source.read())
    images, labels = load_mnist_test(tmp_path, download=False)
    assert torch.equal(images, mnist_test[0])
    assert torch.equal(labels, mnist_test[1])


def test_load_mnist_from_idx_files(data_dir, tmp_path):
    index = np.arange(60000)
    train_images = np.broadcast_to((index % 256).astype(np.uint8)[:, None, None], (60000, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(train_images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(index % 10))
    for name in data.MNIST_TEST_FILES:
        (tmp_path / name).symlink_to(data_dir / name)

    mnist = load_mnist(tmp_path, download=False)

    assert mnist.name == "mnist" and mnist.image_shape == (28, 28) and mnist.binary is False
    assert [len(mnist.split(s)[0]) for s in ("train", "valid", "test")] == [50000, 10000, 10000]
    assert torch.equal(mnist.train_labels, torch.from_numpy(index[:50000] % 10))
    assert torch.equal(mnist.valid_labels, torch.from_numpy(index[50000:] % 10))
    assert mnist.valid[0, 0].item() == pytest.approx((50000 % 256) / 255)
    assert mnist.train[255].eq(1.0).all() and mnist.train[0].eq(0.0).all()
    assert mnist.test_labels.dtype == torch.int64
    assert torch.equal(mnist.test, load_mnist_test(tmp_path, download=False)[0])


# --------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip_uint8(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = idx_bytes(array)
    path = tmp_path / ("tiny.idx.gz" if compress else "tiny.idx")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    result = read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize(
    ("code", "values"),
    [
        (0x09, [-128, -1, 0, 127]),
        (0x0B, [-30000, 258, 0, 1]),
        (0x0C, [-(2**31), 2**31 - 1, 65536, 1]),
        (0x0D, [0.5, -1.25, 3.0e10, 0.0]),
        (0x0E, [math.pi, -1e-300, 2.0**60, 0.0]),
    ],
)
def test_read_idx_big_endian_types(tmp_path, code, values):
    dtypes = {0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}
    array = np.asarray(values, dtype=dtypes[code]).reshape(2, 2)
    path = tmp_path / "typed.idx"
    path.write_bytes(idx_bytes(array, code))
    result = read_idx(path)
    assert result.dtype == np.dtype(dtypes[code])
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_reads_real_label_file(data_dir, mnist_test):
    labels = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, mnist_test[1].numpy())


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00"])
def test_read_idx_bad_magic(tmp_path, magic):
    path = tmp_path / "bad.idx"
    path.write_bytes(magic + idx_bytes(np.zeros(3, np.uint8))[4:])
    with pytest.raises(ValueError, match="bad.idx"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 5])
def test_read_idx_truncated(tmp_path, cut):
    path = tmp_path / "short.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 5), np.uint8))[:-cut]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "header.idx"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="header announces 4"):
        read_idx(path)


# --------------------------------------------------------------------------- .amat format


def test_read_amat(tmp_path):
    array = random_bits(4, seed=1)
    path = tmp_path / "tiny.amat"
    write_amat(path, array)
    result = read_amat(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


def test_read_amat_accepts_float_notation_and_single_line(tmp_path):
    path = tmp_path / "float.amat"
    path.write_text("0.0 1.0 1.0\n")
    np.testing.assert_array_equal(read_amat(path), np.array([[0, 1, 1]], np.uint8))


@pytest.mark.parametrize("text", ["0 1 2\n1 0 0\n", "0 1 -1\n", "0 1 0\n1 0\n", "0 1 x\n"])
def test_read_amat_rejects_bad_content(tmp_path, text):
    path = tmp_path / "bad.amat"
    path.write_text(text)
    with pytest.raises(ValueError):
        read_amat(path)


# --------------------------------------------------------------------------- local files


def test_load_binarized_mnist_from_amat_files(tmp_path):
    arrays = write_amat_splits(tmp_path)
    splits = load_binarized_mnist(tmp_path, download=False)
    assert splits.binary is True and splits.image_shape == (28, 28)
    for split, expected in arrays.items():
        values, labels = splits.split(split)
        assert values.dtype == torch.float32
        assert labels is None
        np.testing.assert_array_equal(values.numpy(), expected.astype(np.float32))


def test_load_binarized_mnist_prefers_npz(tmp_path):
    write_amat_splits(tmp_path)
    arrays = {split: random_bits(2, seed=10 + i) for i, split in enumerate(data.SPLIT_NAMES)}
    np.savez(tmp_path / "binarized_mnist.npz", test_labels=np.array([3, 4], np.uint8), **arrays)
    splits = load_binarized_mnist(tmp_path, download=False)
    assert torch.equal(splits.valid, torch.from_numpy(arrays["valid"]).float())
    assert splits.test_labels.tolist() == [3, 4] and splits.test_labels.dtype == torch.int64


def test_load_binarized_mnist_rejects_wrong_width(tmp_path):
    for split in data.SPLIT_NAMES:
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", random_bits(2, 0, columns=10))
    with pytest.raises(ValueError, match="784"):
        load_binarized_mnist(tmp_path, download=False)


@pytest.mark.parametrize("shape", [(0, 784), (0, 28, 28)], ids=["flat", "images"])
def test_empty_split_is_refused_naming_the_split(tmp_path, shape):
    """An empty split used to fail inside numpy ("cannot reshape array of size 0 ...")."""
    arrays = {split: random_bits(2, seed=i) for i, split in enumerate(data.SPLIT_NAMES)}
    arrays["valid"] = np.zeros(shape, np.uint8)
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    with pytest.raises(ValueError, match=r"binarized_mnist\.npz: the valid split holds no images"):
        load_binarized_mnist(tmp_path, download=False)


def test_npz_without_a_split_names_the_missing_array(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", train=random_bits(2, 0), test=random_bits(2, 1))
    with pytest.raises(ValueError, match=r"no array named 'valid' \(it holds 'train', 'test'"):
        load_binarized_mnist(tmp_path, download=False)


def test_dataset_splits_refuse_an_empty_split():
    digits = load_digits()
    with pytest.raises(ValueError, match=r"digits test split is empty: it has no data points"):
        dataclasses.replace(digits, test=digits.test[:0], test_labels=digits.test_labels[:0])


# --------------------------------------------------------------------------- missing files


def test_missing_binarized_mnist_raises(tmp_path):
    with pytest.raises(DataNotFoundError) as caught:
        load_binarized_mnist(tmp_path, download=False)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "binarized_mnist.npz" in message and "binarized_mnist_test.amat" in message
    assert str(tmp_path) in message
    assert DATA_DIR_ENV in message and "--data-dir" in message
    assert "http://www.cs.toronto.edu/~larocheh/" in message


def test_partial_amat_files_raise(tmp_path):
    write_amat(tmp_path / "binarized_mnist_train.amat", random_bits(2, 0))
    with pytest.raises(DataNotFoundError, match="binarized_mnist.npz"):
        load_binarized_mnist(tmp_path, download=False)


def test_missing_mnist_training_files_raise(data_dir):
    with pytest.raises(DataNotFoundError) as caught:
        load_mnist(data_dir, download=False)
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert "t10k" not in message.split(" in ")[0], "present files must not be reported missing"
    assert str(data_dir) in message and "https://ossci-datasets.s3.amazonaws.com/mnist/" in message


def test_missing_mnist_test_files_raise(tmp_path):
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist_test(tmp_path, download=False)


# --------------------------------------------------------------------------- downloads (faked)


def test_download_failure_is_chained_and_leaves_nothing(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        assert timeout <= 60
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data.urllib.request, "urlopen", unreachable)
    target = tmp_path / "cache"
    with pytest.raises(DataNotFoundError) as caught:
        load_mnist_test(target, download=True)
    assert isinstance(caught.value.__cause__, urllib.error.URLError)
    assert "t10k-images-idx3-ubyte.gz" in str(caught.value) and str(target) in str(caught.value)
    assert list(target.iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        def read(self, *args):
            if self.tell() > 0:
                raise TimeoutError("read timed out")
            return super().read(10)

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Broken(b"1" * 100))
    with pytest.raises(DataNotFoundError) as caught:
        load_binarized_mnist(tmp_path, download=True)
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert list(tmp_path.iterdir()) == []


def test_download_checksum_mismatch_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"junk"))
    with pytest.raises(DataNotFoundError, match="sha256"):
        load_mnist_test(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_download_writes_amat_files(tmp_path, monkeypatch):
    source = tmp_path / "server"
    source.mkdir()
    arrays = write_amat_splits(source, rows=(3, 2, 2))
    requested = []

    def serve(url, timeout):
        requested.append(url)
        return io.BytesIO((source / url.rsplit("/", 1)[-1]).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", serve)
    target = tmp_path / "new" / "dir"
    splits = load_binarized_mnist(target, download=True)
    assert requested == [data.BINARIZED_MNIST_URL.format(split=s) for s in data.SPLIT_NAMES]
    assert sorted(p.name for p in target.iterdir()) == sorted(
        f"binarized_mnist_{s}.amat" for s in data.SPLIT_NAMES
    )
    assert torch.equal(splits.train, torch.from_numpy(arrays["train"]).float())


# --------------------------------------------------------------------------- data directory


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert resolve_data_dir() == tmp_path / "from-env"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir("~/data") == tmp_path / "home" / "data"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "pyrovae"
    monkeypatch.setenv(DATA_DIR_ENV, "")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "pyrovae"


def test_loaders_use_environment_variable(data_dir, monkeypatch, mnist_test):
    monkeypatch.setenv(DATA_DIR_ENV, os.fspath(data_dir))
    images, labels = load_mnist_test(download=False)
    assert torch.equal(images, mnist_test[0])
    assert torch.equal(labels, mnist_test[1])


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits as sklearn_load_digits

    return sklearn_load_digits()


def test_digits_splits(sklearn_digits):
    digits = load_digits(seed=0)
    assert digits.name == "digits" and digits.image_shape == (8, 8) and digits.binary is False
    assert digits.num_features == 64
    sizes = [len(digits.split(s)[0]) for s in data.SPLIT_NAMES]
    assert sizes == [1297, 250, 250]
    # locate every row in scikit-learn's data (its 1797 rows are all distinct)
    row_index = {row.tobytes(): i for i, row in enumerate(sklearn_digits.data / 16.0)}
    assert len(row_index) == 1797
    seen = []
    for split in data.SPLIT_NAMES:
        values, labels = digits.split(split)
        assert values.dtype == torch.float32 and labels.dtype == torch.int64
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
        indices = [row_index[row.astype(np.float64).tobytes()] for row in values.numpy()]
        np.testing.assert_array_equal(labels.numpy(), sklearn_digits.target[indices])
        seen.extend(indices)
    assert sorted(seen) == list(range(1797)), "splits must be disjoint and cover every image"
    assert float(digits.train.max()) == 1.0


def test_digits_follow_the_seeded_permutation(sklearn_digits):
    digits = load_digits(seed=3)
    order = np.random.default_rng(3).permutation(1797)
    expected = torch.from_numpy((sklearn_digits.data[order[1297:1547]] / 16).astype(np.float32))
    assert torch.equal(digits.valid, expected)


def test_digits_deterministic_per_seed():
    first, again, other = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    for split in data.SPLIT_NAMES:
        assert torch.equal(first.split(split)[0], again.split(split)[0])
        assert torch.equal(first.split(split)[1], again.split(split)[1])
    assert not torch.equal(first.train, other.train)


# --------------------------------------------------------------------------- binarization


def test_binarize_reproducible_and_binary():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    first = binarize(x, generator=torch.Generator().manual_seed(7))
    second = binarize(x, generator=torch.Generator().manual_seed(7))
    other = binarize(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert first.dtype == x.dtype and first.device == x.device and first.shape == x.shape


def test_binarize_keeps_dtype_and_respects_extremes():
    x = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    out = binarize(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64
    assert torch.equal(out, x)


def test_binarize_mean_matches_probabilities():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bits = binarize(x, generator=torch.Generator().manual_seed(3))
    standard_error = (x * (1 - x)).sum().sqrt() / x.numel()
    assert abs(bits.mean() - x.mean()) < 5 * standard_error


@pytest.mark.parametrize("bad", [[0.5, 1.5], [-0.1, 0.5], [float("nan"), 0.5]])
def test_binarize_rejects_values_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize(torch.tensor(bad))


def test_binarize_rejects_integer_input():
    with pytest.raises(ValueError, match="floating"):
        binarize(torch.tensor([0, 1]))


def test_threshold():
    x = torch.tensor([0.0, 0.49, 0.5, 0.51, 1.0], dtype=torch.float64)
    assert threshold(x).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert threshold(x).dtype == torch.float64
    assert threshold(x, level=0.2).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert threshold(torch.tensor([0, 200, 255]), level=128).dtype == torch.get_default_dtype()


# --------------------------------------------------------------------------- registry / container


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError) as caught:
        load_dataset("nope")
    assert (
        str(caught.value) == "unknown dataset 'nope'; valid names: binarized-mnist, digits, mnist"
    )


def test_dataset_registry(tmp_path):
    assert set(DATASETS) == {"digits", "binarized-mnist", "mnist"}
    assert DATASETS["binarized-mnist"] is load_binarized_mnist
    assert DATASETS["mnist"] is load_mnist
    digits = load_dataset("digits", data_dir=tmp_path / "absent", download=False)
    assert torch.equal(digits.test, load_digits().test)
    with pytest.raises(DataNotFoundError):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_dataset_splits_split_and_validation():
    digits = load_digits()
    with pytest.raises(ValueError, match="valid names: train, valid, test"):
        digits.split("validation")
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits.name = "other"
    with pytest.raises(ValueError, match="image_shape"):
        dataclasses.replace(digits, image_shape=(4, 4))
    with pytest.raises(ValueError, match="float32"):
        dataclasses.replace(digits, valid=digits.valid.double())
    with pytest.raises(ValueError, match="labels"):
        dataclasses.replace(digits, test_labels=digits.test_labels[:-1])
