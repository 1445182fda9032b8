"""Benchmark: whole-slide HEX inference end to end (read -> model -> write) vs the model alone, patches/s, one run.

    python -m bench.bench_infer                                     # CPU: MUSK at a tiny size, 1 worker (~1 min)
    python -m bench.bench_infer --backbone tiny --workers 0 1 2     # CPU: the tiny CNN, a worker sweep
    python -m bench.bench_infer --device cuda --backbone musk       # GPU: full-size MUSK, bf16, eager and SDPA
    python -m bench.bench_infer --slide my.svs --json bench.json    # a real slide; numbers also as JSON

Both sides run the same HEX (random init) with the same batch size, transform (``hex.data.transforms.BatchTransform``
of the stage), device and autocast, in this process:

  model-only   ``hex.evaluate.predict.run_loop`` over uint8 tile batches already in memory (on the device for CUDA; the
               first batches of the slide, cycled until as many tiles as the slide has went through): transform,
               forward, outputs back to the host;
  end-to-end   the stage itself, ``hex.infer.predictions.infer_slide``: the stage-01 grid file (``--grid stage01``, as
               after ``preprocess.patch``; ``computed`` adds the tissue mask to every pass), region reads by
               ``--workers`` DataLoader workers (``hex.infer.tiles``), pinned memory on CUDA, the same loop, and the
               ``hex_pred/{slide}.h5`` write;
  read-only    the tile loader alone with the same workers (no model), to explain the ratio.

It prints patches/s of each and the ratio end-to-end / model-only (target >= 0.9), and ``serial bound`` =
read / (read + model), the ratio to expect when reading and the model never overlap (no spare core for the
workers). Default slide: a synthetic H&E (superellipse of stained texture with nuclei, 0.5 µm/px, Aperio JPEG
pyramid written by ``sample_data.writers.write_aperio_tiff``) with about ``--tiles`` tissue tiles of 224 px.
Warm-up before timing (model: 2 batches; stage: one pass over the slide's first 2 batches of tiles); timings are
medians over ``--repeats`` passes (model-only and end-to-end interleaved); on CUDA timers are read after a
synchronisation and the peak GPU memory of each phase is reported. Lines starting with ``KEY:`` are picked up by
bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.synthetic_slide import stage01_grid, subset_grid, write_bench_slide
from hex.data.transforms import BatchTransform
from hex.evaluate.predict import prediction_fn, resolve_amp, run_loop, wants_channels_last
from hex.infer.predictions import InferConfig, infer_slide
from hex.infer.tiles import TileRegions, make_tile_loader
from hex.model import HEX
from pipeline import artifacts as art
from pipeline.errors import PipelineError

TILE = 224  # px at 0.5 µm/px (the synthetic slides are 0.5 µm/px, so a tile is 224 level-0 px)
MUSK_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 192, "depth": 4, "num_heads": 3, "mlp_dim": 768, "img_size": 224},  # as bench_hex.py
    "full": {},  # MUSK-large: 1024-d, 24 layers, 16 heads, 384 px
}
NUM_MARKERS = 40

# ----------------------------------------------------------------------------------------------------------------
# model


def build_model(backbone: str, musk_kw: dict[str, Any], device: torch.device) -> HEX:
    """Random-init HEX (40 markers, eval mode, no FDS) on ``device``, channels-last where the stage uses it."""
    torch.manual_seed(0)
    kw = musk_kw if backbone == "musk" else {}
    model = HEX(backbone, num_markers=NUM_MARKERS, unfreeze_last=0, fds=None, **kw).to(device).eval()
    if wants_channels_last(model, device):
        model.to(memory_format=torch.channels_last)
    return model


def set_attention(model: HEX, mode: str) -> bool:
    """Switch MUSK's attention to ``sdpa``/``eager`` in place (same weights); False when the backbone has no such
    switch (then the run is labelled with the backbone's own attention)."""
    switch = getattr(model.visual, "set_attention", None)
    if switch is None:
        return False
    switch(mode)
    return True


def stage_meta(model: HEX) -> dict[str, Any]:
    """What ``infer_slide`` reads from a checkpoint's metadata, for a random-init model."""
    return {"markers": [f"marker_{i:02d}" for i in range(NUM_MARKERS)], "input_size": model.input_size,
            "mean": list(model.mean), "std": list(model.std), "interpolation": "bilinear",
            "checkpoint": "random init (bench/bench_infer.py)", "checkpoint_sha256": "none"}


# ----------------------------------------------------------------------------------------------------------------
# timed phases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Wall seconds of the block (CUDA synchronised at both ends) and its peak GPU memory in GiB (None on CPU)."""
    rec: dict[str, float | None] = {"seconds": 0.0, "peak_gib": None}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield rec
    _sync(device)
    rec["seconds"] = time.perf_counter() - t0
    if cuda:
        rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def tile_pool(tiles: TileRegions, batch_size: int, batches: int, device: torch.device) -> tuple[list, np.ndarray]:
    """The first ``batches`` tile batches of the slide (uint8 (B,3,224,224), on ``device``) and their tile rows."""
    pool, rows = [], []
    for imgs, idx in make_tile_loader(tiles, batch_size, workers=0):
        pool.append(imgs.to(device))
        rows.append(idx.numpy())
        if len(pool) == batches:
            break
    return pool, np.concatenate(rows)


def model_only(forward: Callable, pool: list[torch.Tensor], n_tiles: int, tf: BatchTransform, device: torch.device,
               amp: torch.dtype | None, channels_last: bool) -> np.ndarray:
    """``run_loop`` over ``n_tiles`` tiles of in-memory batches (``pool`` cycled; the last batch cut to fit)."""

    def batches() -> Iterator[tuple[torch.Tensor]]:
        left, i = n_tiles, 0
        while left > 0:
            b = pool[i % len(pool)][:left]
            yield (b,)
            left -= len(b)
            i += 1

    return run_loop(batches(), forward, tf, device, amp, channels_last=channels_last)


def read_only(tiles: TileRegions, batch_size: int, workers: int, pin_memory: bool) -> int:
    """Iterate the stage's tile loader without a model; returns the number of tiles read."""
    n = 0
    for imgs, _ in make_tile_loader(tiles, batch_size, workers, pin_memory=pin_memory):
        n += int(imgs.shape[0])
    return n


# ----------------------------------------------------------------------------------------------------------------
# the run


def _defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    if args.musk_size is None:
        args.musk_size = "full" if cuda else "tiny"
    if args.attention is None:
        args.attention = "both" if cuda and args.backbone == "musk" else "sdpa"
    if args.workers is None:
        args.workers = [min(8, max(1, (os.cpu_count() or 2) - 2))] if cuda else [1]
    if args.tiles is None:
        big = args.backbone == "musk" and args.musk_size == "full"
        args.tiles = 8192 if cuda else (32 if big else 2048 if args.backbone == "tiny" else 512)
    if args.repeats is None:
        args.repeats = 1 if cuda else 2  # CUDA: fits bench/gpu_check.sh's 150 s with eager and SDPA


def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """All phases; returns the JSON record (config, slide, per-pass rows, summary per attention x workers)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    _defaults(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = resolve_amp(args.amp, device)
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    musk_kw = {**MUSK_SIZES[args.musk_size], **(args.musk_kw or {})}
    rec: dict[str, Any] = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if
                           device.type == "cuda" else "CPU", "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "amp": amp_name,
                           "backbone": args.backbone, "musk_kw": musk_kw if args.backbone == "musk" else None,
                           "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
                           "grid": args.grid, "rows": []}
    print(f"device {device} ({rec['device_name']}), torch threads {rec['torch_threads']} of {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.2f}' for v in rec['loadavg_start'])}; {args.backbone}"
          f"{' ' + json.dumps(musk_kw) if args.backbone == 'musk' else ''}, {amp_name}, batch {args.batch_size}")

    # the slide and its stage-01 grid; the warm-up grid = its first 2 batches of tiles
    (work / "he").mkdir(parents=True, exist_ok=True)
    if args.slide:
        he_path, sid = Path(args.slide), Path(args.slide).stem
        rec["slide"] = {"path": str(he_path)}
    else:
        he_path, sid = work / "he" / "bench.tif", "bench"
        rec["slide"] = write_bench_slide(he_path, args.tiles)
    rec["slide"]["grid_s"] = stage01_grid(sid, he_path, work)
    subset_grid(art.PATCH_GRID.path(work, sid), art.PATCH_GRID.path(work, "warmup"), 2 * args.batch_size)
    tiles = TileRegions.from_grid(he_path, art.PATCH_GRID.path(work, sid))
    n = tiles.num_tiles
    rec["slide"] |= {"tiles": n, "regions": len(tiles)}
    print(f"slide {he_path.name}: {n} tiles of {TILE} px in {len(tiles)} regions"
          + (f", {rec['slide']['side_px']} px square, {rec['slide']['mbytes']:.0f} MB (written in "
             f"{rec['slide']['write_s']:.1f} s)" if "side_px" in rec["slide"] else "")
          + f"; stage-01 grid {rec['slide']['grid_s']:.1f} s (once, outside the timings"
          + ("; the end-to-end passes compute their own)" if args.grid == "computed" else ")"))

    model = build_model(args.backbone, musk_kw, device)
    meta = stage_meta(model)
    forward = prediction_fn(model)
    tf = BatchTransform(model.input_size, model.mean, model.std, train=False, interpolation="bilinear")
    chl = wants_channels_last(model, device)
    grid_dir = art.PATCH_GRID.dir(work) if args.grid == "stage01" else work / "no_grid"
    cfgs = {w: InferConfig(pred_dir=art.PREDICTIONS.dir(work), grid_dir=grid_dir, batch_size=args.batch_size, workers=w)
            for w in args.workers}
    pool, pool_rows = tile_pool(tiles, args.batch_size, 4, device)
    run_stage = {"model": model, "meta": meta, "device": device, "amp": amp, "normalization": None}

    def add(phase: str, attention: str, workers: int | None, r: int, t: dict, count: int = n) -> None:
        rec["rows"].append({"phase": phase, "attention": attention, "workers": workers, "repeat": r,
                            "tiles": count, "seconds": t["seconds"], "patches_per_s": count / max(t["seconds"], 1e-9),
                            "peak_gib": t["peak_gib"]})

    for w in args.workers:  # also brings the slide into the page cache
        for r in range(args.repeats):
            with timed(device) as t:
                got = read_only(tiles, args.batch_size, w, device.type == "cuda")
            assert got == n, (got, n)
            add("read-only", "-", w, r, t)
    modes = (["eager", "sdpa"] if args.attention == "both" else [args.attention]) if args.backbone == "musk" else []
    if modes and not set_attention(model, modes[0]):
        modes = []
    rec["check_max_abs_diff"], rec["attention_used"] = {}, []
    for mode in modes or ["-"]:
        if mode != "-":
            set_attention(model, mode)
        rec["attention_used"].append(getattr(model.visual, "attention", "-"))
        model_only(forward, pool, min(n, 2 * args.batch_size), tf, device, amp, chl)  # warm-up
        infer_slide("warmup", he_path, cfg=replace(cfgs[args.workers[0]], grid_dir=art.PATCH_GRID.dir(work)),
                    **run_stage)
        for r in range(args.repeats):
            with timed(device) as t:
                ref = model_only(forward, pool, n, tf, device, amp, chl)
            add("model-only", mode, None, r, t)
            for w in args.workers:
                with timed(device) as t:
                    res = infer_slide(sid, he_path, cfg=cfgs[w], **run_stage)
                add("end-to-end", mode, w, r, t, res["patches"])  # a computed grid may differ from stage 01's
        rec["check_max_abs_diff"][mode] = _check(art.PREDICTIONS.path(work, sid), ref[: len(pool_rows)],
                                               tiles.coords[pool_rows])
    rec["loadavg_end"] = os.getloadavg()
    rec["summary"] = summarise(rec["rows"])
    return rec


def _check(pred_file: Path, ref: np.ndarray, coords: np.ndarray) -> float:
    """Max |end-to-end - model-only| prediction on the pooled tiles (same model, transform and pixels), matched by
    level-0 coordinates (a computed grid may order or select tiles differently); NaN when none is shared."""
    import h5py

    with h5py.File(pred_file, "r") as f:
        pred, where = f["codex_prediction"][:], {tuple(c): i for i, c in enumerate(f["coords"][:].tolist())}
    pairs = [(where[tuple(c)], j) for j, c in enumerate(coords.tolist()) if tuple(c) in where]
    if not pairs:
        return float("nan")
    a, b = (np.array(v) for v in zip(*pairs))
    return float(np.abs(pred[a] - ref[b]).max())


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (attention, workers): model-only, read-only, end-to-end patches/s, ratio and serial bound."""

    def med(phase: str, **match: Any) -> tuple[float, float | None]:
        sel = [r for r in rows if r["phase"] == phase and all(r[k] == v for k, v in match.items())]
        peaks = [r["peak_gib"] for r in sel if r["peak_gib"] is not None]
        return statistics.median(r["patches_per_s"] for r in sel), (max(peaks) if peaks else None)

    out = []
    for e2e in rows:
        if e2e["phase"] != "end-to-end" or e2e["repeat"]:
            continue
        att, w = e2e["attention"], e2e["workers"]
        model, model_peak = med("model-only", attention=att)
        read, _ = med("read-only", workers=w)
        end, end_peak = med("end-to-end", attention=att, workers=w)
        out.append({"attention": att, "workers": w, "model_only": model, "read_only": read, "end_to_end": end,
                    "ratio": end / model, "serial_bound": read / (read + model), "model_peak_gib": model_peak,
                    "end_to_end_peak_gib": end_peak})
    return out


def print_table(rec: dict[str, Any]) -> None:
    """The summary table, the correctness check and one ``KEY:`` line per row (the last = the main result)."""
    cuda = rec["device"].startswith("cuda")
    head = ["attention", "workers", "model-only p/s", "read-only p/s", "end-to-end p/s", "e2e / model",
            "serial bound"] + (["peak GiB model / e2e"] if cuda else [])
    lines = [head]
    for s in rec["summary"]:
        row = [s["attention"], str(s["workers"]), f"{s['model_only']:.1f}", f"{s['read_only']:.1f}",
               f"{s['end_to_end']:.1f}", f"{s['ratio']:.2f}", f"{s['serial_bound']:.2f}"]
        if cuda:
            row.append(f"{s['model_peak_gib'] or 0:.1f} / {s['end_to_end_peak_gib'] or 0:.1f}")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    print(f"\n{rec['backbone']}, {rec['amp']}, batch {rec['batch_size']}, {rec['slide']['tiles']} tiles, median of "
          f"{rec['repeats']} (load average {rec['loadavg_start'][0]:.2f} -> {rec['loadavg_end'][0]:.2f})")
    for i, r in enumerate(lines):
        print("  ".join(v.rjust(wd) for v, wd in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in rec["check_max_abs_diff"].items())
    print(f"check: end-to-end vs model-only predictions on the same tiles, max |diff| {diffs}")
    att = {s["attention"]: s for s in rec["summary"]}
    if {"eager", "sdpa"} <= set(att):
        print(f"KEY: sdpa / eager: model-only {att['sdpa']['model_only'] / att['eager']['model_only']:.2f}x, "
              f"end-to-end {att['sdpa']['end_to_end'] / att['eager']['end_to_end']:.2f}x")
    for s in rec["summary"]:
        peak = f", peak {s['end_to_end_peak_gib']:.1f} GiB" if s["end_to_end_peak_gib"] is not None else ""
        print(f"KEY: {rec['backbone']} {s['attention']} {rec['amp']} b{rec['batch_size']} w{s['workers']}: "
              f"model-only {s['model_only']:.1f}, end-to-end {s['end_to_end']:.1f} patches/s{peak}, "
              f"ratio {s['ratio']:.2f}")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--backbone", default="musk", choices=("tiny", "musk"), help="HEX backbone (random init)")
    p.add_argument("--musk-size", choices=tuple(MUSK_SIZES), default=None,
                   help="tiny = 192-d, 4 layers, 224 px (bench_hex.py's); full = MUSK-large, 384 px "
                        "(default: full on CUDA, tiny on CPU)")
    p.add_argument("--musk-kw", type=json.loads, default=None, metavar="JSON",
                   help='MUSK size overrides on top of --musk-size, e.g. \'{"depth": 2}\'')
    p.add_argument("--attention", choices=("sdpa", "eager", "both"), default=None,
                   help="MUSK attention; both = time eager and SDPA (default: both on CUDA, sdpa on CPU)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast on CUDA (auto = bf16 where supported); CPU runs fp32")
    p.add_argument("--batch-size", type=int, default=128, help="tiles per forward (the stage's default)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="DataLoader workers of the end-to-end and read-only passes, one pass per value "
                        "(default: 1 on CPU, min(8, CPUs - 2) on CUDA)")
    p.add_argument("--slide", type=Path, help="an H&E slide to use instead of the synthetic one")
    p.add_argument("--tiles", type=int, default=None,
                   help="tissue tiles of 224 px in the synthetic slide (default: CUDA 8192; CPU 2048 for tiny, "
                        "512 for MUSK at the tiny size, 32 for full-size MUSK)")
    p.add_argument("--grid", choices=("stage01", "computed"), default="stage01",
                   help="end-to-end grid: stage01 = read patches/{slide}.h5 (made once, untimed); computed = the "
                        "stage computes the tissue grid in every pass")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes of each phase (median; default 2 on CPU, 1 on CUDA)")
    p.add_argument("--threads", type=int, help="torch intra-op threads of this process (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--keep", type=Path, help="work folder to keep (slides, grids, hex_pred); default a temp dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_infer: --device cuda but torch sees no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.slide and not args.slide.is_file():
        print(f"bench_infer: --slide {args.slide} does not exist", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_infer_")))
        try:
            rec = run_bench(args, work)
        except PipelineError as e:  # e.g. --slide without tissue or unreadable
            print(f"bench_infer: {e}", file=sys.stderr)
            return 2
    print_table(rec)
    if args.json:
        from pipeline.io import write_json

        write_json(args.json, {"argv": sys.argv if argv is None else list(argv), **rec})
        print(f"numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
