"""The numbered stage scripts as a user calls them: --help, paths relative to the caller, arguments passed through,
per-fold run names, documented extra-flag variables, and stage 03's two steps.

Most tests put a fake ``python`` first on PATH (it logs its directory, PYTHONSAFEPATH and arguments, and exits
with ``RC_<module>``), so they test the shell logic in well under a second without running a stage.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("0[1-9]_*.sh"))
MODULES = {
    "01_patch.sh": ["preprocess.patch"],
    "02_register.sh": ["preprocess.register"],
    "03_quantify.sh": ["preprocess.quantify", "preprocess.patch_store", "preprocess.normalize"],
    "04_train_hex.sh": ["hex.train"],
    "05_test_hex.sh": ["hex.test"],
    "06_infer_wsi.sh": ["hex.infer_wsi"],
    "07_features.sh": ["mica.extract_features"],
    "08_train_mica.sh": ["mica.train"],
    "09_test_mica.sh": ["mica.test"],
}
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s|%s|%s\\n' "$PWD" "${PYTHONSAFEPATH:-}" "$*" >> "$SHIM_LOG"
if [ "$1" = "-m" ]; then
  for a in "$@"; do
    if [ "$a" = "--help" ]; then echo "FAKE HELP OF $2"; exit 0; fi
  done
  v="RC_${2//./_}"
  exit "${!v:-0}"
fi
exit 0
"""
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf '%s|%s|torchrun %s\\n' "$PWD" "${PYTHONSAFEPATH:-}" "$*" >> "$SHIM_LOG"
"""


def _variables(script: str) -> list[str]:
    """Names the script assigns as VAR=${VAR:-...} before it sources _common.sh."""
    names = []
    for line in (REPO / "scripts" / script).read_text().splitlines():
        if line.startswith("source "):
            break
        m = re.match(r"([A-Z_][A-Z0-9_]*)=\$\{\1:-", line)
        if m and m.group(1) not in names:
            names.append(m.group(1))
    return names


@pytest.fixture
def fake(tmp_path):
    """run(script, *args, cwd=, **env) with the fake python first on PATH; returns (result, calls), calls =
    [(cwd, PYTHONSAFEPATH, argument string)] of every python invocation."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    for exe in ("python", "torchrun"):
        (bin_dir / exe).chmod(0o755)
    log = tmp_path / "python_calls.log"

    def run(script: str, *args: str, cwd: Path | None = None, **env: str):
        log.write_text("")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RC_", "PYTHON"))}
        base |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path / "no_venv"),
                 "SHIM_LOG": str(log), "OUT": str(tmp_path / "out")}
        for k in ("COHORT", "RUN", "FOLD", "EXTRA", "STORE_EXTRA", "SHARD", "NORMALIZE_ONLY", "GPUS", "WEIGHTS",
                  "CHECKPOINT", "CODEX_WEIGHTS", "FIT_SPLIT", "HEX_RUN", "ENCODER", "TORCHRUN_ARGS"):
            base.pop(k, None)
        r = subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                           cwd=cwd or tmp_path, env=base | env, timeout=60)
        calls = [tuple(line.split("|", 2)) for line in log.read_text().splitlines()]
        return r, calls

    return run


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_header_variables_and_module_help_and_runs_nothing(fake, tmp_path, script, flag):
    out = tmp_path / "out"
    r, calls = fake(script, "--overwrite", flag, OUT=str(out))
    assert r.returncode == 0, r.stderr
    header = (REPO / "scripts" / script).read_text().splitlines()[1].lstrip("# ")
    assert r.stdout.startswith(header)
    for name in _variables(script):
        assert re.search(rf"^  {name}=", r.stdout, re.M), f"{script}: {name} missing from --help"
    assert f"now: {out}" in r.stdout  # the value this run would use, resolved
    for mod in MODULES[script]:
        assert f"===== python -m {mod} --help" in r.stdout and f"FAKE HELP OF {mod}" in r.stdout
    assert calls and all(c[2].endswith("--help") for c in calls)  # only the modules' --help ran
    assert not out.exists()


def test_help_shows_the_real_module_help(tmp_path):
    """Stage 01 (its module's --help is the quickest to import) with the repository's python."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(REPO / "scripts" / "01_patch.sh"), "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m preprocess.patch" in r.stdout and "--min-tissue" in r.stdout
    assert "MIN_TISSUE=0.5" in r.stdout and not (tmp_path / "out").exists()


def test_relative_cohort_and_out_resolve_against_the_callers_directory(tmp_path):
    """Stage 01 for real, from tmp_path, on a cohort whose one slide is unreadable: the error names the slide under
    tmp_path/rel_cohort and the outputs land in tmp_path/rel_out, not in the repository."""
    (tmp_path / "rel_cohort" / "he").mkdir(parents=True)
    (tmp_path / "rel_cohort" / "he" / "s1.tif").write_text("not a slide")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"COHORT": "rel_cohort", "OUT": "./rel_out"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "01_patch.sh")], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert str(tmp_path / "rel_cohort" / "he" / "s1.tif") in r.stderr
    assert (tmp_path / "rel_out" / "patches").is_dir()
    assert not (REPO / "rel_out").exists() and not (REPO / "scripts" / "rel_out").exists()


PATH_VARS = {  # script -> path variables it takes besides COHORT and OUT
    "03_quantify.sh": {"FIT_SPLIT": "--fit-split"},
    "04_train_hex.sh": {"WEIGHTS": "--weights"},
    "06_infer_wsi.sh": {"WEIGHTS": "--weights", "CHECKPOINT": "--checkpoint"},
    "07_features.sh": {"WEIGHTS": "--weights", "CODEX_WEIGHTS": "--codex-weights"},
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_paths_resolve_against_the_caller_and_arguments_reach_the_module(fake, tmp_path, script):
    caller = tmp_path / "caller"
    (caller / "rel_cohort").mkdir(parents=True)
    extra = {v: f"rel/{v.lower()}.file" for v in PATH_VARS.get(script, {})}
    r, calls = fake(script, "--overwrite", "--slides", "s 1", cwd=caller, COHORT="rel_cohort", OUT="rel_out",
                    EXTRA="--from-extra", **extra)
    assert r.returncode == 0, r.stderr
    runs = [c for c in calls if not c[2].endswith("--help")]
    assert runs, "no module ran"
    for cwd, safe, args in runs:
        assert cwd == str(caller) and safe == "1"  # run in the caller's directory, repo packages first
        assert f"--out {caller}/rel_out" in args or f"--data {caller}/rel_out" in args
        assert f"{caller}/rel_cohort" in args
        assert not re.search(r"(?<!/)rel_(out|cohort)", args), args  # never the relative form
        for var, flag in PATH_VARS.get(script, {}).items():
            if "patch_store" not in args:  # 03's FIT_SPLIT is for quantify only
                assert f"{flag} {caller}/rel/{var.lower()}.file" in args, (var, args)
        assert args.endswith("--overwrite --slides s 1"), args  # the script's arguments, after EXTRA
        assert ("--from-extra --overwrite" in args) == ("patch_store" not in args), args
    assert not (REPO / "rel_out").exists()


def test_hf_hub_weights_stay_as_they_are(fake, tmp_path):
    r, calls = fake("07_features.sh", WEIGHTS="hf_hub:org/model", CODEX_WEIGHTS="/abs/w.pth")
    assert r.returncode == 0, r.stderr
    assert "--weights hf_hub:org/model" in calls[0][2] and "--codex-weights /abs/w.pth" in calls[0][2]


@pytest.mark.parametrize("script", ["04_train_hex.sh", "05_test_hex.sh", "06_infer_wsi.sh"])
def test_run_defaults_name_the_fold(fake, script):
    r, calls = fake(script, FOLD="3")
    assert r.returncode == 0, r.stderr
    assert "--run-name hex_fold3" in calls[-1][2]
    if script != "06_infer_wsi.sh":
        assert "splits/splits_3.csv" in calls[-1][2]


@pytest.mark.parametrize("script", ["04_train_hex.sh", "06_infer_wsi.sh"])
def test_torchrun_gets_torchrun_args_and_the_module_the_arguments(fake, script):
    mod = "hex.train" if script.startswith("04") else "hex.infer_wsi"
    r, calls = fake(script, "--overwrite", GPUS="2", EXTRA="--from-extra")
    assert r.returncode == 0, r.stderr
    (tr,) = [c[2] for c in calls if c[2].startswith("torchrun ")]
    assert "--standalone" in tr and f"-m {mod} " in tr and tr.endswith("--from-extra --overwrite"), tr
    if mod == "hex.train":  # flags, inputs and CUDA checked once before the ranks start
        assert calls[0][2].startswith("-m hex.train ") and calls[0][2].endswith("--overwrite --check")
    r, calls = fake(script, GPUS="2", NNODES="2", TORCHRUN_ARGS="--node-rank 1 --rdzv-endpoint h:29500")
    (tr,) = [c[2] for c in calls if c[2].startswith("torchrun ")]
    assert "--standalone" not in tr and "--nnodes 2" in tr
    assert tr.index("--node-rank 1 --rdzv-endpoint h:29500") < tr.index(f"-m {mod}"), tr


def test_mica_runs_hold_every_fold():
    """08/09 keep one run for all folds (fold_k/ inside it), so their RUN default needs no FOLD."""
    for script in ("08_train_mica.sh", "09_test_mica.sh"):
        text = (REPO / "scripts" / script).read_text()
        assert "FOLD=" not in text.replace("FOLDS=", "") and "RUN=${RUN:-mica_${MODE}_${TASK}}" in text


def test_every_extra_flag_variable_is_documented():
    readme = (REPO / "README.md").read_text()
    found = []
    for script in [*SCRIPTS, "demo.sh"]:
        text = (REPO / "scripts" / script).read_text()
        header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        for m in re.finditer(r"^([A-Z_]*(?:EXTRA|_ARGS))=\$\{\1:-[^\n]*", text, re.M):
            name, line = m.group(1), m.group(0)
            found.append(name)
            comment = line.split(" #", 1)[1] if " #" in line else ""
            assert "flags for" in comment and "e.g." in comment, (script, name, "what it is passed to, an example")
            assert f"`{name}`" in readme, f"{name} of {script} is not in the README"
        if script != "demo.sh":
            assert "Arguments of this script go to" in header, script
    assert {"EXTRA", "STORE_EXTRA", "TORCHRUN_ARGS", "HEX_EXTRA"} <= set(found)


def _module_calls(calls, mod):
    return [c[2] for c in calls if c[2].startswith(f"-m {mod} ")]


@pytest.mark.parametrize("q_rc,s_rc,rc,store_runs,last", [
    (0, 0, 0, True, "stage 03: quantify: ok; patch store: ok"),
    (1, 0, 1, True, "stage 03: quantify failed for some slides (exit 1); patch store: ok"),
    (0, 1, 1, True, "stage 03: quantify: ok; patch store failed (exit 1)"),
    (1, 1, 1, True, "stage 03: quantify failed for some slides (exit 1); patch store failed (exit 1)"),
    (2, 0, 2, False, "stage 03: quantify stopped before any slide (exit 2"),
])
def test_stage_03_runs_the_store_after_a_quantify_failure(fake, q_rc, s_rc, rc, store_runs, last):
    r, calls = fake("03_quantify.sh", "--overwrite", EXTRA="--allow-flagged", STORE_EXTRA="--png",
                    RC_preprocess_quantify=str(q_rc), RC_preprocess_patch_store=str(s_rc))
    assert r.returncode == rc
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(last), lines[-1]
    (quant,) = _module_calls(calls, "preprocess.quantify")
    assert "--allow-flagged" in quant and "--png" not in quant and quant.endswith("--overwrite")
    store = _module_calls(calls, "preprocess.patch_store")
    assert len(store) == int(store_runs)
    if store_runs:
        assert "--labelled-only" in store[0] and "--png" in store[0] and "--allow-flagged" not in store[0]
        assert store[0].endswith("--overwrite")  # a script argument reaches both steps
    assert not _module_calls(calls, "preprocess.normalize")


@pytest.mark.parametrize("env", [{"SHARD": "0/2"}, {"EXTRA": "--no-normalize"}])
def test_stage_03_pass_1_only_stores_every_slide(fake, env):
    """Without the normalisation there are no labels yet (they come with NORMALIZE_ONLY=1): no --labelled-only."""
    r, calls = fake("03_quantify.sh", **env)
    assert r.returncode == 0, r.stderr
    (store,) = _module_calls(calls, "preprocess.patch_store")
    assert "--labelled-only" not in store and ("SHARD" not in env or "--shard 0/2" in store)


def test_stage_03_normalize_only(fake, tmp_path):
    r, calls = fake("03_quantify.sh", "--slides", "a", NORMALIZE_ONLY="1", EXTRA="--legacy-columns",
                    FIT_SPLIT="split.csv")
    assert r.returncode == 0, r.stderr
    (norm,) = _module_calls(calls, "preprocess.normalize")
    assert f"--fit-split {tmp_path}/split.csv --legacy-columns --slides a" in norm and len(calls) == 1


@pytest.mark.parametrize("preset, expect", [(None, "30"), ("5", "5")])
def test_progress_bars_slow_down_in_log_files(tmp_path, preset, expect):
    """stderr not a terminal (here: a pipe) -> tqdm redraws every 30 s unless the user set TQDM_MININTERVAL."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    if preset is not None:
        env["TQDM_MININTERVAL"] = preset
    r = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/_common.sh"; printf %s "${{TQDM_MININTERVAL:-unset}}"'],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expect
