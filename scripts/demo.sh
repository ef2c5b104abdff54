#!/usr/bin/env bash
# The whole path on scikit-learn's bundled digits: train an MC model, then report what was made.
set -euo pipefail
OUT=${1:-runs/demo}
BIN=.venv/bin
step() { printf '\n== %s\n' "$*"; }

step "1/1 train: resnet18 + multi-center head on digits (4 epochs, CPU)"
$BIN/mcc-train --data digits --arch resnet18 --img-size 32 --epochs 4 --out "$OUT/train" --overwrite
echo "checkpoints, metrics.csv, config.yaml and curves.png are in $OUT/train/"
