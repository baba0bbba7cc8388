"""``main``: parse (without importing torch), then import and run one command."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path

from pyrovae.cli.parser import build_parser

PARALLEL_COMMANDS = ("train", "evaluate")
"""Commands that run data-parallel under ``torchrun``."""

COMMANDS = {
    "train": ("pyrovae.cli.train", "run_train"),
    "evaluate": ("pyrovae.cli.evaluate", "run_evaluate"),
    "sample": ("pyrovae.cli.sample", "run_sample"),
    "plot": ("pyrovae.cli.plot", "run_plot"),
    "compare": ("pyrovae.cli.compare", "run_compare"),
    "gaps": ("pyrovae.cli.gaps", "run_gaps"),
}
"""Each command's module and function, imported only when the command runs."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(track_explicit=True).parse_args(argv)))
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line as it happens
    import torch

    from pyrovae.cli.common import CLIError, Output, one_line, write_failure
    from pyrovae.distributed import active_context, init_from_environment, shutdown

    expected = (CLIError, ValueError, TypeError, OSError, FloatingPointError)
    # Failures reported as one line (bad input, unreadable or unwritable files, non-finite
    # training); anything else is a bug and keeps its traceback.
    threads = torch.get_num_threads()
    joined = args.command in PARALLEL_COMMANDS and active_context() is None
    try:
        joined = joined and init_from_environment() is not None
        module, function = COMMANDS[args.command]
        run = getattr(importlib.import_module(module), function)
        output = Output(args)
        with output.warnings():
            return run(args, explicit, output)
    except expected as error:
        text = write_failure(error, Path("?")) if _bare_os_error(error) else str(error)
        print(f"error: {one_line(text)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        torch.set_num_threads(threads)
        if joined:
            shutdown()


def _bare_os_error(error: BaseException) -> bool:
    """An OSError that is not one of the library's own messages (those subclass it with a
    sentence of their own, e.g. DataNotFoundError)."""
    return type(error) in (OSError, PermissionError, IsADirectoryError, NotADirectoryError)
