"""Logging for every stage: stderr, plus a log file on the main rank."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO, rank: int = 0) -> None:
    """Log to stderr (and to ``log_file`` when given). Ranks other than 0 only log warnings."""
    root = logging.getLogger()
    root.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("PIL", "matplotlib", "h5py", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def close_log_file(path: str | os.PathLike) -> None:
    """Detach and close the root logger's file handler writing to ``path`` (added by ``setup_logging``), so that a
    second ``main()`` in the same process does not keep writing into the first run's log."""
    target = os.path.abspath(path)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == target:
            root.removeHandler(h)
            h.close()
