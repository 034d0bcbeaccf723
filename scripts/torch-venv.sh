#!/usr/bin/env bash
# The PyTorch interpreter `make bench` compares candle against: creates
# .cache/torch-venv when it cannot import torch + transformers + peft (test/fixtures/gen_train.py).
# Only benchmarks and fixture generators use it; `make test` never does.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/torch-venv"
if "$venv/bin/python" -c "import torch, transformers, peft" 2>/dev/null; then
    exit 0
fi
echo "creating $venv (torch + transformers + peft) for the PyTorch baseline and fixture generators …"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch transformers safetensors numpy peft
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
