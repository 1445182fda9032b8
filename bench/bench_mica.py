"""Benchmark: one MICA training step (forward, NLL survival loss, backward, Adam step) against the bag size.

    python -m bench.bench_mica                                  # coattn, 10k/25k/50k patches x 1024, CPU
    python -m bench.bench_mica --device cuda --sizes 10000 50000 100000
    python -m bench.bench_mica --mode path --repeats 5 --threads 2

Each bag size runs in its own process (a fresh interpreter), so the CPU peak-memory figure is that step's own:
peak RSS (``resource.getrusage`` ``ru_maxrss``) minus the RSS just before the first step, with the model, the
optimizer state and the random bag ((1,N,Dp) float32 patches + (1,40,Dc) CODEX tokens) already allocated.
On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocated memory before the step. Time is the median
of ``--repeats`` steps after ``--warmup`` steps, with the process's own CPU time beside it (``user_s``, ``sys_s``:
on a shared machine wall time also counts waiting for a core); ``total_MiB`` is the whole process's peak RSS
(CUDA: peak allocation). The table gives each size's time, CPU time and memory over the smallest size's: for a
model linear in N the ratios follow N (10k -> 50k: about 5); an (N,N) attention over patches would give ~25.

On CPU, ``sys_s`` grows faster than N: glibc serves the >32 MiB activations of large bags with fresh ``mmap``s, and
the kernel zero-fills their pages on every step. ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (glibc
keeps and reuses its heap) removes that cost at the price of a larger resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mica.model import MICA, MODES
from mica.survival import nll_survival_loss

MiB = 2 ** 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(n: int, mode: str, path_dim: int, codex_dim: int, device: str, repeats: int, warmup: int,
            seed: int = 0) -> dict:
    """Time and peak memory of training steps on one (1,n,path_dim) bag; returns a dict (seconds, bytes)."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = MICA(mode=mode, task="survival", path_dim=path_dim, codex_dim=codex_dim).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
    path = torch.randn(1, n, path_dim, device=dev)
    codex = torch.randn(1, 40, codex_dim, device=dev)
    y, cens = torch.tensor([1], device=dev), torch.tensor([0.0], device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nll_survival_loss(model(path, codex), y, cens).backward()
        opt.step()

    for p in model.parameters():  # allocate Adam's state and the .grad buffers before measuring
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes()
    times, user, sys_ = [], [], []
    for i in range(warmup + repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        _sync(dev)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
            user.append(r1.ru_utime - r0.ru_utime)
            sys_.append(r1.ru_stime - r0.ru_stime)
    peak_total = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()
    peak = peak_total - base
    return {"n": n, "mode": mode, "device": str(dev), "time_s": statistics.median(times), "times_s": times,
            "cpu_user_s": statistics.median(user), "cpu_sys_s": statistics.median(sys_),
            "peak_bytes": int(peak), "peak_total_bytes": int(peak_total),
            "input_bytes": path.numel() * 4 + codex.numel() * 4,
            "threads": torch.get_num_threads()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 25_000, 50_000], help="bag sizes N (patches)")
    p.add_argument("--mode", choices=MODES, default="coattn", help="MICA mode (default coattn)")
    p.add_argument("--path-dim", type=int, default=1024, help="per-patch H&E feature size Dp (MUSK: 1024)")
    p.add_argument("--codex-dim", type=int, default=384, help="per-marker CODEX token size Dc (DINOv2-S: 384)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per size (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per size before timing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, JSON out
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        res = run_one(args.worker, args.mode, args.path_dim, args.codex_dim, device, args.repeats, args.warmup)
        print("RESULT " + json.dumps(res))
        return 0
    results = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "bench.bench_mica", "--worker", str(n), "--mode", args.mode,
               "--path-dim", str(args.path_dim), "--codex-dim", str(args.codex_dim), "--device", device,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"N={n}: worker failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
    t0, m0, n0 = results[0]["time_s"], max(results[0]["peak_bytes"], 1), results[0]["n"]
    c0 = max(results[0]["cpu_user_s"] + results[0]["cpu_sys_s"], 1e-9)
    mem_name = "peak_alloc_MiB" if device.startswith("cuda") else "peak_rss_delta_MiB"
    print(f"MICA {args.mode} training step (forward + NLL + backward + Adam), Dp={args.path_dim}, "
          f"Dc={args.codex_dim}, device={device}, threads={results[0]['threads']}, median of {args.repeats}")
    print(f"{'N':>8} {'input_MiB':>10} {'time_s':>8} {'user_s':>7} {'sys_s':>6} {mem_name:>19} {'total_MiB':>10} "
          f"{'N/N0':>6} "
          f"{'time/t0':>8} {'cpu/c0':>7} {'mem/m0':>7}")
    for r in results:
        print(f"{r['n']:>8} {r['input_bytes'] / MiB:>10.1f} {r['time_s']:>8.3f} {r['cpu_user_s']:>7.2f} "
              f"{r['cpu_sys_s']:>6.2f} {r['peak_bytes'] / MiB:>19.1f} "
              f"{r['peak_total_bytes'] / MiB:>10.1f} {r['n'] / n0:>6.1f} {r['time_s'] / t0:>8.2f} "
              f"{(r['cpu_user_s'] + r['cpu_sys_s']) / c0:>7.2f} {r['peak_bytes'] / m0:>7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
