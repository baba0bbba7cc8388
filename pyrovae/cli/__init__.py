"""Command line: ``pyrovae train``, ``evaluate``, ``compare``, ``gaps``, ``sample`` and ``plot``.

``evaluate`` estimates log p(x) per data point by importance sampling (``--method is``, with
ELBOs and IWAE bounds) or by annealed importance sampling (``--method ais``, with ``--bdmc``
to check the number of steps on simulated data); ``compare`` scores several models on the
same points and prints their paired differences; ``gaps`` splits the inference gap into
approximation and amortization gaps.

Every command checks its arguments, the files it reads (model, spec and data files) and the
place it writes before any training or evaluation starts, and turns every expected failure
into one line on stderr, ``error: ...``, naming the file or option and the fix, with exit
status 2 (an interrupt exits with 130). ``--help`` of each command lists every option with its
default; ``--help`` and argument errors are answered without importing torch.

Output: ``--quiet`` prints only errors and the final summary, the default adds one line per
epoch and notes such as how the data were prepared, ``--verbose`` also the resolved settings.
Progress bars are drawn only when stderr is a terminal. ``--threads N`` sets torch's
intra-op threads (``torch.set_num_threads``) for the command; without it a model of under a
million parameters gets one thread and a larger one the cores not busy, and the output says
which.

Every file a command writes goes through :func:`pyrovae.outputs.write_file`: never over one
of its inputs or over a file of another kind, atomically (temporary file, fsync, rename),
saying what it replaced.

Runs are never overwritten silently: ``train`` refuses an ``--out`` that holds a model
unless ``--resume`` (continue it) or ``--force`` (replace it) is given, and holds a lock file
``OUT.lock`` beside the run directory while it trains, so that a second writer is refused
with the holder's process id (a lock left by a process that no longer runs is taken over;
the lock is never opened through a symbolic link). ``--force`` keeps the old run's files in
``OUT/.replaced-<time>/`` until the new run's first checkpoint is written.

Under ``torchrun`` with several processes, ``train`` and ``evaluate`` run data-parallel (see
:mod:`pyrovae.distributed`); only rank 0 prints and writes files.
"""

from pyrovae.cli.main import main
from pyrovae.cli.parser import AIS_DEFAULT_POINTS, build_parser

__all__ = ["AIS_DEFAULT_POINTS", "RunLock", "build_parser", "evaluation_data", "main"]

_LAZY = {
    "RunLock": "pyrovae.cli.rundir",
    "evaluation_data": "pyrovae.cli.common",
    "prepare_data": "pyrovae.cli.common",
    "load_data": "pyrovae.cli.common",
    "CLIError": "pyrovae.cli.common",
}


def __getattr__(name: str):
    """Names whose modules import torch, loaded on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyrovae.cli' has no attribute {name!r}")
