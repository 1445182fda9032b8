"""Benchmark: HEX training throughput of the data pipeline vs the model step (samples/s), same machine, same run.

    python -m bench.bench_hex                               # CPU here, CUDA (with autocast) when available
    python -m bench.bench_hex --patches 384 --workers 2 --batch-size 48 --steps 6

A synthetic cohort of 224 px patches is written to a temporary folder twice: the HDF5 patch store
(``he_patches/{slide}.h5``) and the legacy PNG folder (``he_png/{slide}/{slide}_{i}.png``;
``bench.synthetic_hex_data``). Timed:

  data   DataLoader (``--workers`` processes, batch ``--batch-size``) -> device -> training BatchTransform
         (flips/rot90, colour jitter, resize to the backbone input size, normalisation), for both layouts;
  model  one training step (forward, adaptive loss, backward, Adam) of HEX with the ``tiny`` backbone at 224 px
         and with MUSK at a tiny size (same architecture, ``--musk-kw``), on random inputs already on the device.

It prints samples/s for each and the ratio data rate / model-step rate: above 1 the loader keeps the model busy.
Two CPU cores shared by loader workers and the model step make the CPU ratios pessimistic for GPU training, where
the step runs on the device and the transform is a few batched kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bench.synthetic_hex_data import write_synthetic_dataset
from hex.data.datasets import build_dataset
from hex.data.transforms import BatchTransform
from hex.evaluate.predict import autocast, resolve_amp
from hex.losses import build_loss
from hex.model import HEX
from hex.train.epoch import TrainStep
from pipeline import artifacts as art
from pipeline.dist import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_rate(root: Path, patches_dir: Path, slides: list[str], size: int, mean: tuple, std: tuple,
              device: torch.device, batch_size: int, workers: int, epochs: int = 3) -> float:
    """Samples/s of loader + device transfer + training transform (first batch excluded: worker start-up)."""
    ds = build_dataset(root, slides, patches_dir=patches_dir)
    tf = BatchTransform(size, mean, std, train=True)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    n, t0 = 0, None
    for _ in range(epochs):
        for img, _, _ in loader:
            x = tf(img.to(device, non_blocking=True))
            _sync(device)
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += x.shape[0]
    return n / max(time.perf_counter() - t0, 1e-9)


def step_rate(name: str, kw: dict, device: torch.device, batch_size: int, steps: int, amp: str) -> tuple[float, int]:
    """Samples/s of full training steps of HEX(name) on random device inputs (1 warm-up step)."""
    torch.manual_seed(0)
    model = HEX(name, num_markers=40, fds={"start_smooth": 0}, unfreeze_last=-1, **kw).to(device)
    crit = build_loss("adaptive", 40).to(device)
    step = TrainStep(model, crit).train()
    opt = torch.optim.Adam([p for p in step.parameters() if p.requires_grad], lr=1e-5)
    dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    size = model.input_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.rand(batch_size, 40, device=device)
    n, t0 = 0, 0.0
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, dtype):
            loss, _, _ = step(x, y, 1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        n += batch_size if i else 0
    _sync(device)
    return n / max(time.perf_counter() - t0, 1e-9), size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=384, help="synthetic 224 px patches (4 slides)")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed model steps per backbone")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "fp16", "bf16", "none"))
    p.add_argument("--musk-kw", type=json.loads,
                   default={"embed_dim": 192, "depth": 4, "num_heads": 3, "mlp_dim": 768, "img_size": 224},
                   help="MUSK size for the model-step timing (JSON)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, workers {args.workers}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = write_synthetic_dataset(root, n_slides=4, n_per_slide=args.patches // 4, both=True)
        models = {"tiny": ({}, "tiny"), "musk (tiny size)": (args.musk_kw, "musk")}
        for label, (kw, name) in models.items():
            rate, size = step_rate(name, kw, device, args.batch_size, args.steps, args.amp)
            mean, std = HEX(name, **kw).visual.mean, HEX(name, **kw).visual.std
            print(f"model step  {label:17s} {size:4d} px: {rate:8.1f} samples/s")
            for layout, pdir in (("h5 store", art.PATCH_STORE.dir(root)), ("PNG folder", root / "he_png")):
                d = data_rate(root, pdir, info["slides"], size, mean, std, device, args.batch_size, args.workers)
                rows.append((label, size, layout, d, rate))
                print(f"  data      {layout:17s} {size:4d} px: {d:8.1f} samples/s   data/model = {d / rate:6.2f}")
    h5 = {r[0]: r[3] for r in rows if r[2] == "h5 store"}
    png = {r[0]: r[3] for r in rows if r[2] == "PNG folder"}
    for k in h5:
        print(f"h5 store / PNG folder loading rate ({k} input size): {h5[k] / png[k]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
