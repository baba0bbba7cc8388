"""Model files: one ``torch.save`` archive of plain data (config dicts, tensors, numbers),
written atomically and read with ``torch.load(weights_only=True)``, which refuses any
pickled object that could execute code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "pyrovae-model"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file that is missing, corrupt, unsafe or incompatible with this library."""


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: temporary file, fsync, then rename.

    An interruption leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp creates files as 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by :func:`write_checkpoint` without executing code from it.

    Raises
    ------
    CheckpointError
        Missing, truncated or corrupt file; a file holding objects other than plain data;
        a file of another format or of a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than plain data and tensors, "
            f"which could execute code ({_last_line(error)})"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"model file {path} is truncated or corrupt: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyrovae model file")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in format version {version}, newer than this "
            f"library's {FORMAT_VERSION}; upgrade pyrovae to read it"
        )
    return payload


def _check_archive(path: Path) -> None:
    """Model files are torch zip archives; refuse anything else before unpickling a byte."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head[:1] == b"\x80":  # a bare pickle stream: never unpickled, whatever it holds
        raise CheckpointError(
            f"refusing to load {path}: it is a bare pickle, not a model archive, and "
            "unpickling it could execute code"
        )
    raise CheckpointError(f"model file {path} is truncated or corrupt (not a complete archive)")


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else error.__class__.__name__
