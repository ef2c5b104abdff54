#!/usr/bin/env bash
# The whole path on scikit-learn's bundled digits: train an MC model, export and verify it, serve it, query it.
set -euo pipefail
OUT=${1:-runs/demo}
BIN=.venv/bin
PORT=${MCC_DEMO_PORT:-8765}
step() { printf '\n== %s\n' "$*"; }

step "1/3 train: resnet18 + multi-center head on digits (5 epochs, CPU)"
$BIN/mcc-train --data digits --arch resnet18 --img-size 32 --epochs 5 --out "$OUT/train" --overwrite

step "2/3 export: collapse to the mean head, write ONNX, prove it is a vanilla timm resnet18; evaluate the bundle"
$BIN/mcc-export "$OUT/train/best.pt" --out "$OUT/bundle" --overwrite
$BIN/mcc-eval "$OUT/bundle" --data digits --workers 0   # the served path: the top-1 model.json recorded

step "3/3 serve: mcc-serve on 127.0.0.1:$PORT, then real digit images over HTTP"
$BIN/mcc-serve "$OUT/bundle" --port "$PORT" --log-level warning > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
$BIN/python - "$PORT" <<'PY'
import io, sys, time
import httpx, numpy as np
from PIL import Image
from mcc_train.data import load_data

url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.2)
else:
    sys.exit("mcc-serve did not become ready; see the serve.log next to the bundle")
val = load_data("digits").val  # the held-out split: images the model never trained on
picks = [0, 60, 120, 180, 240, 300]
files = []
for i in picks:
    buf = io.BytesIO()
    Image.fromarray(val.images[i]).save(buf, format="PNG")
    files.append(("files", (f"digit_{i}.png", buf.getvalue(), "image/png")))
r = httpx.post(f"{url}/v1/predict?top_k=2", files=files, timeout=30)
r.raise_for_status()
print(f"POST {url}/v1/predict?top_k=2 with {len(picks)} PNG digits:")
for i, pred in zip(picks, r.json()["predictions"]):
    top = ", ".join(f"{t['label']} ({t['probability']:.2f})" for t in pred["top_k"])
    print(f"  val digit_{i}.png  true {val.labels[i]}  predicted {top}")
meta = httpx.get(f"{url}/v2/models/resnet18").json()
print(f"GET {url}/v2/models/resnet18: input {meta['inputs'][0]['shape']}, output {meta['outputs'][0]['shape']}")
PY
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
trap - EXIT
printf '\ndemo done: checkpoints in %s/train, the verified bundle in %s/bundle\n' "$OUT" "$OUT"
