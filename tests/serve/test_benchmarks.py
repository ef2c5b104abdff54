"""The benchmark's stack floor (benchmarks/stack_floor.py) does the work mcc-serve does for an answer: the same
top-1 classes for real images, one-image and multi-image requests alike. Else its throughput would be no floor."""

import importlib.util
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from ..conftest import REPO
from .test_app import client_for


def load_floor():
    spec = importlib.util.spec_from_file_location("stack_floor", REPO / "benchmarks" / "stack_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stack_floor_answers_the_top1_mcc_serve_gives(bundle, digit_pngs):
    pngs, _ = digit_pngs
    rng = np.random.default_rng(0)
    for k in range(20):  # noise of several sizes: the short-trained test model calls most digits one class
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8 + k, 8 + 2 * k), dtype=np.uint8)).save(buf, format="PNG")
        pngs = [*pngs, buf.getvalue()]
    files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    serve = client_for(bundle)
    try:
        want = [p["top_k"][0]["index"] for p in serve.post("/v1/predict?top_k=1", files=files).json()["predictions"]]
    finally:
        serve.__exit__(None, None, None)
    assert len(want) == 60 and len(set(want)) >= 2
    with TestClient(load_floor().make_app(str(bundle), max_batch_size=4)) as floor:  # runs its lifespan
        one_each = [floor.post("/", files=[f]).json()["predictions"] for f in files]
        together = floor.post("/", files=files).json()["predictions"]
    assert [p[0]["index"] for p in one_each] == want
    assert [p["index"] for p in together] == want
