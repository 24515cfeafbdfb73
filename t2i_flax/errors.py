"""The error boundary: what a user can get wrong, as typed exceptions.

Raise a `UserError` subclass where an input is read (a flag, the model folder, the dataset, the output or
checkpoint folder). The command lines print it as one line on stderr and exit with code 2. Anything else
is a bug in t2i_flax (or in a library) and keeps its traceback (exit code 1). `TrainingFailed` is a run
that went wrong although its input may be fine (a non-finite loss): one line, exit code 1.

They subclass ValueError so that code written against the loaders' old ValueErrors keeps working; the
command lines catch only these classes, never ValueError itself."""
from __future__ import annotations

import os
import sys

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a complete checkpoint; run again to resume


class UserError(ValueError):
    """Bad input: one line, exit code 2."""


class FlagError(UserError):
    """A flag or a combination of flags."""


class ModelError(UserError):
    """The model reference, its folder, configs or weight files."""


class DataError(UserError):
    """The dataset: source, columns, captions, images."""


class OutputError(UserError):
    """The output folder (or another folder the run writes to)."""


class CheckpointError(UserError):
    """A checkpoint to resume from or to export."""


class TrainingFailed(RuntimeError):
    """The run itself failed (non-finite loss): one line, exit code 1."""


class Stopped(Exception):
    """Training stopped on request (SIGTERM/SIGINT) after writing a complete checkpoint; the message says
    how to resume. Exit code EXIT_STOPPED."""


def name_examples(names, limit: int = 3) -> str:
    """The first `limit` names (sorted) and how many more, for a one-line message."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def count_of(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def report(error: BaseException) -> int:
    """Prints a UserError / TrainingFailed as one line and returns the exit code (re-raises with
    T2I_FLAX_DEBUG=1, for the traceback)."""
    if os.environ.get("T2I_FLAX_DEBUG"):
        raise error
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return EXIT_USAGE if isinstance(error, UserError) else EXIT_FAILED
