"""Benchmark: CODEX marker quantification and the H&E patch store against per-patch baselines.

    python -m bench.bench_quantify                          # 8000 x 8000 px x 40 ch CODEX, 12000 px H&E (~3 min)
    python -m bench.bench_quantify --size 4000 --he-size 6000 --threads 2 --keep /tmp/bench_data

Quantification: a synthetic CODEX OME-TIFF (uint16, 40 channels, 1024 px tiles by default as palom and ASHLAR
write them (``--tile 512`` for smaller tiles), zlib, 3-level pyramid) is written
to a temporary folder, with a patch grid of 224 px at 0.5 µm/px mapped onto it through a rotation + scale
affine (CODEX 0.377 µm/px). Timed, on the same machine in the same run:
  (a) baseline: one zarr read of the 40-channel bounding box per patch, then the masked mean (on a sample of
      patches; patches/s extrapolates);
  (b) shipped: ``preprocess.quantify.quantify_patches`` over all patches;
  (c) the decode floor: level 0 decoded once, without any arithmetic, (c1) through zarr in one thread and
      (c2) with the shipped tile reader and the same number of threads as (b).
  (d) the shipped code through a smooth displacement field (``CodexToHE``, up to ~20 px): the non-rigid map's cost.
Patch store: a synthetic Aperio-style tiled-JPEG H&E (0.5 µm/px, 3 levels) is gridded by ``preprocess.patch``;
timed: the shipped store (``he_patches/{slide}.h5``) vs one ``read_region`` + PNG save per patch (sample); then
every ``--compression`` (none, gzip = the default, lzf, jpeg): write time, file size (and per patch, and
extrapolated to a 40x slide's 20x patch count ``--slide-patches``), and random-access read speed through
``PatchStoreReader`` (a fresh file handle, ``--read-patches`` patches in random order, as training reads them).

The synthetic slides are written with ``sample_data.writers`` (the writers of the sample cohort and the tests).

The baseline's cost is set by how many tile pixels it decodes per patch pixel (a 224 px patch at 0.5 µm/px spans
~300 CODEX px: ~1.7 tiles of 1024 px or ~2.6 tiles of 512 px per channel), the shipped code's by decoding every
tile once, so the speed-up depends on the tile size: the README reports both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import artifacts as art

# ----------------------------------------------------------------------------------------------------------------
# synthetic data (the file writers are those of sample_data.writers)


def write_synthetic_codex(path: str | os.PathLike, size: int, channels: int = 40, tile: int = 512,
                          levels: int = 3, seed: int = 0, mpp: float = 0.377) -> None:
    """A large synthetic CODEX OME-TIFF written from a pool of pre-compressed zlib tiles (fast to create).

    Each channel draws its tiles from 8 random smooth-plus-Poisson-noise tiles (zlib ratio ~0.65), so decoding
    costs what real tiles of that size cost while writing gigabytes takes seconds.
    """
    import imagecodecs

    from sample_data.writers import write_ome_tiles

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile] / tile
    pools = []
    for c in range(channels):
        pool = []
        for k in range(8):
            f = 800 + 600 * np.sin(2 * np.pi * (xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4)) + k)
            t = (f * rng.uniform(0.2, 2.0) + rng.poisson(20 + c, (tile, tile))).clip(0, 65535)
            pool.append(imagecodecs.zlib_encode(t.astype("<u2").tobytes(), level=6))
        pools.append(pool)
    sides = [-(-size // 2**lv) for lv in range(levels)]

    def tiles(lev: int):
        nt = -(-sides[lev] // tile)
        for c in range(channels):
            for ty in range(nt):
                for tx in range(nt):
                    yield pools[c][(ty * 7 + tx * 3 + c) % 8]

    write_ome_tiles(path, tiles, [(n, n) for n in sides], [f"marker_{i}" for i in range(channels)], mpp,
                    tile=tile, compression="zlib", compression_level=None)


def synthetic_he(size: int, seed: int = 0) -> np.ndarray:
    """A square RGB H&E-like image (size, size, 3) uint8: a textured pink/purple ellipse on white glass."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 60, (1024, 1024), dtype=np.uint8)
    yy, xx = np.ogrid[0:size, 0:size]
    inside = ((xx - size / 2) / (0.42 * size)) ** 2 + ((yy - size / 2) / (0.36 * size)) ** 2 < 1
    img = np.full((size, size, 3), 242, np.uint8)
    reps = (size + 1023) // 1024
    t = np.tile(tex, (reps, reps))[:size, :size]
    for ch, base in enumerate((205, 120, 185)):
        band = img[..., ch]
        band[inside] = (base - t[inside]).astype(np.uint8)
    return img


# ----------------------------------------------------------------------------------------------------------------
# baselines


def baseline_means(codex, channels: list[int], coords: np.ndarray, size: int, affine: np.ndarray,
                   which: np.ndarray) -> np.ndarray:
    """Per-patch baseline: one zarr read of the patch's CODEX bounding box (all channels), then a masked mean."""
    arr = codex.level(0)
    _, h, w = arr.shape
    inv = np.linalg.inv(affine)
    out = np.full((len(which), len(channels)), np.nan)
    c0, c1 = min(channels), max(channels) + 1
    for k, i in enumerate(which):
        x, y = coords[i]
        corners = np.array([[x - 0.5, y - 0.5, 1], [x + size - 0.5, y - 0.5, 1], [x - 0.5, y + size - 0.5, 1],
                            [x + size - 0.5, y + size - 0.5, 1]]) @ inv.T
        u0, v0 = np.maximum(np.floor(corners[:, :2].min(0)).astype(int), 0)
        u1, v1 = np.minimum(np.ceil(corners[:, :2].max(0)).astype(int) + 1, [w, h])
        block = np.asarray(arr[c0:c1, v0:v1, u0:u1])[np.asarray(channels) - c0]
        uu, vv = np.meshgrid(np.arange(u0, u1), np.arange(v0, v1))
        px = affine[0, 0] * uu + affine[0, 1] * vv + affine[0, 2]
        py = affine[1, 0] * uu + affine[1, 1] * vv + affine[1, 2]
        m = (px >= x - 0.5) & (px < x + size - 0.5) & (py >= y - 0.5) & (py < y + size - 0.5)
        if m.any():
            out[k] = block[:, m].mean(axis=1)
    return out


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:9.1f} patches/s ({n} patches in {seconds:.2f} s)"


def bench_quantify(tmp: Path, size: int, threads: int, baseline_patches: int, region_px: int,
                   tile: int = 1024) -> dict:
    from preprocess.quantify.accumulate import quantify_patches
    from preprocess.quantify.geometry import codex_coverage
    from preprocess.quantify.readers import TiledRegionReader
    from preprocess.slide_io import CodexImage

    path = tmp / f"codex_{size}_t{tile}.ome.tif"
    t0 = time.perf_counter()
    if not path.exists():  # reused from an earlier run with --keep
        write_synthetic_codex(path, size, tile=tile)
    print(f"[quantify] {size}x{size}x40 CODEX, {tile} px tiles ({path.stat().st_size / 1e9:.2f} GB on disk, "
          f"{size * size * 80 / 1e9:.2f} GB decoded) ready in {time.perf_counter() - t0:.1f} s")
    # H&E grid at 0.5 µm/px over the CODEX footprint, CODEX -> H&E: scale 0.377/0.5, 2° rotation, offset
    s, th = 0.377 / 0.5, np.deg2rad(2.0)
    affine = np.array([[s * np.cos(th), -s * np.sin(th), 150.0], [s * np.sin(th), s * np.cos(th), 90.0], [0, 0, 1]])
    ps0 = 224
    he_extent = int(size * s) + 300
    xs = np.arange(0, he_extent, ps0)
    grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2).astype(np.int64)
    with CodexImage(path) as codex:
        cov = codex_coverage(grid, ps0, affine, codex.dimensions)
        coords = grid[cov > 0]
        channels = list(range(40))
        n = len(coords)
        print(f"[quantify] {n} patches of {ps0} px (H&E level 0) touch the CODEX; {int((cov >= 0.95).sum())} "
              "with coverage >= 0.95")

        # (c1) decode floor through zarr, one thread
        arr = codex.level(0)
        t0 = time.perf_counter()
        for y in range(0, size, 1024):
            for x in range(0, size, 1024):
                np.asarray(arr[:, y : y + 1024, x : x + 1024])
        floor_zarr = time.perf_counter() - t0
        # (c2) decode floor with the shipped tile reader, same threads as shipped
        from concurrent.futures import ThreadPoolExecutor

        reader = TiledRegionReader(path, channels, codex.shape)
        blocks = [(x, y) for y in range(0, size, 1024) for x in range(0, size, 1024)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(lambda b: reader.read(b[0], b[1], min(size, b[0] + 1024), min(size, b[1] + 1024)).shape,
                          blocks))
        floor_fast = time.perf_counter() - t0
        reader.close()

        # (b) shipped
        t0 = time.perf_counter()
        res = quantify_patches(codex, channels, coords, ps0, affine, region_px=region_px, threads=threads)
        t_ship = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantify_patches(codex, channels, coords, ps0, affine, region_px=region_px, threads=1)
        t_ship1 = time.perf_counter() - t0

        # (d) shipped through a displacement field (smooth, up to ~20 H&E px)
        from preprocess.quantify.geometry import CodexToHE
        from preprocess.registration.field import DisplacementField, node_shape

        gy, gx = node_shape((he_extent, he_extent), 256.0)
        yy, xx = np.mgrid[0:gy, 0:gx] / max(gy, gx)
        field = DisplacementField(np.stack([14 * np.sin(3 * xx + 1) * np.cos(2 * yy), 9 * np.cos(2.5 * yy + xx)]),
                                  256.0)
        t0 = time.perf_counter()
        quantify_patches(codex, channels, coords, ps0, CodexToHE(affine, field), region_px=region_px,
                         threads=threads)
        t_field = time.perf_counter() - t0

        # (a) baseline on a sample
        rng = np.random.default_rng(0)
        which = np.sort(rng.choice(n, size=min(baseline_patches, n), replace=False))
        t0 = time.perf_counter()
        base = baseline_means(codex, channels, coords, ps0, affine, which)
        t_base = time.perf_counter() - t0
    err = float(np.nanmax(np.abs(base - res.means[which])))
    r_base, r_ship = len(which) / t_base, n / t_ship
    print(f"[quantify] (a) baseline, one zarr read per patch: {_rate(len(which), t_base)}")
    print(f"[quantify] (b) shipped, {threads} thread(s):          {_rate(n, t_ship)}")
    print(f"[quantify]     shipped, 1 thread:                {_rate(n, t_ship1)}")
    print(f"[quantify] speed-up shipped / baseline: {r_ship / r_base:.1f}x ({threads} threads), "
          f"{(n / t_ship1) / r_base:.1f}x (1 thread)")
    print(f"[quantify] (c) decode floor, whole level 0 once: zarr 1 thread {floor_zarr:.2f} s; tile reader "
          f"{threads} thread(s) {floor_fast:.2f} s")
    print(f"[quantify] shipped time / decode floor: {t_ship / floor_fast:.2f}x (same threads), "
          f"{t_ship / floor_zarr:.2f}x (vs zarr 1 thread)")
    print(f"[quantify] max |shipped - baseline| over the sample: {err:.2e}")
    print(f"[quantify] (d) shipped through a displacement field, {threads} thread(s): {_rate(n, t_field)}; "
          f"{t_field / t_ship:.2f}x the affine-only time")
    return {"baseline_pps": r_base, "shipped_pps": r_ship, "ratio": r_ship / r_base, "floor_s": floor_fast,
            "floor_zarr_s": floor_zarr, "shipped_s": t_ship, "max_abs_diff": err, "field_s": t_field}


def bench_store_compression(out: Path, path: Path, n: int, read_patches: int, slide_patches: int) -> dict:
    """Write the store once per ``--compression``; size and random-access read speed of each."""
    from preprocess.patch_store import StoreConfig, store_slide
    from preprocess.patch_store_format import COMPRESSIONS, PatchStoreReader

    rows = {}
    rng = np.random.default_rng(1)
    order = rng.permutation(n)[: min(read_patches, n)]
    for comp in COMPRESSIONS:
        o = out.parent / f"out_{comp}"
        shutil.rmtree(o, ignore_errors=True)
        t0 = time.perf_counter()
        store_slide("bench", path, StoreConfig(out=o, patches_dir=art.PATCH_GRID.dir(out), compression=comp))
        t_write = time.perf_counter() - t0
        f = art.PATCH_STORE.path(o, "bench")
        size = f.stat().st_size
        t0 = time.perf_counter()
        with PatchStoreReader(f) as r:
            for i in order:
                r[int(i)]
        t_read = time.perf_counter() - t0
        rows[comp] = {"bytes": size, "write_s": t_write, "read_pps": len(order) / t_read}
    raw = rows["none"]
    print(f"[store] compression: size, per patch, for {slide_patches} patches (a 40x slide's 20x grid), write, "
          f"random reads (fresh handle, {len(order)} patches)")
    for comp, r in rows.items():
        per = r["bytes"] / n
        print(f"[store]   {comp:5s} {r['bytes'] / 1e6:8.1f} MB  {per / 1e3:6.1f} KB/patch  "
              f"{per * slide_patches / 1e9:5.2f} GB/slide  ({raw['bytes'] / r['bytes']:4.1f}x smaller)  "
              f"write {_rate(n, r['write_s'])}  read {r['read_pps']:7.0f} patches/s "
              f"({r['read_pps'] / raw['read_pps']:.2f}x uncompressed)")
    return rows


def bench_patch_store(tmp: Path, he_size: int, baseline_patches: int, read_patches: int = 2000,
                      slide_patches: int = 40000) -> dict:
    from PIL import Image

    from preprocess.patch import PatchConfig, patch_slide, read_grid
    from preprocess.patch_store import StoreConfig, resize_patch, store_slide
    from preprocess.slide_io import HESlide
    from sample_data.writers import write_aperio_tiff

    path = tmp / "he" / f"bench_{he_size}.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not path.exists():
        write_aperio_tiff(path, synthetic_he(he_size), mpp=0.5, tile=256, downsamples=(4, 16))
    print(f"[store] {he_size}x{he_size} Aperio JPEG H&E ({path.stat().st_size / 1e6:.0f} MB) ready in "
          f"{time.perf_counter() - t0:.1f} s")
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp / "png", ignore_errors=True)
    patch_slide("bench", path, PatchConfig(out=out))
    coords, attrs = read_grid(art.PATCH_GRID.path(out, "bench"))
    n = len(coords)
    t0 = time.perf_counter()
    store_slide("bench", path, StoreConfig(out=out, patches_dir=art.PATCH_GRID.dir(out)))
    t_ship = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    which = np.sort(rng.choice(n, size=min(baseline_patches, n), replace=False))
    png_dir = tmp / "png"
    png_dir.mkdir()
    level, read = int(attrs["patch_level"]), int(attrs["read_size_at_level"])
    t0 = time.perf_counter()
    with HESlide(path) as slide:  # as the original HEX extract_he_patch.py: read_region, PIL PNG save
        for i in which:
            x, y = coords[i]
            p = resize_patch(slide.read_region(x, y, level, (read, read)), int(attrs["patch_size"]))
            Image.fromarray(p).save(png_dir / f"bench_{i}.png")
    t_base = time.perf_counter() - t0
    r_base, r_ship = len(which) / t_base, n / t_ship
    print(f"[store] baseline, read_region + PIL PNG save per patch: {_rate(len(which), t_base)}")
    print(f"[store] shipped, region reads -> HDF5 (gzip):        {_rate(n, t_ship)}")
    print(f"[store] speed-up: {r_ship / r_base:.1f}x")
    comp = bench_store_compression(out, path, n, read_patches, slide_patches)
    return {"baseline_pps": r_base, "shipped_pps": r_ship, "ratio": r_ship / r_base, "compression": comp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8000, help="CODEX side in px (40 channels; default 8000)")
    p.add_argument("--he-size", type=int, default=12000, help="H&E side in px at 0.5 µm/px (default 12000)")
    p.add_argument("--threads", type=int, default=2, help="threads of the shipped quantification (default 2)")
    p.add_argument("--tile", type=int, default=1024,
                   help="tile side of the synthetic CODEX, px (default 1024, as palom and ASHLAR write; try 512)")
    p.add_argument("--region-px", type=int, default=1024, help="CODEX region side of the shipped code (px)")
    p.add_argument("--baseline-patches", type=int, default=40, help="patches timed for the quantify baseline")
    p.add_argument("--store-baseline-patches", type=int, default=300, help="patches timed for the store baseline")
    p.add_argument("--read-patches", type=int, default=2000, help="patches read back per store encoding")
    p.add_argument("--slide-patches", type=int, default=40000,
                   help="patches of a large 40x slide's 20x grid, for the per-slide store size (default 40000)")
    p.add_argument("--skip", choices=["quantify", "store"], action="append", default=[], help="skip a part")
    p.add_argument("--keep", type=Path,
                   help="write the data here and keep it; a later run with the same --keep reuses it "
                        "(default: a temporary folder, removed)")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the stages would garble the printed results
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        tmp = args.keep
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_quantify_"))
    print(f"[bench] data in {tmp}; {os.cpu_count()} CPU cores visible")
    try:
        if "quantify" not in args.skip:
            bench_quantify(tmp, args.size, args.threads, args.baseline_patches, args.region_px, args.tile)
        if "store" not in args.skip:
            bench_patch_store(tmp, args.he_size, args.store_baseline_patches, args.read_patches, args.slide_patches)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
