"""The model bundle: model.onnx, model.safetensors, model.json (versioned schema), parity.json.

model.json, version 1:

- ``format``: ``"mcc-bundle"``, ``version``: 1, ``created``: UTC time
- ``arch``, ``num_classes``, ``class_names``, ``in_chans``, ``model_kwargs`` (extra ``timm.create_model``
  arguments, e.g. ``{"patch_size": 4}``; ``{}`` when none)
- ``input``: ``{"name": "input", "shape": [null, C, H, W], "dtype": "float32"}``;
  ``output``: ``{"name": "logits", "shape": [null, num_classes], "dtype": "float32"}``
- ``preprocess``: timm's eval transform: ``input_size`` [C, H, W], ``mean``, ``std``, ``interpolation``,
  ``crop_pct``, ``crop_mode``; resize the shorter side to ``floor(H / crop_pct)``, center-crop H x W, scale to
  [0, 1], normalise
- ``head``: ``type`` (``mc`` | ``linear``), ``classifier`` (module path), ``num_subcenters``, ``center_weight``,
  ``sigma_scale``, ``sigma_mode``, ``sampling`` (the training-time head; the bundle holds only the mean centers)
- ``source``: ``checkpoint`` (absolute path), ``sha256``, ``epoch``; ``metrics``: the eval metrics it recorded
- ``files``: ``{name: {"sha256", "bytes"}}`` for model.onnx, model.safetensors and model_fp16.onnx (with --fp16)
- ``onnx``: ``opset``, ``exporter``, ``torch``, ``timm``, ``onnx`` versions
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mcc_train import UsageError

FORMAT = "mcc-bundle"
VERSION = 1
MODEL_JSON, ONNX_FILE, WEIGHTS_FILE, FP16_FILE, PARITY_JSON = (
    "model.json",
    "model.onnx",
    "model.safetensors",
    "model_fp16.onnx",
    "parity.json",
)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_model_json(bundle: str | Path) -> dict:
    """Read and check model.json, with errors that say what is wrong with the bundle."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise UsageError(f"{bundle}: no such bundle directory")
    path = bundle / MODEL_JSON
    if not path.is_file():
        raise UsageError(f"{bundle}: no {MODEL_JSON}; is this a bundle written by mcc-export?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{path}: not an mcc bundle description (format is not {FORMAT!r})")
    if meta.get("version", 0) > VERSION:
        raise UsageError(f"{path}: bundle version {meta['version']} is newer than this mcc ({VERSION}); upgrade mcc")
    required = ("arch", "num_classes", "class_names", "in_chans", "input", "output", "preprocess", "head", "files")
    missing = [k for k in required if k not in meta]
    if missing:
        raise UsageError(f"{path}: lacks {', '.join(missing)}")
    return meta


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


@contextmanager
def staged_bundle(out: Path, overwrite: bool):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    On any error the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out}: already holds files; pick another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
