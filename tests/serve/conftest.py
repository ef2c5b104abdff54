"""Serving fixtures: one real bundle, apps on it, and a real uvicorn process on a free port."""

import io
import os
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ..conftest import PYTHON, REPO


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, trained_run):
    """The trained digits model (resnet10t, 1x16x16 input, MC head) exported by mcc-export."""
    from export import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("serve") / "bundle"
    export_checkpoint(ExportConfig(str(trained_run / "best.pt"), str(out), latency_runs=1, num_real=4))
    return out


@pytest.fixture(scope="session")
def digit_pngs():
    """Real images: 40 digits from scikit-learn, as PNG bytes, with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pngs = []
    for img in d.images[:40]:
        buf = io.BytesIO()
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, d.target[:40]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "mcc_serve", str(bundle), "--port", str(self.port), "--log-level", "warning", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mcc-serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("mcc-serve did not become ready in 120 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(bundle):
    srv = Server(bundle, "--max-batch-size", "16", "--max-delay-ms", "5")
    yield srv
    srv.stop()
