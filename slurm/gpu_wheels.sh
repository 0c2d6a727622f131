#!/usr/bin/env bash
# Fills what the one-GPU run (slurm/gpu_run.sh, docs/gpu.md) carries and cannot fetch there:
#   .whl/       Python 3.12 x86-64 wheels of what the GPU path imports and that machine lacks
#   .gpu_data/  the Multi30k en-de files of phase c (nmt/multi30k under a data root)
# Both are git-ignored. Then checks, with a Python 3.12 if there is one here, that the wheels
# install offline into a fresh folder and that every requirement of theirs is either carried or
# on the machine's package list (MACHINE below, from the device notes' list of the 'cuda' image):
# a miss fails here, naming the package, not during the GPU run.
#
#   bash slurm/gpu_wheels.sh [DATA_ROOT]     (default ../shared/data; `make gpu-wheels`)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
PY=${PYTHON:-python3}
PY312=${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1 || true)}

# Pinned to the versions the CPU venv runs the tests with; deepspeed is built here without its
# compiled ops (the registry has no wheel of it), the rest are downloaded for cp312 manylinux.
# datasets: `janus-finetune prepare` (phase c) tokenizes through it; wandb is not carried
# (WANDB_MODE=disabled: train/metrics.py).
DEEPSPEED=deepspeed==0.19.8
DOWNLOAD=(megatron-core==0.16.1 omegaconf==2.4.0 hjson==3.1.0 pydantic==2.14.4
          pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
          typing-extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
# The machine's own packages (KINDS.md of the device notes, 'cuda' image, read 2026-11-17).
MACHINE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w .whl "$DEEPSPEED"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${DOWNLOAD[@]}"

(cd .whl && ls *.whl) > .whl/MANIFEST  # slurm/gpu_run.sh refuses to start if one is missing

rm -rf .gpu_data && mkdir -p .gpu_data/nmt/multi30k
for split in train val test_2016_flickr; do
    for lang in en de; do
        cp "$DATA/nmt/multi30k/$split.$lang" .gpu_data/nmt/multi30k/
    done
done

if [ -z "$PY312" ]; then
    echo "gpu_wheels: no Python 3.12 here: the offline install was not checked" >&2
    exit 1
fi
rm -rf /tmp/gpu_wheels_check
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_wheels_check .whl/*.whl
MACHINE="$MACHINE" "$PY312" - /tmp/gpu_wheels_check <<'EOF'
"""Every requirement of a carried wheel (markers evaluated for this Python 3.12, extras left out)
is carried too or on the machine's list; else exit 1 naming it."""
import os
import sys
from importlib.metadata import distributions

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

carried = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[sys.argv[1]])}
have = set(carried) | {canonicalize_name(n) for n in os.environ["MACHINE"].split()}
missing = sorted({f"{canonicalize_name(r.name)} (needed by {name})"
                  for name, d in carried.items() for r in map(Requirement, d.requires or [])
                  if (r.marker is None or r.marker.evaluate({"extra": ""}))
                  and canonicalize_name(r.name) not in have})
if missing:
    sys.exit("gpu_wheels: neither carried nor on the GPU machine: " + ", ".join(missing))
print(f"gpu_wheels: {len(carried)} wheels, every requirement carried or on the machine")
EOF
du -sh .whl .gpu_data
