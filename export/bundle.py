"""The model bundle on disk, written atomically into a staged directory.

The bundle's file names and model.json's schema live in ``mcc_serve.runtime.bundle`` (torch-free, shared with
the server, which documents every file): the exporter writes through it and ``mcc-export --verify`` reads through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from mcc_serve.runtime import bundle as schema
from mcc_serve.runtime.bundle import (
    CONFIG_JSON,
    FP16_FILE,
    INT8_FILE,
    MODEL_JSON,
    ONNX_FILE,
    PARITY_JSON,
    README_FILE,
    WEIGHTS_FILE,
)
from mcc_train import UsageError

__all__ = [  # the file names come from the schema module, so writer and readers share them
    "CONFIG_JSON",
    "FP16_FILE",
    "INT8_FILE",
    "MODEL_JSON",
    "ONNX_FILE",
    "PARITY_JSON",
    "README_FILE",
    "WEIGHTS_FILE",
    "file_record",
    "read_model_json",
    "sha256_file",
    "staged_bundle",
    "write_json",
]


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

    On any error the temporary directory is removed and ``out`` is untouched. The directory and the files written
    into it get the modes any new directory and file get (0o777 and 0o666 less the umask), so a bundle written under
    umask 022 is readable by other users, such as a container's non-root user.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out}: already holds files; pick another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: not tempfile.mkdtemp, which makes it 0o700 whatever the umask. os.mkdir(0o777) lets the kernel apply the
    # umask (or the parent's default ACL) as it does for any directory; reading the umask instead (os.umask(0) then
    # os.umask(old)) would change it for every thread of the process in between. The random name and mkdir, which
    # fails on an existing path, give a directory nobody else is using.
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    tmp.mkdir(mode=0o777)
    file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # 0o666 less the umask, as the kernel just applied it
    try:
        yield tmp
        # writers that make their files 0o600 (safetensors does) get the mode any new file gets
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(file_mode)
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
