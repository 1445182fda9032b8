"""Atomic output files and JSON: a crash never leaves a half-written file under its final name.

    with atomic_path(out / "slide.h5") as tmp:     # write tmp; renamed onto the final name on success
        ...
    write_json(path, obj)                          # indented JSON, numpy values and paths converted
    save_config(out_dir, config)                   # a run's resolved configuration beside its outputs
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
"""Mode of every output file: what ``open()`` gives under this process's umask (0644 under the usual 022)."""

_TEMP_RE = r"^\.{stem}\.(\d+)\.[0-9a-f]{{12}}\.tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    A crash never leaves a half-written file under the final name, so "exists" can mean "done".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes[-1:])
    # a unique name that the writer creates itself, so the file gets the usual umask permissions (mkstemp: 0600)
    tmp_path = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp_path
        if tmp_path.is_file():  # writers that create their own files (safetensors: 0600) get the usual mode too
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def remove_stale_temps(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temp files that :func:`atomic_path` left for ``paths`` in a killed run; returns those removed.

    A temp file of a process that is still running (same pid, alive) is kept: it may be writing it now.
    """
    removed = []
    for p in map(Path, paths):
        if not p.parent.is_dir():
            continue
        rx = re.compile(_TEMP_RE.format(stem=re.escape(p.stem)))
        for q in p.parent.iterdir():
            m = rx.match(q.name)
            if m is None or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
                continue
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()
            removed.append(q)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def ensure_writable(folder: str | os.PathLike, what: str = "output folder", fix: str = "choose another --out") -> Path:
    """Create ``folder`` if needed and check a file can be written in it; else one-line :class:`PipelineError`.

    Stages call it before the first slide or epoch, so an unwritable output stops the run at once, naming the path.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create the {what} {folder} ({e.strerror or e}); {fix} or fix its "
                            "permissions") from None
    probe = folder / f".write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"the {what} {folder} is not writable ({e.strerror or e}); {fix} or fix its "
                            "permissions") from None
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, set):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy values and paths are converted)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def config_dict(config: Any) -> dict[str, Any]:
    """A run's configuration (a dataclass, an argparse Namespace or a mapping) as a plain dict."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if hasattr(config, "__dict__") and not isinstance(config, dict):
        return dict(vars(config))
    return dict(config or {})


def save_config(out_dir: str | os.PathLike, config: Any, name: str = "config.json") -> Path:
    """Save the resolved configuration of a run (a dataclass, a Namespace or a dict) as JSON next to its outputs."""
    cfg = config_dict(config)
    cfg["_argv"] = sys.argv
    cfg["_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = Path(out_dir) / name
    write_json(path, cfg)
    return path




def remove_outputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the files (or folders) that exist among ``paths``; returns those removed.

    Stages call it before they redo a slide, so that a slide failing on a rerun leaves no earlier output that a
    later stage would trust.
    """
    removed = []
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.exists() or p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed
