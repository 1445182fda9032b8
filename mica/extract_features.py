"""Stage 07: MICA feature bags — H&E patch features and virtual-CODEX channel features.

Commands (run from the repository root)::

    # H&E bags with MUSK (weights file or hf_hub:xiangjx/musk) + CODEX tokens with DINOv2, one process
    python -m mica.extract_features --cohort COHORT --out OUT --encoder musk --weights /models/musk/model.safetensors \\
        --codex-encoder dinov2_vits14_reg --codex-weights /models/dinov2_vits14_reg4_pretrain.pth
    # the backbone of a trained HEX run as H&E encoder, interpretable CODEX statistics (the CPU demo)
    python -m mica.extract_features --cohort COHORT --out OUT --encoder hex:hex_fold0 --codex-encoder stats
    # only one modality; 4 GPUs (slides sharded over ranks); or a job array: --shard 3/10
    python -m mica.extract_features --cohort COHORT --out OUT --what he --encoder musk --weights ...
    torchrun --standalone --nproc-per-node=4 -m mica.extract_features --cohort COHORT --out OUT --encoder musk ...

``--what he|codex|both`` (default both) picks the modalities.

H&E (``--encoder``): any ``hex.backbones`` name (``musk``, ``dinov2_vits14_reg``, ``tiny``, ``timm:<name>``) with
``--weights`` (a local file or ``hf_hub:<repo>``; without it the backbone is randomly initialised, with a warning),
or ``hex:RUN``, the backbone (``model.visual``) of the trained HEX run ``OUT/runs/RUN/best.safetensors``
(``--weights`` then names another checkpoint of it). The tiles of the stage-01 grid ``OUT/patches/{slide}.h5``
(224 px at 20x) are read region by region (:mod:`hex.infer.tiles`, the stage-06 reader), resized to the encoder's
input size and normalised with its mean/std (:class:`hex.data.transforms.BatchTransform`, evaluation mode), then
embedded by the one prediction loop (:func:`hex.evaluate.predict.run_loop`). The slides are the cohort's
(:func:`pipeline.cohort.resolve_slides`: ``COHORT/pairs.csv`` when present, else ``COHORT/he/``, or ``--he``; ids =
file names as written, so a link names its outputs after itself, as stage 01 names its grid). Outputs (atomic)::

    OUT/features/{encdir}/h5_files/{slide}.h5   features (N, D) float32, coords (N, 2) int64 level-0 top-left;
                                                attrs encoder, patch_size_level0, patch_size, mpp (µm/px of the
                                                tiles), level0_mpp, embed_dim, input_size, schema_version, slide_id
    OUT/features/{encdir}/pt_files/{slide}.pt   the (N, D) float32 tensor only (CLAM/MCAT convention)
    OUT/features/{encdir}/done/{slide}.json     what the bag was made with (:mod:`mica.features.done_records`)
    OUT/features/{encdir}/config.json           resolved settings (written after the done-check passed)

Done means "done with these inputs and these settings" (:mod:`mica.features.done_records`): a slide whose H&E file
or grid changed is redone; a rerun with other settings (encoder weights, resize mode, ``--region-px``, ``--mpp``,
the CODEX thresholds or weights) stops before any work with "... done with other settings: <diff>; pass --overwrite".

CODEX (``--codex-encoder``): ``stats`` (per-channel spatial descriptors, D' = 10, see
:mod:`mica.features.codex_encoders`) or an image backbone (``dinov2_vits14_reg`` as the original MICA, with
``--codex-weights``) applied to every channel of ``OUT/virtual_codex/{slide}.npy`` (H', W', 40), batched across
slides. The slides are the cohort's (``--cohort``/``--he``; without them, those with a map): a slide without a map
fails, naming the missing file and stage 06 that makes it. Outputs::

    OUT/codex_features/{encdir}/{slide}.h5      per-slide part: features (40, D') float32 (the resumable unit)
    OUT/codex_features/{encdir}/done/{slide}.json
    OUT/codex_features/{encdir}.h5              one (40, D') dataset per slide; attrs encoder, markers,
                                                schema_version (+ feature_names for stats); rebuilt from the parts
                                                done with these settings (:mod:`mica.features.codex_features`)
    OUT/codex_features/{encdir}/config.json

``{encdir}`` is the encoder name with ``:`` and ``/`` replaced by ``_`` (``hex:demo`` -> ``hex_demo``). The run ends
with one line counting slides (done / skipped / failed with their reasons; with both modalities a slide counts once,
e.g. ``features: 2 slides done, 0 skipped (already done), 0 failed (H&E bags 2 done, 0 skipped, 0 failed; CODEX 2
done, 0 skipped, 0 failed)``). Exit code 0 when every slide is done or skipped,
1 when any failed, 2 on bad input (flags, missing inputs, an unwritable output folder, other settings), checked
before any slide.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mica.features import codex_encoders as ce
from mica.features import codex_features as cf
from mica.features import done_records as fd
from mica.features.he_bags import HEConfig, encoder_dirname, extract_slide, features_dir
from mica.features.image_encoders import load_encoder
from pipeline import artifacts as art
from pipeline.cli import Context, Stage, config_from_args, require
from pipeline.cohort import CohortSlides, resolve_slides, select_slides
from pipeline.dist import all_gather_objects, barrier
from pipeline.done import DoneSpec
from pipeline.errors import PipelineError
from pipeline.io import config_dict, ensure_writable, save_config
from pipeline.runner import StageReport, parse_shard, run_slides, shard_slides

log = logging.getLogger("mica.extract_features")


@dataclass
class FeaturesConfig:
    """Stage 07's settings (the flags of the same names; see ``build_parser``)."""

    out: Path
    cohort: Path | None = None
    he: list[Path] | None = None
    what: str = "both"
    slides: list[str] | None = None
    encoder: str = "musk"
    weights: str | None = None
    interpolation: str | None = None
    codex_encoder: str = "dinov2_vits14_reg"
    codex_weights: str | None = None
    high: float = ce.HIGH_THRESHOLD
    patches: Path | None = None
    mpp: float | None = None
    region_px: int = 2048
    batch_size: int = 128
    workers: int = 2
    amp: str = "auto"
    device: str = "auto"
    shard: str | None = None
    overwrite: bool = False
    fail_fast: bool = False

    @property
    def modalities(self) -> tuple[str, ...]:
        """("he",), ("codex",) or ("he", "codex")."""
        return {"he": ("he",), "codex": ("codex",)}.get(self.what, ("he", "codex"))


def my_slides(slides: Sequence[str], shard: str | None, rank: int = 0, world: int = 1) -> list[str]:
    """This process's slides, as stage 06 shares them: job-array shard ``i/n`` = every n-th of the sorted list from
    i (:func:`pipeline.runner.shard_slides`), then every ``world``-th of those from ``rank``."""
    return shard_slides(slides, shard)[rank::world]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mica.extract_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output root OUT (reads patches/, virtual_codex/, runs/)")
    p.add_argument("--cohort", type=Path, help="cohort folder: pairs.csv when present, else he/ (H&E slides)")
    p.add_argument("--he", type=Path, nargs="+", help="H&E slide files or folders (instead of the cohort's)")
    p.add_argument("--what", choices=("he", "codex", "both"), default="both", help="modalities (default both)")
    p.add_argument("--slides", nargs="+", help="only these slide ids (default: all)")
    p.add_argument("--encoder", default="musk",
                   help="H&E encoder: a hex.backbones name (musk, dinov2_vits14_reg, tiny), timm:<name>, or hex:RUN "
                        "(the backbone of OUT/runs/RUN) (default musk)")
    p.add_argument("--weights", help="H&E encoder weights (local file or hf_hub:<repo>); for hex:RUN a checkpoint "
                                     "(default OUT/runs/RUN/best.safetensors)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"),
                   help="resize mode to the encoder input (default: the HEX run's, else bicubic)")
    p.add_argument("--codex-encoder", default="dinov2_vits14_reg",
                   help="CODEX encoder: stats, or an image backbone name (default dinov2_vits14_reg, the original)")
    p.add_argument("--codex-weights", help="weights of an image CODEX encoder (local file or hf_hub:<repo>)")
    p.add_argument("--high", type=float, default=ce.HIGH_THRESHOLD,
                   help="stats: high-expression threshold, P99-normalised units (default 0.5)")
    p.add_argument("--patches", type=Path, help="grid folder (default OUT/patches)")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of the H&E (overrides slide metadata)")
    p.add_argument("--region-px", type=int, default=2048, help="side of the regions read at the tile level, px")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward per process")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader worker processes per rank (stats: slides in parallel)")
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto", help="autocast (CUDA only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--shard", help="job arrays: i/n = every n-th slide of the sorted list, from i (0-based)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo slides whose outputs exist, also those made with other settings")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    return p


def make_config(args: argparse.Namespace) -> FeaturesConfig:
    """The flags as a :class:`FeaturesConfig`; a bad value stops here (before a process group or any slide)."""
    cfg = config_from_args(FeaturesConfig, args)
    parse_shard(cfg.shard)  # a bad --shard stops here
    for flag, value, ok in (("--batch-size", cfg.batch_size, cfg.batch_size >= 1),
                            ("--workers", cfg.workers, cfg.workers >= 0),
                            ("--region-px", cfg.region_px, cfg.region_px >= 1),
                            ("--mpp", cfg.mpp, cfg.mpp is None or cfg.mpp > 0),
                            ("--high", cfg.high, cfg.high > 0)):
        require(ok, f"{flag} {value}: must be {'>= 0' if flag == '--workers' else 'positive'}")
    return cfg


def out_dirs(cfg: FeaturesConfig) -> list[Path]:
    """The output folders of the run: the H&E bag folder and/or the CODEX parts folder."""
    codex = cf.parts_dir(cfg.out, encoder_dirname(cfg.codex_encoder))
    return [features_dir(cfg.out, cfg.encoder) if m == "he" else codex for m in cfg.modalities]


def prepare(cfg: FeaturesConfig, ctx: Any) -> None:
    """The output folders are writable, before the log file opens and before any slide."""
    for d in out_dirs(cfg):
        ensure_writable(d)


def log_file(cfg: FeaturesConfig) -> Path:
    """``OUT/features/run.log``, or ``OUT/codex_features/run.log`` for a CODEX-only run."""
    if cfg.what == "codex":
        return art.CODEX_FEATURE_TABLE.dir(cfg.out) / "run.log"
    return features_dir(cfg.out, cfg.encoder).parent / "run.log"


@dataclass
class _Part:
    """One modality of a run, planned: its done-spec and slides, and how to run and finish it."""

    what: str
    desc: str
    spec: DoneSpec
    run_slides: list[str]  # this run's (job-array shard's) slides; ``run`` does this rank's share of them
    config_dir: Path
    config: dict[str, Any]
    run: Callable[[], StageReport]
    after: Callable[[], None] = lambda: None


def _cohort(cfg: FeaturesConfig, require_he: bool) -> CohortSlides:
    return resolve_slides(cfg.cohort, he=cfg.he, require_he=require_he)


def _plan_he(cfg: FeaturesConfig, ctx: Context) -> _Part:
    cohort = _cohort(cfg, require_he=True)
    slides = my_slides(select_slides(cohort.ids, cfg.slides, cohort.source), cfg.shard)
    he_paths = cohort.he_paths()
    patches = cfg.patches or art.PATCH_GRID.dir(cfg.out)
    if not patches.is_dir():
        raise PipelineError(f"grid folder {patches} not found; run stage 01 (preprocess.patch) first, or pass "
                            "--patches")
    enc = load_encoder(cfg.encoder, cfg.out, cfg.weights, cfg.interpolation)
    he_cfg = HEConfig(out=cfg.out, patches_dir=patches, batch_size=cfg.batch_size, workers=cfg.workers,
                      amp=cfg.amp, region_px=cfg.region_px, mpp=cfg.mpp, progress=ctx.is_main)
    settings = fd.he_settings(enc, cfg.region_px, cfg.mpp)
    spec = fd.he_spec(cfg.out, enc.name, settings, he_paths, patches)
    mine = my_slides(slides, None, ctx.rank, ctx.world_size)
    desc = f"H&E features ({cfg.encoder})"

    def run() -> StageReport:
        enc.module.to(ctx.device)
        return run_slides(mine, lambda s: extract_slide(s, he_paths[s], enc, he_cfg, ctx.device, settings),
                          done=spec, overwrite=cfg.overwrite, skip_errors=not cfg.fail_fast, desc=desc)

    config = config_dict(cfg) | {"slides_resolved": slides, "slide_source": cohort.source, "settings": settings,
                                 "world_size": ctx.world_size, "schema_version": fd.HE_SCHEMA}
    return _Part("he", desc, spec, slides, features_dir(cfg.out, enc.name), config, run)


def _codex_slides(cfg: FeaturesConfig) -> list[str]:
    """The run's CODEX slides: the cohort's (``--cohort``/``--he``; a slide without a map then fails, naming stage
    06), else every slide with a map; no map at all is a :class:`PipelineError`."""
    maps = cf.find_maps(cfg.out)
    vdir = art.VIRTUAL_CODEX.dir(cfg.out)
    if not maps:
        raise PipelineError(f"no virtual CODEX maps in {vdir}; run {cf.STAGE_06} first")
    if cfg.cohort is None and not cfg.he:
        return select_slides(sorted(maps), cfg.slides, str(vdir))
    cohort = _cohort(cfg, require_he=False)
    return select_slides(cohort.ids, cfg.slides, cohort.source)


def _plan_codex(cfg: FeaturesConfig, ctx: Context) -> _Part:
    from hex.evaluate.predict import resolve_amp

    slides = my_slides(_codex_slides(cfg), cfg.shard)
    mine = my_slides(slides, None, ctx.rank, ctx.world_size)
    name, encdir = cfg.codex_encoder, encoder_dirname(cfg.codex_encoder)
    desc = f"CODEX features ({name})"
    resolved: dict[str, Any] = {"slides_resolved": slides, "world_size": ctx.world_size,
                                "schema_version": fd.CODEX_SCHEMA}
    if name == ce.STATS_ENCODER:
        settings = fd.codex_settings(name, cfg.high, ce.EPI_THRESHOLD)
        spec = fd.codex_spec(cfg.out, encdir, settings)
        resolved |= {"feature_names": list(ce.STATS_FEATURES), "feature_descriptions": ce.STATS_DESCRIPTIONS}
        work = functools.partial(cf.stats_slide, out=cfg.out, encdir=encdir, high=cfg.high, settings=settings)
        names: list[str] | None = list(ce.STATS_FEATURES)

        def run() -> StageReport:
            return run_slides(mine, work, done=spec, overwrite=cfg.overwrite, workers=cfg.workers,
                              skip_errors=not cfg.fail_fast, desc=desc)
    else:
        enc = load_encoder(name, cfg.out, cfg.codex_weights)
        settings = fd.codex_settings(name, enc=enc)
        spec = fd.codex_spec(cfg.out, encdir, settings)
        resolved |= {"embed_dim": enc.embed_dim, "input_size": enc.input_size, "mean": enc.mean, "std": enc.std}
        names = None

        def run() -> StageReport:
            enc.module.to(ctx.device)
            return cf.run_image(mine, cfg.out, encdir, name, enc.module, enc.input_size, enc.mean, enc.std,
                                ctx.device, spec, batch_size=cfg.batch_size, workers=cfg.workers,
                                amp=resolve_amp(cfg.amp, ctx.device), overwrite=cfg.overwrite,
                                skip_errors=not cfg.fail_fast, progress=ctx.is_main)

    def after() -> None:  # the combined file holds the parts made with these settings and current maps only
        parts = cf.part_slides(cfg.out, encdir)
        keep = fd.done_now(spec, parts)
        left = sorted(set(parts) - set(keep))
        if left:
            log.warning("%s: %d parts left out of %s (made with other settings, or their map changed or is gone): "
                        "%s", desc, len(left), cf.combined_path(cfg.out, encdir), ", ".join(left[:10]))
        cf.assemble(cfg.out, encdir, name, names, slides=keep)

    resolved["settings"] = settings
    return _Part("codex", desc, spec, slides, cf.parts_dir(cfg.out, encdir), config_dict(cfg) | resolved, run, after)


def _merge(reports: list[StageReport]) -> StageReport:
    out = StageReport()
    for r in reports:
        out.done += r.done
        out.skipped += r.skipped
        out.failed |= r.failed
    return out


LABELS = {"he": "H&E bags", "codex": "CODEX"}


def final_line(reports: dict[str, StageReport], desc: str) -> str:
    """The run's last line. One modality: its report's line (``H&E features (tiny): 2 done, ...``). Both: each slide
    counted once (failed when a modality failed, done when one was done, else skipped), then the counts of each
    modality: ``features: 2 slides done, 0 skipped (already done), 0 failed (H&E bags 2 done, 0 skipped, 0 failed;
    CODEX 2 done, 0 skipped, 0 failed)``; failures follow with their modality and reason."""
    if len(reports) == 1:
        return next(iter(reports.values())).final_line(desc)
    slides = list(dict.fromkeys(s for r in reports.values() for s in (*r.done, *r.skipped, *r.failed)))
    failed = {s: "; ".join(f"{LABELS[w]}: {r.failed[s]}" for w, r in reports.items() if s in r.failed)
              for s in slides if any(s in r.failed for r in reports.values())}
    done = [s for s in slides if s not in failed and any(s in r.done for r in reports.values())]
    skipped = len(slides) - len(done) - len(failed)
    each = "; ".join(f"{LABELS[w]} {len(r.done)} done, {len(r.skipped)} skipped, {len(r.failed)} failed"
                     for w, r in reports.items())
    line = f"features: {len(done)} slides done, {skipped} skipped (already done), {len(failed)} failed ({each})"
    return line + (": " + "; ".join(f"{s} ({why})" for s, why in failed.items()) if failed else "")


def run(cfg: FeaturesConfig, ctx: Context) -> int:
    """Stage 07 (see the module docstring): plan each modality (every rank checks every slide of the run for other
    settings before any work), save the configs, run, gather the reports, one last line; returns the exit code."""
    parts: list[_Part] = []
    reports: dict[str, StageReport] = {}
    try:
        parts = [_plan_he(cfg, ctx) if m == "he" else _plan_codex(cfg, ctx) for m in cfg.modalities]
        for part in parts:  # every rank checks every slide of the run: all stop alike, before any work
            fd.check_before_work(part.spec, part.run_slides, cfg.overwrite, part.desc)
        if ctx.is_main:
            for part in parts:
                save_config(part.config_dir, part.config)
        for part in parts:
            rep = part.run()
            barrier()
            if ctx.is_main:
                part.after()
            reports[part.what] = _merge(all_gather_objects(rep))
    finally:
        barrier()
    failed = any(r.failed for r in reports.values())
    if ctx.is_main:
        log.log(logging.ERROR if failed else logging.INFO, "%s", final_line(reports, parts[0].desc))
    return 1 if failed else 0


STAGE = Stage("mica.extract_features", build_parser, make_config, run=run, distributed=True, prepare=prepare,
              log_file=log_file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run stage 07 (see the module docstring); returns the exit code (0, 1 when a slide failed, 2 bad input)."""
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
