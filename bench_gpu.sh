#!/usr/bin/env bash
# GPU check for a lent GPU machine (one H200 here): the GPU tests, then bench.py on the seed's 215M model
# (dim 1024, 18 layers, vocab 6144, seq 512, bf16) eager and compiled. Installs nothing: torch, transformers,
# tokenizers and pytest must already be there (they are on the lent machine's image, whose Python is
# python3; PYTHON=... to choose another). About 5 minutes; the log also goes to $OUT (if set). bench.py
# prints each section as soon as it is measured, so a run cut short still leaves figures.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
LOG=${OUT:-.}/bench_gpu.log
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv
  $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  timeout 150 $PYTHON -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py
  timeout 300 $PYTHON bench.py --device cuda --config 215m --compile
} 2>&1 | tee "$LOG"
