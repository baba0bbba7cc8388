"""Model files: a one-line header with a SHA-256 checksum, then one ``torch.save`` archive of
plain data (config dicts, tensors, numbers), written atomically and read with
``torch.load(weights_only=True)``, which refuses any pickled object that could execute code.

File layout (format version 2)::

    pyrovae-model <version> <payload bytes> sha256=<64 hex digits>\\n
    <payload: the bytes of torch.save(payload_dict)>

The digest is the SHA-256 of the header line without its ``sha256=...`` field (that is, of
``b"pyrovae-model <version> <payload bytes>\\n"``) followed by the payload bytes, so that a
damaged version number or length is caught as surely as a damaged tensor. The digest is
checked before a single byte is unpickled, and the header (and the announced length against
the file's size and the machine's memory) before a byte of the payload is read, so that a
large file of another kind is refused at once. This envelope is the same for every later format
version, so that a file of a newer version is recognised as such (with its checksum
verified) rather than as a damaged one.

Format version 1 files (written before the checksum existed) are the bare ``torch.save``
archive, starting with the zip signature ``PK\\x03\\x04``. They still load: their zip
members' CRC-32 sums are verified instead, which catches damage to the data but not to every
byte of the archive's own directory. Their directory, at the end of the file, is read
before any member.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
import stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "pyrovae-model"
FORMAT_VERSION = 2
"""Version written by this library; files up to this version are read."""

MAGIC = b"pyrovae-model "
"""First bytes of every model file of format version 2 or later."""

_HEADER_LIMIT = 256
_HEADER = re.compile(rb"pyrovae-model ([1-9][0-9]{0,5}) (0|[1-9][0-9]{0,15}) sha256=([0-9a-f]{64})")
_ZIP_SIGNATURE = b"PK\x03\x04"

STALE_TEMPORARY_SECONDS = 60.0
"""A temporary file of an interrupted write is removed by the next write of the same model
file once its writer process is gone or, failing that (a writer on another machine, a
reused process id), once it is older than this many seconds."""

_PAYLOAD_TYPES: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "model_state": (dict,),
    "train_config": (dict,),
    "optimizer_state": (dict,),
    "history": (list,),
    "training_state": (dict,),
    "metadata": (dict,),
    "library_version": (str,),
}


class CheckpointError(ValueError):
    """A model file that is missing, corrupt, unsafe or incompatible with this library."""


# --------------------------------------------------------------------------- writing


def encode_checkpoint(payload_bytes: bytes, version: int = FORMAT_VERSION) -> bytes:
    """The file content for ``payload_bytes`` (a ``torch.save`` archive): header + payload."""
    prefix = f"pyrovae-model {version} {len(payload_bytes)}".encode()
    digest = hashlib.sha256(prefix + b"\n")
    digest.update(payload_bytes)
    return prefix + b" sha256=" + digest.hexdigest().encode() + b"\n" + payload_bytes


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: temporary file, fsync, then rename.

    An interruption leaves either the previous file or the new one, never a partial file;
    temporary files left by interrupted writes of the same file are removed first (see
    :data:`STALE_TEMPORARY_SECONDS`).

    Raises
    ------
    OSError
        The file could not be written (disk full, no permission, ...); the message names
        the file and the reason, and the previous file is unchanged.
    """
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    check_plain_data(payload)  # what read_checkpoint could not load is never written
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    content = encode_checkpoint(buffer.getvalue())
    del buffer
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.writer-{os.getpid()}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp creates files as 0600
        os.replace(temporary, path)
    except OSError as error:
        _remove_quietly(temporary)
        reason = error.strerror or str(error) or type(error).__name__
        message = f"cannot write model file {path}: {reason}; the previous file is unchanged"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
    except BaseException:
        _remove_quietly(temporary)
        raise
    _sync_directory(path.parent)
    return path


_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, frozenset, torch.Size)


def check_plain_data(value, where: str = "payload") -> None:
    """Raise ``TypeError`` naming the first entry that ``torch.load(weights_only=True)``
    would refuse (NumPy values, paths, arbitrary objects), so that no unreadable model file
    is ever written: only ``None``, booleans, numbers, strings, bytes, tensors, dtypes,
    devices and dicts, lists, tuples and sets of them."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_SCALARS:
        return
    if type(value) not in _PLAIN_CONTAINERS:
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}; model files "
            "hold plain data only (None, bool, int, float, str, tensors, and dicts, lists and "
            "tuples of them): convert it first, e.g. with float() or .tolist()"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain_data(key, f"a key of {where}")
            check_plain_data(item, f"{where}[{key!r}]")
    elif type(value) is not torch.Size:
        for index, item in enumerate(value):
            check_plain_data(item, f"{where}[{index}]")


def _remove_quietly(path) -> None:
    if path is not None:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (best effort: not every system can fsync a directory)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_pattern(path: str | Path) -> re.Pattern:
    """Names of the temporary files that writes of ``path`` create
    (``.NAME.writer-PID.XXXXXXXX.tmp``) or created before the writer's process id was part of
    the name (``.NAME.XXXXXXXX.tmp``)."""
    name = re.escape(Path(path).name)
    return re.compile(rf"\.{name}\.(?:writer-([0-9]+)\.)?[a-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(
    path: str | Path, max_age: float = STALE_TEMPORARY_SECONDS
) -> list[Path]:
    """Remove temporary files of interrupted writes of ``path``: those whose writer process
    (named in the file name) no longer exists, and any older than ``max_age`` seconds.
    Files of other names, and fresh ones of live writers, are left alone. Returns the
    removed paths."""
    path = Path(path)
    pattern = temporary_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            pid = match.group(1)
            if age > max_age or (pid is not None and not _process_exists(int(pid))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # removed meanwhile, or not ours to remove
    return removed


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def check_output_paths(**paths) -> None:
    """Refuse, before any work is done, model-file paths that a write would fail on: an
    existing directory or other non-regular file, a parent that is a file, a directory
    that cannot be written, or the same file named twice, e.g.
    ``check_output_paths(checkpoint_path=..., best_path=...)``. ``None`` values are skipped.

    Raises
    ------
    ValueError
        Naming the path and the problem.
    """
    seen = {}
    for argument, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if path.name in ("", ".", ".."):
            raise ValueError(f"model file path {str(path)!r} names a directory, not a file")
        if path.exists() or path.is_symlink():
            if path.is_dir():
                raise ValueError(f"model file path {path} is a directory, not a file")
            if not path.is_file():
                raise ValueError(f"model file path {path} exists and is not a regular file")
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ValueError(f"cannot write model file {path}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write model file {path}: no write permission in {ancestor}")
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(
                f"{seen[key]} and {argument} name the same file {path}; give two different paths"
            )
        seen[key] = argument


# --------------------------------------------------------------------------- reading


def read_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", allow_nonfinite: bool = False
) -> dict[str, Any]:
    """Read a file written by :func:`write_checkpoint` without executing code from it.

    The checksum (format 2) or the zip members' CRC-32 sums (format 1) are verified before
    anything is unpickled.

    Parameters
    ----------
    device : str or torch.device
        Where to put the tensors (``"cpu"`` or an available ``"cuda"`` device).
    allow_nonfinite : bool
        Accept parameters or optimizer moments that are NaN or infinite (a diverged run);
        refused by default.

    Raises
    ------
    CheckpointError
        Missing file, a directory or other non-regular file; truncated, damaged (checksum
        mismatch) or otherwise corrupt file; a file holding objects other than plain data;
        a file of another format or of a newer format version; non-finite parameters.
        The message names the file and what failed.
    ValueError
        ``device`` is not a device this machine has.
    """
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
    device = _checked_device(device)
    path = Path(path)
    with _open_regular_file(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = _read(handle, _HEADER_LIMIT, path)
        if head.startswith(MAGIC):
            version, body = _verified_body(handle, head, size, path)
            payload = _unpickle(io.BytesIO(body), path, device)
        elif head.startswith(_ZIP_SIGNATURE):
            version = 1
            _check_legacy_archive(handle, size, path)
            handle.seek(0)
            payload = _unpickle(handle, path, device)
        elif head[:1] == b"\x80":  # a bare pickle stream: never unpickled, whatever it holds
            raise CheckpointError(
                f"refusing to load {path}: it is a bare pickle, not a model archive, and "
                "unpickling it could execute code"
            )
        else:
            what = "the file is empty" if not head else "it starts with neither a pyrovae header"
            if head:
                what += " nor a torch archive"
            raise CheckpointError(f"model file {path} is truncated or corrupt ({what})")
    _check_payload(payload, path, version)
    if not allow_nonfinite:
        _check_finite(payload, path)
    return payload


def _checked_device(device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r}: {error}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} requested but CUDA is not available on this machine"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'cpu' or 'cuda'")
    return resolved


def _open_regular_file(path: Path):
    """``path`` opened for binary reading; refuses, without opening it, anything but a
    regular file (a FIFO would block, a device such as /dev/zero never ends)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"model file {path} does not exist") from None
    except OSError as error:
        reason = error.strerror or error
        raise CheckpointError(f"cannot read model file {path}: {reason}") from error
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"model file {path} is a directory, not a model file")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a character device"
            if stat.S_ISCHR(mode)
            else "a block device"
            if stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise CheckpointError(f"model file {path} is {kind}, not a regular file")
    try:  # non-blocking: a FIFO swapped in since the stat above must not block the open
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        handle = os.fdopen(descriptor, "rb")
    except OSError as error:
        reason = error.strerror or error
        raise CheckpointError(f"cannot read model file {path}: {reason}") from error
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # replaced since the stat above
        handle.close()
        raise CheckpointError(f"model file {path} is not a regular file")
    return handle


def _read(handle, size: int, path: Path) -> bytes:
    """Up to ``size`` bytes from ``handle`` (fewer at the end of the file)."""
    try:
        return handle.read(size)
    except OSError as error:
        reason = error.strerror or error
        raise CheckpointError(f"cannot read model file {path}: {reason}") from error


def memory_limit() -> int | None:
    """Bytes of physical memory on this machine (``None`` where unknown): no model file
    larger than this can be loaded, so a header announcing more is refused unread."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_loadable_size(size: int, path: Path, what: str) -> None:
    limit = memory_limit()
    if limit is not None and size > limit:
        raise CheckpointError(
            f"model file {path} is not loadable: {what} {size / 2**30:.1f} GiB, more than this "
            f"machine's {limit / 2**30:.1f} GiB of memory"
        )


def _verified_body(handle, head: bytes, size: int, path: Path) -> tuple[int, bytes]:
    """Parse the header (the first bytes ``head`` of the file of ``size`` bytes), check the
    announced length against the file's size, and only then read the payload and check its
    checksum; return (version, payload bytes)."""
    corrupt = f"model file {path} is truncated or corrupt"
    end = head.find(b"\n", 0, _HEADER_LIMIT)
    if end < 0:
        raise CheckpointError(f"{corrupt}: its header line is damaged (no end of line)")
    match = _HEADER.fullmatch(head[:end])
    if match is None:
        shown = head[:end][:120].decode("ascii", "replace")
        raise CheckpointError(f"{corrupt}: its header line is damaged ({shown!r})")
    version, length, expected = int(match[1]), int(match[2]), match[3].decode()
    held = size - (end + 1)
    if held != length:
        change = "truncated" if held < length else "bytes appended"
        raise CheckpointError(
            f"{corrupt}: the header announces {length} payload bytes, the file holds "
            f"{held} ({change})"
        )
    _check_loadable_size(length, path, "its header announces a payload of")
    handle.seek(end + 1)
    body = _read(handle, length, path)
    if len(body) != length:  # shortened while being read
        raise CheckpointError(
            f"{corrupt}: the header announces {length} payload bytes, the file holds "
            f"{len(body)} (truncated)"
        )
    digest = hashlib.sha256(head[: match.end(2)] + b"\n")
    digest.update(body)
    if digest.hexdigest() != expected:
        raise CheckpointError(
            f"{corrupt}: checksum mismatch (sha256 {digest.hexdigest()}, the header records "
            f"{expected}): the file was damaged after it was written"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in format version {version}, newer than this "
            f"library's {FORMAT_VERSION}; upgrade pyrovae to read it"
        )
    if version < 2:
        raise CheckpointError(f"{corrupt}: its header names format version {version}")
    return version, body


def _check_legacy_archive(handle, size: int, path: Path) -> None:
    """Format 1 (no checksum): the zip archive must be complete (its directory, read from the
    end of the file, is read before any member), no larger than this machine's memory, and
    its members' CRC-32 sums right."""
    corrupt = f"model file {path} is truncated or corrupt"
    try:
        with zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
            _check_loadable_size(size, path, "the archive holds")
            damaged = archive.testzip()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a damaged archive
        raise CheckpointError(f"{corrupt} (not a complete archive: {_describe(error)})") from error
    if damaged is not None:
        raise CheckpointError(f"{corrupt}: archive member {damaged!r} fails its CRC-32 check")
    for member in members:
        # torch's reader skips members marked as directories (MS-DOS attribute 0x10) and
        # returns uninitialised memory for their tensors; torch.save never writes one.
        if member.external_attr & 0x10 or member.is_dir() or member.compress_type != 0:
            raise CheckpointError(
                f"{corrupt}: archive member {member.filename!r} has damaged attributes"
            )


def _unpickle(source, path: Path, device: torch.device):
    """The object ``torch.load(weights_only=True)`` reads from the file object ``source``."""
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than plain data and tensors, "
            f"which could execute code ({_last_line(error)})"
        ) from error
    except Exception as error:  # noqa: BLE001 - a damaged archive fails in many ways
        raise CheckpointError(
            f"model file {path} is truncated or corrupt: {_describe(error)}"
        ) from error


def _check_payload(payload, path: Path, version: int) -> None:
    """The payload is a pyrovae dict of the right version whose entries have the right types."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyrovae model file")
    inner = payload.get("format_version")
    if isinstance(inner, bool) or not isinstance(inner, int):
        raise CheckpointError(f"{path} has an invalid format version {inner!r}")
    if inner > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in format version {inner}, newer than this "
            f"library's {FORMAT_VERSION}; upgrade pyrovae to read it"
        )
    if version >= 2 and inner != version:
        raise CheckpointError(
            f"model file {path} is inconsistent: its header says format version {version}, "
            f"its payload {inner}"
        )
    problems = []
    for key, types in _PAYLOAD_TYPES.items():
        value = payload.get(key)
        if value is not None and not isinstance(value, types):
            problems.append(f"{key} is a {type(value).__name__}")
    state = payload.get("model_state")
    if isinstance(state, dict) and not all(isinstance(name, str) for name in state):
        problems.append("model_state has names that are not strings")
    history = payload.get("history")
    if isinstance(history, list) and not all(isinstance(record, dict) for record in history):
        problems.append("history holds records that are not dicts")
    optimizer = payload.get("optimizer_state")
    if isinstance(optimizer, dict) and not (
        isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)
    ):
        problems.append("optimizer_state lacks its state or param_groups")
    if problems:
        raise CheckpointError(f"model file {path} is corrupt or invalid: {'; '.join(problems)}")


def check_optimizer_state(optimizer_state: dict | None, parameters, path) -> None:
    """Refuse an optimizer state that is not a ``torch.optim`` state dict, or does not fit
    ``parameters`` (the model's, in the order :func:`pyrovae.training.fit` gives them to
    Adam). ``None`` (no state saved) passes.

    Raises
    ------
    CheckpointError
        Naming the file and the first problem.
    """
    if optimizer_state is None:
        return
    problem = _optimizer_problem(optimizer_state) or _optimizer_mismatch(
        optimizer_state, list(parameters)
    )
    if problem is not None:
        raise CheckpointError(f"model file {path} is corrupt or invalid: {problem}")


def _optimizer_problem(optimizer: dict) -> str | None:
    """What makes ``optimizer`` not a ``torch.optim`` state dict: ``state`` maps parameter
    indices to dicts of moments (tensors or numbers), ``param_groups`` is a list of dicts
    each naming its parameters' indices (each index in one group) and a positive learning
    rate."""
    state, groups = optimizer.get("state"), optimizer.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return "its optimizer state lacks its state or param_groups"
    indices = []
    for number, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(_is_index(i) for i in params):
            return f"its optimizer's parameter group {number} has no list of parameter indices"
        if not _is_positive_number(group.get("lr")):
            return f"its optimizer's parameter group {number} has no positive learning rate"
        indices += params
    if len(set(indices)) != len(indices):
        return "its optimizer names a parameter in more than one group"
    for index, moments in state.items():
        if index not in indices:
            return f"its optimizer holds moments of parameter {index!r}, which no group names"
        if not isinstance(moments, dict) or not all(
            isinstance(value, (torch.Tensor, int, float)) for value in moments.values()
        ):
            return f"its optimizer's moments of parameter {index} are not tensors"
    return None


def _optimizer_mismatch(optimizer: dict, parameters: list) -> str | None:
    """How a well-formed optimizer state does not fit ``parameters``: the one group of all
    of them that :func:`pyrovae.training.fit` builds, moments of each parameter's shape."""
    groups = optimizer["param_groups"]
    if len(groups) != 1 or sorted(groups[0]["params"]) != list(range(len(parameters))):
        held = sum(len(group["params"]) for group in groups)
        return (
            f"its optimizer state has {len(groups)} parameter group(s) of {held} parameters, "
            f"the model one group of {len(parameters)}"
        )
    for index, moments in optimizer["state"].items():
        shape = tuple(parameters[index].shape)
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shape:
                return (
                    f"its optimizer {key} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {shape}"
                )
    return None


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_positive_number(value) -> bool:
    if isinstance(value, torch.Tensor):
        value = float(value) if value.numel() == 1 and value.is_floating_point() else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 < value < float("inf")


def _check_finite(payload: dict, path: Path) -> None:
    """Refuse NaN or infinite parameters and optimizer moments."""
    tensors = [
        (f"parameter {name!r}", value) for name, value in (payload.get("model_state") or {}).items()
    ]
    optimizer = payload.get("optimizer_state") or {}
    for index, moments in (optimizer.get("state") or {}).items():
        if isinstance(moments, dict):
            tensors += [(f"optimizer {key} of parameter {index}", v) for key, v in moments.items()]
    bad = []
    for label, value in tensors:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append((label, count, value.numel()))
    if bad:
        label, count, size = bad[0]
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"model file {path} holds non-finite values ({count} of {size} in {label}{more}), "
            "e.g. from a diverged run; pass allow_nonfinite=True to load it anyway"
        )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_last_line(error)}"


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else error.__class__.__name__


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAGIC",
    "STALE_TEMPORARY_SECONDS",
    "CheckpointError",
    "check_optimizer_state",
    "check_output_paths",
    "check_plain_data",
    "encode_checkpoint",
    "memory_limit",
    "read_checkpoint",
    "remove_stale_temporaries",
    "temporary_pattern",
    "write_checkpoint",
]
