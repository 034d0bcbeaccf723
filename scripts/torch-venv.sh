#!/usr/bin/env bash
# The PyTorch interpreter `make bench` compares candle against: creates
# .cache/torch-venv when it cannot import torch + transformers.
# Only benchmarks and fixture generators use it; `make test` never does.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/torch-venv"
if "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
    exit 0
fi
echo "creating $venv (torch + transformers) for the PyTorch baseline …"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch transformers safetensors numpy
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
