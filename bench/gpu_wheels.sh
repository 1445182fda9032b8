#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, the wheels that bench/gpu_check.sh installs OFFLINE on a GPU machine
# whose python3 (3.12) has torch, numpy, scipy, scikit-image, opencv, h5py, pandas, matplotlib, tqdm, safetensors ...
# but not openslide, palom, torchscale and the rest of the list below.
#   bash bench/gpu_wheels.sh             # -> .gpu_wheels/*.whl (git-ignored), then a dependency and size check
# Versions are the ones installed in this checkout's .venv (what the tests ran with). Variables:
DEST=${GPU_WHEELS_DIR:-.gpu_wheels}      # output folder (name it in the device `carry` list)
PY_VERSION=${GPU_PY_VERSION:-3.12}       # the GPU machine's python3
MAX_MIB=${GPU_WHEELS_MAX_MIB:-56}        # the device call carries the working tree + wheels, 64 MiB in all
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# What the GPU image lacks (device docs' package list) and the check imports, plus pins that must match our code:
# tifffile<=2024.7.2 (zarr-2 stores; palom's bound), timm (the version torchscale and hex were tested with),
# typing-extensions (pydantic needs a recent one).
NEEDED=(
  openslide-python openslide-bin imagecodecs tifffile
  zarr numcodecs asciitree fasteners Deprecated
  dask partd locket
  palom loguru pint flexcache flexparser platformdirs
  ome-types pydantic pydantic-core annotated-types typing-inspection pydantic-extra-types xsdata typing-extensions
  torchscale fairscale timm tensorboardX
)
# more names to carry (e.g. GPU_WHEELS_EXTRA="pandas" if the image's version breaks something; mind the size)
read -r -a EXTRA_NAMES <<<"${GPU_WHEELS_EXTRA:-}"
NEEDED+=("${EXTRA_NAMES[@]}")
# On the GPU image already (/work/.library/device/KINDS.md, list read there on 2026-11-17): not carried.
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PLAT=()
for n in 17 27 28 31 34 35 39; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Declared but never imported by what the check runs (palom's command-line interface only): not carried.
UNUSED_DEPS="fire yamale"

pins=$("$PY" - "${NEEDED[@]}" <<'EOF'
import importlib.metadata as md
import sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"gpu_wheels: {name} is not installed in this environment (run scripts/_setup_env.sh first)")
EOF
)
for pin in $pins; do
  # PIP_CONSTRAINT / find-links of this machine's pip config do not apply to another interpreter's wheels
  if ! PIP_CONSTRAINT= "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
      --implementation cp "${PLAT[@]}" -d "$DEST" "$pin" 2>/dev/null; then
    # no wheel on the index (e.g. fairscale, asciitree: source only): build one here; it must be pure Python
    echo "gpu_wheels: no binary wheel for $pin; building one from source" >&2
    PIP_CONSTRAINT= "$PY" -m pip wheel -q --no-deps -w "$DEST" "$pin"
  fi
done

# dependency and size check: every non-optional requirement must be carried or on the GPU image; no binary
# wheel built for this machine's python instead of the GPU's
GPU_HAS="$GPU_HAS $UNUSED_DEPS" "$PY" - "$DEST" "$PY_VERSION" "$MAX_MIB" <<'EOF'
import os
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

dest, pyver, max_mib = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
gpu_has = {canonicalize_name(n) for n in os.environ["GPU_HAS"].split()}  # + deliberately unused ones
wheels = sorted(dest.glob("*.whl"))
carried, problems = {}, []
cp = "cp" + pyver.replace(".", "")
for w in wheels:
    name, version, _, tags = parse_wheel_filename(w.name)
    if canonicalize_name(name) in carried:
        problems.append(f"two versions of {name}: pip --no-index would refuse them")
    carried[canonicalize_name(name)] = w
    if not any(t.interpreter in ("py3", cp) or t.abi == "abi3" for t in tags):
        problems.append(f"{w.name}: built for another python than {pyver}")
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        text = z.read(meta).decode()
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        n = canonicalize_name(req.name)
        if n not in carried and n not in gpu_has:
            problems.append(f"{w.name} requires {req} : neither carried nor on the GPU image")
total = sum(w.stat().st_size for w in wheels) / 2**20
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"gpu_wheels: {len(wheels)} wheels, {total:.1f} MiB in {dest}/")
if total > max_mib:
    problems.append(f"{total:.1f} MiB of wheels > {max_mib} MiB: the device call carries 64 MiB in all")
for p in problems:
    print("gpu_wheels: PROBLEM:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
