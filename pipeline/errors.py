"""The one error type a user can fix, and the exit codes every stage returns."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """Bad input a user can fix; the message names the file and the fix (printed as one line, no traceback)."""


EXIT_FAILED = 1  # some slides (or folds) failed; the others are done
EXIT_INPUT_ERROR = 2  # bad input or flags: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it
