"""Benchmark: stage 06 with ``--dense`` (the cell-scale virtual CODEX, :mod:`hex.infer.dense_maps`) on synthetic slides.

    python -m bench.bench_dense_infer --quick          # CPU, ~100-tile slide (and 4x for memory), ~2-3 min
    python -m bench.bench_dense_infer                  # CPU, ~400-tile slide
    python -m bench.bench_dense_infer --device cuda --tiles 4000 --json dense.json

Three measures, printed as one table (issue 19, deliverable 5 and its acceptance):

1. Throughput, one process, same slide, same tiles (tiles every ``--dense-stride`` = 56 px, the dense pass's grid):
   patch-level = :func:`hex.infer.predictions.infer_slide` with ``--stride 56`` (``model.forward``, the h5 write);
   dense = :func:`hex.infer.dense_maps.dense_slide` (``model.forward_dense``, blending, OME-TIFF and preview). Tiles/s
   of each over the whole call, and of the dense model loop alone (read + forward + blend); ratio dense / patch.
   The model: a random-init tiny HEX with the dense head (G = 16), 224 px input.
2. Peak memory: the whole stage (``python -m hex.infer_wsi ... --dense``, workers 0 so everything is one process)
   in a fresh subprocess per slide, ``ru_maxrss`` at exit, for slide A and for slide B with 4x its area;
   ratio B / A (acceptance < 1.5); also B's dense map as one float32 array (what a full-slide buffer would add).
3. Seams: on the blended level-0 map, the mean |step| between neighbouring pixels across tile borders (pairs that
   straddle a tile-lattice line, every stride/c = 4 cells) over the mean |step| between neighbours inside tiles,
   both directions, all markers, tissue pixels only (not at the tissue edge). Acceptance <= 1.2. Measured for the
   random-init tiny dense model (whose tiles disagree where they overlap), the same model blended with a flat (box)
   window instead of the Hann bump (to show the measure sees seams), and a stand-in whose dense output is each
   cell's darkness (tiles agree by construction: ~1.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.synthetic_slide import write_bench_slide
from hex.infer import dense_maps as dm
from hex.infer.predictions import InferConfig, infer_slide
from hex.model import HEX

GRID, TILE, NUM_MARKERS = 16, 224, 40
REPO = Path(__file__).resolve().parents[1]


class DarkCells(torch.nn.Module):
    """A stand-in dense model: every marker of cell (i, j) is the cell's darkness 1 - mean of its input pixels."""

    dense_grid = GRID

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, s, _ = x.shape
        dark = 1.0 - x.mean(dim=1)
        cells = dark.reshape(b, GRID, s // GRID, GRID, s // GRID).mean(dim=(2, 4))
        dense = cells[:, None].expand(-1, NUM_MARKERS, -1, -1).contiguous()
        return dense.mean(dim=(2, 3)), dense.mean(dim=(2, 3)), dense


def markers() -> list[str]:
    return [f"marker_{i:02d}" for i in range(NUM_MARKERS)]


def tiny_dense(device: torch.device) -> HEX:
    torch.manual_seed(0)
    return HEX("tiny", num_markers=NUM_MARKERS, input_size=TILE, unfreeze_last=0, dense_grid=GRID).to(device).eval()


def meta_of(model: torch.nn.Module, name: str) -> dict[str, Any]:
    if isinstance(model, HEX):
        return {"markers": markers(), "input_size": model.input_size, "mean": list(model.mean),
                "std": list(model.std), "interpolation": "bilinear", "checkpoint": name, "checkpoint_sha256": "none"}
    return {"markers": markers(), "input_size": TILE, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
            "checkpoint": name, "checkpoint_sha256": "none"}


# ----------------------------------------------------------------------------------------------------------------
# seams


def seam_ratio(ome: Path, step_cells: int) -> dict[str, float]:
    """Mean |step| across tile borders / inside tiles of a dense OME-TIFF's level 0 (see the module docstring)."""
    import tifffile
    from scipy.ndimage import binary_erosion

    with tifffile.TiffFile(ome) as t:
        v = t.series[0].levels[0].asarray().astype(np.float64)  # (M, H, W)
        mask = binary_erosion(t.series[1].asarray() > 0, iterations=1)
    out = {"border": 0.0, "inside": 0.0}
    sums = {"border": [0.0, 0], "inside": [0.0, 0]}
    for axis in (1, 2):  # rows (y steps), columns (x steps)
        d = np.abs(np.diff(v, axis=axis))  # pair (k-1, k) at index k-1
        both = mask[1:, :] & mask[:-1, :] if axis == 1 else mask[:, 1:] & mask[:, :-1]
        k = np.arange(1, v.shape[axis])  # index of the second pixel of each pair
        border = (k % step_cells) == 0  # a tile-lattice line between k-1 and k
        sel = border[:, None] if axis == 1 else border[None, :]
        for name, s in (("border", sel & both), ("inside", ~sel & both)):
            sums[name][0] += float(d[:, s].sum())
            sums[name][1] += int(s.sum()) * v.shape[0]
    for name in out:
        out[name] = sums[name][0] / max(sums[name][1], 1)
    out["ratio"] = out["border"] / max(out["inside"], 1e-30)
    return out


def _box_window(grid: int, floor: float = dm.WINDOW_FLOOR) -> np.ndarray:
    return np.ones((grid, grid), np.float32)


# ----------------------------------------------------------------------------------------------------------------
# peak memory of the stage, in a subprocess


CHILD = """
import resource, sys, json
from hex.infer.stage import main
rc = main(json.loads(sys.argv[1]))
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "RC", rc)
"""


def stage_peak_rss(he: Path, out: Path, checkpoint: Path, batch_size: int, device: str) -> float:
    """Peak RSS (MiB) of ``python -m hex.infer_wsi --dense`` on one slide in a fresh process (workers 0)."""
    argv = ["--he", str(he), "--out", str(out), "--checkpoint", str(checkpoint), "--dense", "--workers", "0",
            "--batch-size", str(batch_size), "--device", device, "--map-formats", "npy", "ome"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=3600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("MAXRSS_KB")]
    if r.returncode != 0 or not line or not line[0].endswith("RC 0"):
        raise RuntimeError(f"stage run failed ({r.returncode}): {r.stderr[-2000:]}")
    return int(line[0].split()[1]) / 1024.0


def save_checkpoint(model: HEX, run_dir: Path) -> Path:
    from hex.train.checkpoints import save_best

    run_dir.mkdir(parents=True, exist_ok=True)
    norm = {"markers": markers(), "percentiles": [1, 99], "values": [[0.0] * NUM_MARKERS, [1.0] * NUM_MARKERS]}
    save_best(run_dir, model.cpu(), {"markers": markers(), "normalization": norm, "model_args": model.model_args,
                                     "input_size": model.input_size, "interpolation": "bilinear",
                                     "mean": list(model.mean), "std": list(model.std), "epoch": 0,
                                     "val_mean_pearson": 0.0})
    return run_dir / "best.safetensors"


# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    tiles_a = args.tiles or (100 if args.quick else 400)
    rec: dict[str, Any] = {"device": str(device), "tiles_a": tiles_a}
    (work / "he_a").mkdir()
    (work / "he_b").mkdir()
    sa = write_bench_slide(work / "he_a" / "a.tif", tiles_a, seed=0)
    sb = write_bench_slide(work / "he_b" / "b.tif", 4 * tiles_a, seed=0)
    rec["side_a_px"], rec["side_b_px"] = sa["side_px"], sb["side_px"]
    model = tiny_dense(device)
    stride = dm.dense_stride(TILE, GRID, None)  # the stage's default (a quarter of the tile)
    he = work / "he_a" / "a.tif"
    # 1. throughput: same tiles, one process
    pcfg = InferConfig(pred_dir=work / "pred", grid_dir=work / "none", patch_size=TILE, stride=stride,
                       batch_size=args.batch_size, workers=args.workers)
    (work / "pred").mkdir()
    dcfg = dm.DenseConfig(out_dir=work / "vc_tiny", patch=pcfg, stride=stride)  # the patch pass's tile settings
    meta = meta_of(model, "random-init tiny dense HEX")
    (work / "he_w").mkdir()
    write_bench_slide(work / "he_w" / "w.tif", 4, seed=1)  # warm-up (imports, allocator), untimed
    infer_slide("w", work / "he_w" / "w.tif", model, meta, pcfg, device, None, None)
    dm.dense_slide("w", work / "he_w" / "w.tif", model, meta, dcfg, device, None)
    t0 = time.perf_counter()
    pres = infer_slide("a", he, model, meta, pcfg, device, None, None)
    t_patch = time.perf_counter() - t0
    t0 = time.perf_counter()
    dres = dm.dense_slide("a", he, model, meta, dcfg, device, None)
    t_dense = time.perf_counter() - t0
    n = pres["patches"]
    rec |= {"tiles": n, "patch_tiles_per_s": n / t_patch, "dense_tiles_per_s": dres["n_tiles"] / t_dense,
            "dense_loop_tiles_per_s": dres["tiles_per_s"], "dense_tiles": dres["n_tiles"],
            "map_shape": dres["shape"], "max_band_rows": dres["max_band_rows"]}
    rec["throughput_ratio"] = rec["dense_tiles_per_s"] / rec["patch_tiles_per_s"]
    # 3. seams (before the subprocesses: same slide)
    step = dres["stride_level0"] // dres["cell_px_level0"]
    rec["seam_tiny"] = seam_ratio(work / "vc_tiny" / "a_dense.ome.tif", step)
    orig = dm.blend_window
    try:
        dm.blend_window = _box_window  # type: ignore[assignment]
        dm.dense_slide("a", he, model, meta, dm.DenseConfig(**{**dcfg.__dict__, "out_dir": work / "vc_box"}),
                       device, None)
    finally:
        dm.blend_window = orig  # type: ignore[assignment]
    rec["seam_tiny_box"] = seam_ratio(work / "vc_box" / "a_dense.ome.tif", step)
    dm.dense_slide("a", he, model, meta, dm.DenseConfig(**{**dcfg.__dict__, "out_dir": work / "vc_112",
                                                              "stride": TILE // 2}), device, None)
    rec["seam_tiny_112"] = seam_ratio(work / "vc_112" / "a_dense.ome.tif", TILE // 2 // (TILE // GRID))
    dark = DarkCells()
    dm.dense_slide("a", he, dark, meta_of(dark, "darkness stand-in"),
                   dm.DenseConfig(**{**dcfg.__dict__, "out_dir": work / "vc_dark"}), device, None)
    rec["seam_standin"] = seam_ratio(work / "vc_dark" / "a_dense.ome.tif", step)
    # 2. peak RSS of the stage, slide A vs B (4x area), each in a fresh process
    ck = save_checkpoint(model, work / "ck")
    dev = "cuda" if device.type == "cuda" else "cpu"
    rec["rss_a_mib"] = stage_peak_rss(work / "he_a", work / "out_a", ck, args.batch_size, dev)
    rec["rss_b_mib"] = stage_peak_rss(work / "he_b", work / "out_b", ck, args.batch_size, dev)
    rec["rss_ratio"] = rec["rss_b_mib"] / rec["rss_a_mib"]
    c = TILE // GRID
    rec["full_map_b_mib"] = math.ceil(sb["side_px"] / c) ** 2 * NUM_MARKERS * 4 / 2**20
    return rec


def print_table(r: dict[str, Any]) -> None:
    ok = lambda b: "ok" if b else "FAIL"  # noqa: E731
    print(f"\ndense inference bench ({r['device']}; tiny HEX + dense head G={GRID}, random init; tiles of {TILE} px "
          f"every {dm.dense_stride(TILE, GRID, None)} px)")
    print(f"slide A {r['side_a_px']} px a side ({r['tiles']} tiles on the dense grid), map {r['map_shape']}; "
          f"slide B {r['side_b_px']} px (4x area)")
    rows = [
        ("throughput patch-level (forward, h5)", f"{r['patch_tiles_per_s']:.1f} tiles/s", ""),
        ("throughput dense (forward_dense, blend, OME, preview)", f"{r['dense_tiles_per_s']:.1f} tiles/s", ""),
        ("throughput dense model loop only", f"{r['dense_loop_tiles_per_s']:.1f} tiles/s", ""),
        ("ratio dense / patch-level", f"{r['throughput_ratio']:.2f}", ""),
        ("stage 06 --dense peak RSS, slide A", f"{r['rss_a_mib']:.0f} MiB", ""),
        ("stage 06 --dense peak RSS, slide B (4x area)", f"{r['rss_b_mib']:.0f} MiB",
         f"(B's map as one float32 array: {r['full_map_b_mib']:.0f} MiB)"),
        ("peak RSS ratio B / A", f"{r['rss_ratio']:.3f}", f"< 1.5 {ok(r['rss_ratio'] < 1.5)}"),
        ("band rows held (map rows, of the map's)", f"{r['max_band_rows']} of {r['map_shape'][0]}", ""),
    ]
    for key, label in (("seam_tiny", "tiny dense HEX, Hann window"), ("seam_tiny_box", "tiny dense HEX, box window"),
                       ("seam_tiny_112", f"tiny dense HEX, Hann, --dense-stride {TILE // 2}"),
                       ("seam_standin", "darkness stand-in, Hann window")):
        s = r[key]
        verdict = f"<= 1.2 {ok(s['ratio'] <= 1.2)}" if key != "seam_tiny_box" else "(reference: no window)"
        rows.append((f"seam {label}: border / inside step",
                     f"{s['border']:.3g} / {s['inside']:.3g} = {s['ratio']:.3f}", verdict))
    w = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"  {a:<{w}}  {b:<28} {c}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_dense_infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small slides (~100 tiles of 224 px; B 4x), ~2-3 min on CPU")
    p.add_argument("--tiles", type=int, help="tissue tiles of 224 px in slide A (default 400, --quick 100)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the throughput passes")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--keep", type=Path, help="work folder to keep (slides, maps); default a temp dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_dense_infer: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        rec = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_dense_") as tmp:
            rec = run(args, Path(tmp))
    print_table(rec)
    if args.json:
        from pipeline.io import write_json

        write_json(args.json, rec)
        print(f"numbers: {args.json}")
    ok = rec["rss_ratio"] < 1.5 and rec["seam_tiny"]["ratio"] <= 1.2 and rec["seam_standin"]["ratio"] <= 1.2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
