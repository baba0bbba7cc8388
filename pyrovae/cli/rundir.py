"""Run directories of ``pyrovae train``: the lock beside the directory, and ``--force``
replacing a run while keeping the old one recoverable."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

from pyrovae.cli.common import MODEL_FILE, CLIError, existing_ancestor

HISTORY_FILES = ("history.jsonl", "history.csv")
LOCK_SUFFIX = ".lock"
REPLACED_PREFIX = ".replaced-"
"""``--force`` moves the old run's files into ``OUT/.replaced-<time>/`` until the new run's
first checkpoint is written."""
_HOLDER_LIMIT = 256


class RunLock:
    """An exclusive lock on a run directory: the file ``OUT.lock`` beside it, holding the
    holder's process id and host and locked with ``flock`` while the holder lives.

    The file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: never through a symbolic
    link, never into an existing file. A second writer finds it locked and is refused with
    the holder's process id; a lock file left by a process that died (``kill -9``, power
    loss) is not locked any more: it is removed and created afresh (taken over). A lock path
    that is a symbolic link or not a regular file is refused."""

    def __init__(self, run_dir: Path):
        run_dir = run_dir.absolute()
        self.path = run_dir.parent / (run_dir.name + LOCK_SUFFIX)
        self.run_dir = run_dir
        self.descriptor: int | None = None
        self.took_over: str | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._cannot(error) from None
        for _ in range(10):
            try:
                descriptor = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644
                )
            except FileExistsError:
                self._take_over_if_stale(fcntl)
                continue
            except OSError as error:
                raise self._cannot(error) from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                same = os.fstat(descriptor).st_ino == os.lstat(self.path).st_ino
            except OSError:  # another process took it between our create and lock
                same = False
            if not same:
                os.close(descriptor)
                continue
            os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.descriptor = descriptor
            return self
        raise CLIError(f"--out {self.run_dir}: could not take the lock file {self.path}")

    def _take_over_if_stale(self, fcntl) -> None:
        """Refuse a lock held by a live process; remove one left by a dead process."""
        try:
            descriptor = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return  # released meanwhile: try to create it again
        except OSError as error:
            if os.path.islink(self.path):
                raise CLIError(
                    f"the lock file {self.path} of --out {self.run_dir} is a symbolic link; "
                    "pyrovae never writes through one: remove it (or choose another --out)"
                ) from None
            raise self._cannot(error) from None
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise CLIError(
                    f"the lock file {self.path} of --out {self.run_dir} is not a regular file; "
                    "remove it (or choose another --out)"
                )
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise CLIError(
                    f"--out {self.run_dir} is in use by {_read_holder(descriptor)} (lock file "
                    f"{self.path}); wait for that run to finish, or choose another --out"
                ) from None
            holder = _read_holder(descriptor)
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    os.unlink(self.path)  # still the stale file we hold: remove it
                    self.took_over = holder
        finally:
            os.close(descriptor)

    def _cannot(self, error: OSError) -> CLIError:
        return CLIError(
            f"--out {self.run_dir}: cannot create the lock file {self.path} "
            f"({error.strerror}); choose a writable location"
        )

    def release(self) -> None:
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == os.fstat(self.descriptor).st_ino:
                os.unlink(self.path)
        os.close(self.descriptor)
        self.descriptor = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(descriptor: int) -> str:
    """``process N on HOST`` from an open lock file; what is not a process id and a host
    name (an empty file, NUL bytes) is said as such, never printed raw."""
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        text = os.read(descriptor, _HOLDER_LIMIT).decode("ascii", errors="replace").split()
    except OSError:
        text = []
    if len(text) == 2 and text[0].isdigit() and text[1].isprintable() and "\ufffd" not in text[1]:
        return f"process {text[0]} on {text[1]}"
    if not text:
        return "another process (the lock file is still empty)"
    return "an unknown process (the lock file holds no process id)"


# --------------------------------------------------------------------------- the directory


def check_run_dir(run_dir: Path) -> None:
    """Refuse an --out that cannot be a run directory, before anything is read."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CLIError(
            f"--out {run_dir} is a file, not a directory; name a directory (pyrovae writes "
            f"{MODEL_FILE}, {', '.join(HISTORY_FILES)} into it)"
        )
    ancestor = existing_ancestor(run_dir)
    if not ancestor.is_dir():
        raise CLIError(f"--out {run_dir}: {ancestor} is a file, not a directory")


def check_not_replacing(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse an --out that holds a model unless --resume or --force (run before the lock
    for a quick answer, and again under it: a run may have finished meanwhile)."""
    model_path = run_dir / MODEL_FILE
    if model_path.exists() and not (resume or force):
        raise CLIError(
            f"--out {run_dir} already holds a trained model ({model_path}); pass --resume to "
            "continue it, --force to replace it, or choose another --out"
        )


def set_aside(run_dir: Path) -> Path | None:
    """``--force``: move the old run's model and history files into
    ``OUT/.replaced-<time>/`` (kept until the new run's first checkpoint is written, so
    that an interrupted replacement loses nothing). Returns that directory, or ``None``
    when there was nothing to replace."""
    files = [run_dir / name for name in (MODEL_FILE, *HISTORY_FILES)]
    present = [path for path in files if path.is_file()]
    if not present:
        return None
    aside = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    return aside


def describe_replaced(aside: Path) -> str:
    names = ", ".join(sorted(p.name for p in aside.iterdir()))
    return (
        f"--force: replacing the run in {aside.parent} ({names}); the old files are kept in "
        f"{aside} until the new run's first checkpoint is written"
    )


def remove_aside(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def check_writable_dir(directory: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise CLIError(
            f"--out {directory} is not writable ({error.strerror}); choose a writable location"
        ) from None


def check_free_space(run_dir: Path, vae) -> None:
    """Refuse before training when the disk cannot hold a checkpoint (the file is written
    beside the previous one, then renamed over it: room for two)."""
    tensors = sum(p.numel() * p.element_size() for p in vae.parameters())
    size = 3 * tensors + 2**20  # parameters, two Adam moments, history and state
    free = shutil.disk_usage(existing_ancestor(run_dir)).free
    if free < 2 * size:
        raise CLIError(
            f"--out {run_dir}: {free / 2**20:.1f} MiB free on its disk, but a checkpoint of "
            f"this model takes about {size / 2**20:.1f} MiB and is written beside the previous "
            f"one (room for two needed); free space or choose another --out"
        )
