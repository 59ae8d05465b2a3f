#!/usr/bin/env bash
# GPU check for a lent GPU machine (one H200 here): the GPU tests, then bench.py on the seed's 215M model
# (dim 1024, 18 layers, vocab 6144, seq 512, bf16) eager and compiled. Installs nothing heavy: torch,
# transformers and tokenizers must already be there. About 5 minutes; output also in $OUT (if set).
set -uo pipefail
cd "$(dirname "$0")"
LOG=${OUT:-.}/bench_gpu.log
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python -m pytest -q tests/test_gpu.py tests/test_model.py
  python bench.py --device cuda --config 215m --compile
} 2>&1 | tee "$LOG"
