#!/usr/bin/env bash
# The CUDA checks as run on a lent GPU machine: tests/train/test_gpu.py with this tree on PYTHONPATH.
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
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu.py --durations=5 -rs 2>&1 | tee "$OUT/test_gpu.txt"
