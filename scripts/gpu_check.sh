#!/usr/bin/env bash
# The CUDA checks as run on a lent GPU machine: tests/train/test_gpu.py with this tree on PYTHONPATH, then
# benchmarks/train_overhead.py --device cuda.
# Usage: bash scripts/gpu_check.sh [tests|bench|all] (default all; one device call allows 600 s).
# Results go to $OUT (gpu.txt: the machine and its Python modules; test_gpu.txt: the pytest run).
set -u
OUT=${OUT:-/tmp/mcc_gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# pydantic (the bundle schema) may be missing there: fall back to a copy carried in .gpu_deps (same Python only)
python3 -c "import pydantic" 2>/dev/null || export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/.gpu_deps"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import importlib.util, platform, torch, timm
print("python", platform.python_version(), "torch", torch.__version__, "timm", timm.__version__,
      "cuda", torch.cuda.is_available(), "bf16", torch.cuda.is_bf16_supported())
print({m: importlib.util.find_spec(m) is not None for m in ("pytest", "sklearn", "yaml", "onnxscript", "safetensors",
                                                              "matplotlib", "pydantic", "tensorboard")})
PY
PART=${1:-all}
[ "$PART" = bench ] || timeout 330 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu.py --durations=5 -rs 2>&1 | tee "$OUT/test_gpu.txt"
# the training-speed benchmark (issue table rows, end to end, input pipeline): table and JSON into $OUT
[ "$PART" = tests ] || timeout 240 python3 benchmarks/train_overhead.py --device cuda 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/train_overhead.txt"
[ "$PART" = tests ] || cp benchmarks/results/train_overhead.json "$OUT/" 2>/dev/null || true
