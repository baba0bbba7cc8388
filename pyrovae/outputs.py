"""The one guarded way pyrovae writes a file (results CSVs, histories, figures, specs).

:func:`write_file` refuses, before anything is written, an output that resolves to one of
the command's inputs (the same real path, or the same device and inode: a hard link or a
symbolic link to it) or to an existing file of another kind (a CSV over a model file or a
PNG); it writes to a temporary file in the same directory, flushes it to disk (``fsync``)
and renames it over the target (``os.replace``), so that after any failure (a full disk,
``kill -9``, a power cut) the target is either the old file or the complete new one. It
returns a :class:`Written` record saying what it replaced.

:func:`check_output` runs the same checks without writing, so that a command can refuse
its output before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

KINDS = ("csv", "jsonl", "json", "text", "png", "pdf", "model", "binary")
"""What :func:`write_file` may write; each existing target must be of the same kind."""

_TEXT_KINDS = {"csv", "jsonl", "json", "text"}
_SIGNATURES = (  # leading bytes of each kind of file pyrovae writes or reads
    (b"pyrovae-model", "model"),
    (b"PK\x03\x04", "archive (a model, .npz or zip file)"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"%PDF", "pdf"),
    (b"\x1f\x8b", "gzip archive"),
)


class OutputError(ValueError):
    """An output that would destroy an input or a file of another kind; nothing written."""


@dataclass(frozen=True)
class Written:
    """A file written by :func:`write_file`: its path and the size in bytes of the file it
    replaced (``None`` when there was none)."""

    path: Path
    replaced_bytes: int | None

    def describe(self) -> str:
        """``"PATH"`` or ``"PATH (replaced the previous file, N bytes)"``."""
        if self.replaced_bytes is None:
            return str(self.path)
        return f"{self.path} (replaced the previous file, {self.replaced_bytes} bytes)"


def file_kind(path: str | Path) -> str:
    """What an existing regular file holds, from its first bytes: ``"model"``, ``"png"``,
    ``"pdf"``, an archive, ``"text"`` (UTF-8 without NUL bytes; also an empty file) or
    ``"binary"``."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if b"\x00" in head:
        return "binary"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a character cut at the 4096-byte mark
            return "binary"
    return "text"


def _matches(existing: str, kind: str) -> bool:
    return existing == kind or (existing == "text" and kind in _TEXT_KINDS)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_output(
    path: str | Path, kind: str, inputs: Iterable[str | Path] = (), option: str = "output"
) -> Path:
    """The real path ``path`` will be written at, after refusing what :func:`write_file`
    refuses.

    Raises
    ------
    OutputError
        ``path`` is one of ``inputs`` (real path, or device and inode), is a directory or
        other non-regular file, or an existing file of another kind than ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    path = Path(path)
    real = Path(os.path.realpath(path))
    identity = _identity(real)
    for given in inputs:
        if os.path.realpath(given) == str(real) or (
            identity is not None and _identity(Path(given)) == identity
        ):
            raise OutputError(
                f"{option} {path} is the input {given}; writing it would destroy that input. "
                "Choose another file name"
            )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real
    except OSError as error:
        raise OutputError(f"{option} {path} cannot be checked ({error.strerror})") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{option} {path} is a directory; name a file in it")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{option} {path} exists and is not a regular file; choose another name")
    try:
        existing = file_kind(real)
    except OSError as error:
        raise OutputError(f"{option} {path} cannot be read ({error.strerror})") from None
    if not _matches(existing, kind):
        raise OutputError(
            f"{option} {path} already holds a {existing} file, not a {kind} file; pyrovae will "
            "not replace it with another kind of file. Choose another name, or remove it first"
        )
    return real


def write_file(
    path: str | Path,
    write: Callable,
    kind: str,
    inputs: Iterable[str | Path] = (),
    option: str = "output",
) -> Written:
    """Write a file atomically after the checks of :func:`check_output`.

    Parameters
    ----------
    path : str or Path
        Target; parent directories are created. A symbolic link is followed: the file it
        points to is replaced.
    write : callable
        ``write(handle)`` writes the content to an open file (text, UTF-8, ``newline=""``
        for the text kinds; binary otherwise).
    kind : str
        One of :data:`KINDS`; an existing target must hold the same kind.
    inputs : iterable of paths
        Files the content was computed from: none may be the target.
    option : str
        How messages name the target (e.g. ``"--out"``).

    Returns
    -------
    Written
        The path and the size of the file it replaced.

    Raises
    ------
    OutputError
        As :func:`check_output`; nothing written.
    OSError
        The write failed (disk full, no permission, ...); the message names the file and
        says the previous file, if any, is unchanged; no temporary file is left.
    """
    from pyrovae.checkpoint import _current_umask, _sync_directory, remove_stale_temporaries

    real = check_output(path, kind, inputs, option)
    try:
        previous = os.stat(real)
    except FileNotFoundError:
        previous = None
    temporary = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(real)
        descriptor, temporary = tempfile.mkstemp(
            dir=real.parent, prefix=f".{real.name}.writer-{os.getpid()}.", suffix=".tmp"
        )
        text = kind in _TEXT_KINDS
        with (
            open(descriptor, "w", encoding="utf-8", newline="") if text else open(descriptor, "wb")
        ) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        mode = stat.S_IMODE(previous.st_mode) if previous else 0o666 & ~_current_umask()
        os.chmod(temporary, mode)  # mkstemp creates files as 0600
        os.replace(temporary, real)
    except OSError as error:
        _unlink(temporary)
        kept = "the previous file is unchanged" if previous else "no file was written"
        message = f"cannot write {path}: {error.strerror or error}; {kept}"
        raise OSError(error.errno, message) if error.errno else OSError(message) from error
    except BaseException:
        _unlink(temporary)
        raise
    _sync_directory(real.parent)
    return Written(Path(path), None if previous is None else previous.st_size)


def write_text(path, text: str, kind: str = "text", inputs=(), option: str = "output") -> Written:
    """:func:`write_file` of a string."""
    return write_file(path, lambda handle: handle.write(text), kind, inputs, option)


def _unlink(path) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
