"""The model bundle on disk: model.onnx, model.safetensors, model.json and parity.json, written atomically.

model.json's schema lives in ``mcc_serve.bundle`` (torch-free, shared with the server): the exporter writes
through it and ``mcc-export --verify`` reads through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mcc_serve import bundle as schema
from mcc_train import UsageError

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
    """Read model.json and check it against the bundle schema, with errors that say what is wrong."""
    try:
        return schema.read_model_json(bundle)
    except schema.BundleError as e:
        raise UsageError(str(e)) from None


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
