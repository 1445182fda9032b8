"""The ``main`` shared by the HEX stage CLIs: parse, check flags, join the process group, log, map errors to exit 2.

Every stage is ``main(argv) = run_cli(build_parser(), argv, work, log_file, check)``:

1. argparse (a bad flag value prints the usage and returns 2; ``--help`` returns 0: ``main()`` returns, never
   raises ``SystemExit``);
2. ``check(args)`` (optional) validates flags before any process group exists, so a bad flag stops every rank at
   once instead of one rank failing while the others wait in a collective;
3. ``setup_dist(args.device)`` (torchrun ranks, or single-process values; asking for CUDA where torch cannot use
   it stops here with the reason);
4. ``prepare(args, ctx)`` (optional, every rank): checks that need the device or write access, e.g. that the
   output folders are writable (:func:`~preprocess.utils.ensure_writable`), before the log file is opened in them;
5. logging to stderr and, on the main rank, to ``log_file(args)``;
6. ``work(args, ctx) -> exit code``; a :class:`~preprocess.utils.PipelineError` anywhere is logged as one line
   (no traceback) and gives exit code 2; the log file is closed and the process group destroyed in every case.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from hex.dist import DistContext, cleanup_dist, close_log_file, setup_dist
from preprocess.utils import PipelineError, setup_logging

log = logging.getLogger(__name__)

EXIT_INPUT_ERROR = 2


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    work: Callable[[argparse.Namespace, DistContext], int],
    log_file: Callable[[argparse.Namespace], Path | None],
    check: Callable[[argparse.Namespace], None] | None = None,
    logger: logging.Logger | None = None,
    prepare: Callable[[argparse.Namespace, DistContext], None] | None = None,
) -> int:
    """Run one stage CLI (see the module docstring); returns its exit code (0 ok, 2 bad input, else ``work``'s)."""
    logger = logger or log
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, usage already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_INPUT_ERROR
    path: Path | None = None
    try:
        if check is not None:
            check(args)
        ctx = setup_dist(getattr(args, "device", "auto"))
    except PipelineError as e:
        setup_logging(None, rank=int(os.environ.get("RANK", 0)))
        logger.error("%s", e)
        return EXIT_INPUT_ERROR
    try:
        if prepare is not None:
            try:
                prepare(args, ctx)
            except PipelineError:
                setup_logging(None, rank=ctx.rank)
                raise
        path = log_file(args)
        setup_logging(path if ctx.is_main else None, rank=ctx.rank)
        return work(args, ctx)
    except PipelineError as e:
        logger.error("%s", e)
        return EXIT_INPUT_ERROR
    finally:
        if path is not None:
            close_log_file(path)
        cleanup_dist()


def run_logged(work: Callable[[], object], log_file: Path | None, level: str = "INFO", rank: int = 0,
               logger: logging.Logger | None = None) -> int:
    """The same error and log handling for a CLI that starts no process group (e.g. ``mica.train``, whose torchrun
    processes each train their own folds): log to stderr and ``log_file``, run ``work()``, 0 on success, a
    :class:`~preprocess.utils.PipelineError` as one line and exit code 2; the log file is closed in every case."""
    logger = logger or log
    setup_logging(log_file, level=getattr(logging, str(level).upper(), logging.INFO), rank=rank)
    try:
        work()
        return 0
    except PipelineError as e:
        logger.error("%s", e)
        return EXIT_INPUT_ERROR
    finally:
        if log_file is not None:
            close_log_file(log_file)
