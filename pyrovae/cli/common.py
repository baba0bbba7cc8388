"""What every command shares: the one-line error, the printer, checks of the files and
devices named on the command line, data loading and preparation, and guarded writing."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch

from pyrovae.cli.parser import IMAGE_FORMATS
from pyrovae.data import (
    BINARIZED_MNIST_NPZ,
    BINARIZED_MNIST_URL,
    DATASETS,
    MNIST_TEST_FILES,
    MNIST_TRAIN_FILES,
    MNIST_URL,
    SPLIT_NAMES,
    DataNotFoundError,
    binarize,
    load_dataset,
    resolve_data_dir,
    threshold,
)
from pyrovae.distributed import active_context
from pyrovae.likelihoods import LIKELIHOODS, BernoulliLikelihood
from pyrovae.outputs import OutputError, Written, check_output, write_file

MODEL_FILE = "model.pt"
QUIET, NORMAL, VERBOSE = 0, 1, 2


class CLIError(Exception):
    """An expected failure, reported as one line naming the file or option and the fix."""


# --------------------------------------------------------------------------- output


class Output:
    """What a command prints, by verbosity; only the main process prints."""

    def __init__(self, args: argparse.Namespace):
        self.level = QUIET if args.quiet else VERBOSE if args.verbose else NORMAL
        self.main = is_main_process()

    def summary(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def info(self, text: str) -> None:
        if self.main and self.level >= NORMAL:
            print(text, flush=True)

    def detail(self, text: str) -> None:
        if self.main and self.level >= VERBOSE:
            print(text, flush=True)

    @property
    def progress_bars(self) -> bool:
        return self.main and self.level >= NORMAL and sys.stderr.isatty()

    @contextlib.contextmanager
    def warnings(self):
        """Warnings as one line each on stderr (none under --quiet)."""
        with warnings.catch_warnings():
            if self.level == QUIET or not self.main:
                warnings.simplefilter("ignore")
            else:
                warnings.showwarning = _show_warning
            yield


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {one_line(str(message))}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- checks


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def readable_file(path: Path, option: str, fix: str) -> Path:
    """``path`` if it is a readable regular file (never opens a FIFO, which would block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CLIError(f"{option} {path} does not exist; {fix}") from None
    except OSError as error:
        raise CLIError(f"{option} {path} cannot be read ({error.strerror}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise CLIError(f"{option} {path} is {_file_kind(mode)}, not a regular file; {fix}")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{option} {path} is not readable (permission denied); fix its permissions")
    return path


def model_file(path: Path) -> Path:
    """The model file named by ``--model``: a file, or a run directory holding model.pt."""
    if path.is_dir() and (path / MODEL_FILE).exists():
        path = path / MODEL_FILE
    fix = f"pass the {MODEL_FILE} that 'pyrovae train' wrote"
    if not path.exists() and not path.is_symlink():
        raise CLIError(f"model file {path} does not exist; {fix}")
    return readable_file(path, "--model", fix)


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_out(path: Path, kind: str, inputs=(), option: str = "--out") -> None:
    """Refuse, before any work, an output that cannot be written or that
    :func:`pyrovae.outputs.check_output` refuses (one of ``inputs``, a file of another kind)."""
    if path.is_dir():
        raise CLIError(f"{option} {path} is a directory; name a file in it")
    ancestor = existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise CLIError(
            f"{option} {path}: {ancestor} is a file, not a directory; choose another path"
        )
    target = path if path.exists() else ancestor
    if not os.access(target, os.W_OK) or not os.access(ancestor, os.W_OK):
        where = target if not os.access(target, os.W_OK) else ancestor
        why = "a read-only file system" if _read_only_fs(where) else "permission denied"
        raise CLIError(f"{option} {path} is not writable ({why}); choose a writable location")
    try:
        check_output(path, kind, inputs, option)
    except OutputError as error:
        raise CLIError(str(error)) from None


def write_out(
    path: Path, write, kind: str, out: Output | None, what: str, inputs=(), option="--out"
) -> Written:
    """Write through :func:`pyrovae.outputs.write_file` (atomic, never over an input) and say
    what was written and what it replaced (unless ``out`` is None)."""
    try:
        written = write_file(path, write, kind, inputs, option)
    except OutputError as error:
        raise CLIError(str(error)) from None
    except OSError as error:
        raise CLIError(write_failure(error, path)) from None
    if out is not None:
        out.summary(f"wrote {what} to {written.describe()}")
    return written


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_device(name: str) -> None:
    from pyrovae.training import resolve_device

    try:
        device = torch.device(name) if name != "auto" else None
    except (RuntimeError, ValueError):
        raise CLIError(
            f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N"
        ) from None
    try:
        device = resolve_device(name)
    except ValueError as error:  # e.g. CUDA asked for on a machine without it
        raise CLIError(f"--device {name}: {error}; use --device auto or cpu") from None
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise CLIError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}; choose one of them or 'cuda'"
            )
    elif device.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            raise CLIError(
                f"--device {name} is not usable on this machine ({one_line(str(error))[:120]}); "
                "use auto, cpu or cuda"
            ) from None


def _data_files(name: str, directory: Path) -> list[Path]:
    """Files the loader of dataset ``name`` may read from ``directory``."""
    if name == "binarized-mnist":
        names = [BINARIZED_MNIST_NPZ, *(f"binarized_mnist_{s}.amat" for s in SPLIT_NAMES)]
    elif name == "mnist":
        names = [
            variant
            for file in MNIST_TRAIN_FILES + MNIST_TEST_FILES
            for variant in (file, file.removesuffix(".gz"))
        ]
    else:
        return []
    return [directory / n for n in names]


def data_inputs(name: str, data_dir) -> list[Path]:
    """The data files of dataset ``name`` that exist: inputs no output may replace."""
    try:
        directory = resolve_data_dir(data_dir)
    except (OSError, ValueError):
        return []
    return [path for path in _data_files(name, directory) if path.is_file()]


def _download_hint(name: str) -> str:
    if name == "binarized-mnist":
        return BINARIZED_MNIST_URL.format(split="{train,valid,test}")
    return MNIST_URL


def load_data(name: str, data_dir) -> object:
    """:func:`pyrovae.data.load_dataset`, with every unreadable, truncated or malformed data
    file reported as a :class:`CLIError` naming the file and the fix."""
    directory = resolve_data_dir(data_dir)
    if name != "digits" and directory.exists() and not directory.is_dir():
        raise CLIError(f"--data-dir {directory} is a file, not a directory")
    if name != "digits" and data_dir is not None and not directory.exists():
        raise CLIError(
            f"--data-dir {data_dir} does not exist (nothing is created); check the name, or "
            "create the directory first to download the data into it"
        )
    candidates = [path for path in _data_files(name, directory) if path.exists()]
    fix = f"replace it with a fresh copy (canonical download: {_download_hint(name)})"
    for path in candidates:
        readable_file(path, "data file", fix)
    try:
        return load_dataset(name, data_dir)
    except DataNotFoundError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as error:
        filename = getattr(error, "filename", None)
        culprit = Path(filename) if filename else (candidates[0] if candidates else directory)
        reason = one_line(str(error)) or type(error).__name__
        raise CLIError(
            f"data file {culprit} is unreadable, truncated or malformed "
            f"({type(error).__name__}: {reason}); {fix}"
        ) from None


def dataset_of(vae, requested: str | None) -> str:
    name = requested or vae.metadata_.get("dataset")
    if name is None:
        raise CLIError("the model file does not record its dataset; pass --dataset")
    if name not in DATASETS:
        raise CLIError(
            f"the model file records dataset {name!r}, which this version does not know; "
            f"pass --dataset ({', '.join(sorted(DATASETS))})"
        )
    return name


def is_main_process() -> bool:
    parallel = active_context()
    return parallel is None or parallel.is_main


def needs_binary(likelihood: str) -> bool:
    return issubclass(LIKELIHOODS[likelihood], BernoulliLikelihood)


def one_hot(labels: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, width).to(torch.get_default_dtype())


def class_count(dataset) -> int:
    labels = [dataset.split(s)[1] for s in SPLIT_NAMES]
    return int(max(int(t.max()) for t in labels if t is not None)) + 1


def labels_of(dataset, split: str, width: int) -> torch.Tensor:
    labels = dataset.split(split)[1]
    if labels is None:
        raise CLIError(
            f"the {split} split of {dataset.name} has no labels, which a conditional model "
            "needs; use a dataset with labels (digits, mnist) or another --split"
        )
    return one_hot(labels, width)


def write_failure(error: OSError, path: Path, resumable: bool = False) -> str:
    reason = one_line(error.strerror or str(error)) or type(error).__name__
    if not reason.startswith("cannot "):  # the library's messages name the file already
        reason = f"cannot write {error.filename or path}: {reason}"
    if error.errno == errno.ENOSPC or error.errno == getattr(errno, "EDQUOT", -1):
        fix = "free disk space or choose another --out"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    else:
        fix = "check the location and try again"
    if resumable:
        fix += f"; the last complete checkpoint, if any, is intact ({path}: continue with --resume)"
    return f"{reason}; {fix}"


# --------------------------------------------------------------------------- evaluate


def prepare_data(
    vae, dataset, split: str, binarize_mode: str = "auto", seed: int = 0
) -> tuple[torch.Tensor, str]:
    """The split a saved model is scored on, and a sentence saying how it was prepared.

    ``binarize_mode``: ``"threshold"`` (x >= 0.5, :func:`pyrovae.data.threshold`),
    ``"sample"`` (one Bernoulli draw, ``binarize(x, torch.Generator().manual_seed(seed))``),
    ``"none"``, or ``"auto"``: ``"sample"`` for a model trained with dynamic binarization,
    ``"threshold"`` after static binarization or for grey levels under a Bernoulli
    likelihood, else ``"none"``. The same tensor given to ``vae.evaluate`` in Python gives
    the same numbers."""
    data, _ = dataset.split(split)
    trained = vae.train_config_.binarize if vae.train_config_ is not None else None
    mode = binarize_mode
    if mode == "auto":
        if trained == "dynamic":
            mode = "sample"
        elif trained == "static" or (not dataset.binary and needs_binary(vae.config.likelihood)):
            mode = "threshold"
        else:
            mode = "none"
    values = "0/1 values" if dataset.binary else "grey levels"
    why = (
        f", auto: the model was trained with --binarize {trained}"
        if binarize_mode == "auto" and trained not in (None, "none")
        else ""
    )
    if mode == "threshold":
        return threshold(data), (
            f"{values} thresholded at 0.5 (--binarize threshold{why}; in Python: "
            "pyrovae.data.threshold(x))"
        )
    if mode == "sample":
        generator = torch.Generator().manual_seed(seed)
        return binarize(data, generator=generator), (
            f"{values} binarized by one Bernoulli draw seeded with {seed} (--binarize sample"
            f"{why}; in Python: pyrovae.data.binarize(x, torch.Generator().manual_seed({seed}))"
            "; --binarize threshold thresholds at 0.5 instead)"
        )
    return data, f"{values} as they are (--binarize none)"


def evaluation_data(
    vae, dataset_name: str, data_dir, split: str, seed: int, binarize_mode: str = "auto"
) -> torch.Tensor:
    """The split a saved model is evaluated on, prepared as :func:`prepare_data` says
    (by default binarized the way the model was trained: dynamic binarization is evaluated
    on one Bernoulli draw seeded with ``seed``)."""
    return prepare_data(vae, load_data(dataset_name, data_dir), split, binarize_mode, seed)[0]


def elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


def image_kind(path: Path) -> str:
    """``"png"`` or ``"pdf"``: the kind of image file ``path`` names."""
    return path.suffix.lower().lstrip(".")


def image_paths(args: argparse.Namespace, default_formats, model_path: Path) -> list[Path]:
    """The image files ``--out`` and ``--formats`` name, checked before any work."""
    paths = output_paths(args.out, args.formats, default_formats)
    for path in paths:
        check_out(path, image_kind(path), [model_path])
    return paths


def write_images(paths: list[Path], writer_for, out: Output, model_path: Path) -> None:
    """Write each path with ``writer_for(format)`` through the guarded writer; one line."""
    written = [
        write_out(path, writer_for(image_kind(path)), image_kind(path), None, "", [model_path])
        for path in paths
    ]
    out.summary("wrote " + ", ".join(w.describe() for w in written))


def apply_threads(args: argparse.Namespace, vae, out: Output) -> None:
    """Set torch's threads for the command: --threads when given, else OMP_NUM_THREADS when
    set, else :func:`pyrovae.training.default_threads` of the model's size; say which."""
    from pyrovae.training import default_threads, set_threads

    if args.threads is not None:
        set_threads(args.threads)
        out.info(f"threads: {args.threads} (--threads)")
        return
    if os.environ.get("OMP_NUM_THREADS"):
        out.detail(f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS; --threads N to change)")
        return
    count, reason = default_threads(sum(p.numel() for p in vae.parameters()))
    set_threads(count)
    out.info(f"threads: {count} ({reason}; --threads N to change)")


def output_paths(path: Path, formats, default_formats) -> list[Path]:
    """Files to write for ``--out path``: a name ending in .png or .pdf is that one file
    (with ``--formats``, also the other formats asked, same stem); any other name gets
    each format's suffix added (``--formats``, else ``default_formats``)."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix in IMAGE_FORMATS:
        formats = list(formats or [suffix])
        if suffix not in formats:
            raise CLIError(
                f"--out {path} asks for {suffix.upper()} but --formats says "
                f"{' '.join(formats)}; drop the suffix or the option"
            )
        stem = path.with_suffix("")
        return [path, *(stem.with_name(f"{stem.name}.{f}") for f in formats if f != suffix)]
    return [path.with_name(f"{path.name}.{f}") for f in (formats or default_formats)]


def check_image_model(vae, what: str) -> None:
    if vae.config.image_shape is None:
        raise CLIError(f"{what} draws images; this model's data are not images (no image_shape)")
