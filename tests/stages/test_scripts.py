"""The numbered stage scripts as a user calls them: --help, paths relative to the caller, arguments passed through,
per-fold run names, documented extra-flag variables and the one torchrun launcher of stages 04-08. Stage 03's two
steps and their exit codes are ``python -m preprocess.labels`` (tests/stages/test_chain_quantify.py).

Most tests put a fake ``python`` and a fake ``torchrun`` first on PATH (they log their directory, PYTHONSAFEPATH and
arguments; python exits with ``RC_<module>``), so they test the shell logic in well under a second without running a
stage.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("[0-9][0-9]_*.sh"))
MODULES = {
    "01_patch.sh": ["preprocess.patch"],
    "02_register.sh": ["preprocess.register"],
    "03_quantify.sh": ["preprocess.labels", "preprocess.quantify", "preprocess.patch_store", "preprocess.normalize"],
    "04_train_hex.sh": ["hex.train"],
    "05_test_hex.sh": ["hex.test"],
    "06_infer_wsi.sh": ["hex.infer_wsi"],
    "07_features.sh": ["mica.extract_features"],
    "08_train_mica.sh": ["mica.train"],
    "09_test_mica.sh": ["mica.test"],
    "10_niches.sh": ["spatial.niches"],
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
                  "CHECKPOINT", "CODEX_WEIGHTS", "FIT_SPLIT", "HEX_RUN", "ENCODER", "TORCHRUN_ARGS", "NNODES"):
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
            assert f"{flag} {caller}/rel/{var.lower()}.file" in args, (var, args)
        assert args.endswith("--overwrite --slides s 1"), args  # the script's arguments, after EXTRA
        if script == "03_quantify.sh":  # EXTRA is quantify's: preprocess.labels passes it on
            assert "--quantify-flags=--from-extra " in args, args
        else:
            assert "--from-extra --overwrite" in args, args
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


GPU_SCRIPTS = {"04_train_hex.sh": "hex.train", "05_test_hex.sh": "hex.test", "06_infer_wsi.sh": "hex.infer_wsi",
               "07_features.sh": "mica.extract_features", "08_train_mica.sh": "mica.train"}


def _torchrun_calls(calls) -> list[str]:
    return [c[2] for c in calls if c[2].startswith("torchrun ")]


@pytest.mark.parametrize("script", sorted(GPU_SCRIPTS))
def test_torchrun_gets_torchrun_args_and_the_module_the_arguments(fake, script):
    """Every GPU-capable stage launches the same way: one node -> --standalone; TORCHRUN_ARGS and NNODES reach
    torchrun before the module; EXTRA and the script's arguments reach every rank."""
    mod = GPU_SCRIPTS[script]
    r, calls = fake(script, "--overwrite", GPUS="2", EXTRA="--from-extra")
    assert r.returncode == 0, r.stderr
    (tr,) = _torchrun_calls(calls)
    assert tr.startswith("torchrun --nnodes 1 --nproc-per-node 2 "), tr
    assert "--standalone" in tr and f"-m {mod} " in tr and tr.endswith("--from-extra --overwrite"), tr
    if mod == "hex.train":  # flags, inputs and CUDA checked once before the ranks start; ranks restart on a crash
        assert calls[0][2].startswith("-m hex.train ") and calls[0][2].endswith("--overwrite --check")
        assert tr.index("--max-restarts 3") < tr.index("-m hex.train")
    assert [c for c in calls if c[2].startswith(f"-m {mod} ") and not c[2].endswith("--check")] == []
    r, calls = fake(script, "--overwrite", GPUS="2", NNODES="2", TORCHRUN_ARGS="--node-rank 1 --rdzv-endpoint h:29500")
    assert r.returncode == 0, r.stderr
    (tr,) = _torchrun_calls(calls)
    assert "--standalone" not in tr and "--nnodes 2 --nproc-per-node 2" in tr
    assert tr.index("--node-rank 1 --rdzv-endpoint h:29500") < tr.index(f"-m {mod}"), tr
    assert tr.endswith("--overwrite"), tr
    r, calls = fake(script, GPUS="1", TORCHRUN_ARGS="--rdzv-endpoint h:1")  # one node, but the user's rendezvous
    (tr,) = _torchrun_calls(calls)
    assert "--standalone" not in tr and "--nproc-per-node 1 " in tr and "--rdzv-endpoint h:1 -m" in tr, tr


@pytest.mark.parametrize("script", sorted(GPU_SCRIPTS))
def test_gpus_0_runs_one_plain_python_process(fake, script):
    r, calls = fake(script, "--overwrite", NNODES="2", TORCHRUN_ARGS="--node-rank 1")
    assert r.returncode == 0, r.stderr
    assert not _torchrun_calls(calls)
    (run,) = [c[2] for c in calls]
    assert run.startswith(f"-m {GPU_SCRIPTS[script]} ") and run.endswith("--overwrite") and "--node-rank" not in run


def test_one_torchrun_launcher():
    """No numbered script calls torchrun itself: stages 04-08 start their module through _common.sh's ``launch``
    only (04's ``--check`` call aside, no ``python -m`` of their own)."""
    for script in SCRIPTS:
        code = [line.split(" #", 1)[0].strip() for line in (REPO / "scripts" / script).read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        assert not any(line.startswith("torchrun") or " torchrun " in line for line in code), script
        if script in GPU_SCRIPTS:
            launches = [line for line in code if line.startswith("launch ")]
            assert len(launches) == 1 and GPU_SCRIPTS[script] in launches[0], script
            direct = [line for line in code if "python -m" in line]
            assert all(line.endswith("--check") for line in direct), (script, direct)


def test_launcher_keeps_arguments_with_spaces(fake, tmp_path):
    """Through ``launch``, an argument with a space stays one argument (python and torchrun alike)."""
    log = tmp_path / "argv.log"
    bin_dir = tmp_path / "argvbin"
    bin_dir.mkdir()
    for exe in ("python", "torchrun"):
        (bin_dir / exe).write_text(f'#!/usr/bin/env bash\nprintf "[%s]" "$@" >> "{log}"; echo >> "{log}"\n')
        (bin_dir / exe).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": sys.prefix}  # no .venv activation
    for gpus in ("0", "2"):
        r = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/_common.sh"; GPUS={gpus} launch mod "a b" c'],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "[-m][mod][a b][c]"
    assert lines[1] == "[--nnodes][1][--nproc-per-node][2][--standalone][-m][mod][a b][c]"


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
