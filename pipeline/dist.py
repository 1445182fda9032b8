"""Distributed setup shared by every stage that runs under torchrun (nanoGPT-style: DDP is on when ``RANK`` is set).

``setup_dist()`` returns the same names in every mode, so a training loop never branches on DDP::

    ctx = setup_dist()                  # rank, local_rank, world_size, device, is_main
    try:
        ...                             # only ``ctx.is_main`` writes files; ``barrier()`` after
    finally:
        cleanup_dist()

Backend: NCCL when the device is CUDA, gloo on CPU. ``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``python -m ...`` leaves them unset and runs single-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class DistContext(NamedTuple):
    """Where this process sits in the job; unpacks as ``rank, local_rank, world_size, device, is_main``."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def cuda_problem() -> str | None:
    """Why torch cannot use a GPU here (None when it can): a CPU-only torch build, no NVIDIA driver / GPU, or a
    driver too old for this torch's CUDA version (torch's own message, with the versions)."""
    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return (f"{build} is a CPU-only build (no CUDA): reinstall torch from a CUDA wheel index, e.g. "
                "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (see README, Install)")
    try:
        torch.cuda.init()
        reason = "torch sees no GPU"
    except Exception as e:  # noqa: BLE001 - torch reports driver problems as RuntimeError/AssertionError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "too old" in reason.lower():
        return (f"{build} is built for CUDA {torch.version.cuda}, but {reason}; update the NVIDIA driver or "
                "install a torch built for an older CUDA (TORCH_INDEX_URL, see README)")
    return f"{build} (CUDA {torch.version.cuda}) cannot use a GPU here: {reason} (no GPU or no NVIDIA driver?)"


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:{local_rank}`` when CUDA is available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given.

    Asking for CUDA where torch cannot use it is a PipelineError that says why (:func:`cuda_problem`)."""
    asked = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise PipelineError(f"--device {asked}: not a device ({e}); use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise PipelineError(f"--device {asked} (GPUS>0 in the scripts) needs CUDA, but {problem}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"--device {asked}: rank {local_rank} needs GPU {device.index}, but CUDA sees "
                                f"{torch.cuda.device_count()} on this node (GPUS larger than the GPUs here?)")
    return device


def setup_dist(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (``RANK`` set); otherwise single-process values.

    On CPU, ranks sharing a machine each use ``cores // local_world_size`` intra-op threads (instead of torchrun's
    default of one) unless ``OMP_NUM_THREADS`` was set to something else.
    """
    if int(os.environ.get("RANK", -1)) == -1:
        dev = resolve_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(0, 0, 1, dev, True)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ["WORLD_SIZE"])
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world > 1 and os.environ.get("OMP_NUM_THREADS", "1") == "1":  # torchrun's default, not a choice
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend}
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return DistContext(rank, local_rank, world_size, dev, rank == 0)


def is_dist() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cleanup_dist() -> None:
    """Destroy the process group if one exists (call in ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when single-process)."""
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (no-op when single-process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` when single-process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run a block on every rank and fail on every rank when it fails on one.

    Without this, a rank that stops with an error leaves the others waiting in their next collective until the
    process-group timeout. After the block, ranks exchange their outcome (one all-gather): a failed rank re-raises
    its own exception, the others raise PipelineError naming the failed rank and its message. Single-process: the
    block's exception passes through unchanged.
    """
    err: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        err = e
    if not is_dist():
        if err is not None:
            raise err
        return
    outcomes = all_gather_objects(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, msg) for r, msg in enumerate(outcomes) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise PipelineError(f"rank {r} failed ({len(failed)} of {len(outcomes)} ranks): {msg}")


def broadcast_buffers(module: torch.nn.Module, skip_prefixes: Sequence[str] = ()) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running stats) to every rank, except names under ``skip_prefixes``."""
    if not is_dist():
        return
    for name, buf in module.named_buffers():
        if not any(name.startswith(p) for p in skip_prefixes):
            dist.broadcast(buf.data, src=0)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Contiguous block of ``range(n)`` for ``rank``: every index exactly once over all ranks, no padding.

    Unlike ``DistributedSampler`` (which pads with duplicates so ranks get equal counts), this is exact for
    evaluation; ranks may differ by one sample.
    """
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    stop = start + per + (1 if rank < extra else 0)
    return list(range(start, stop))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of this process as tensors/lists/ints only (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, tuple | list) else x
