"""The benchmark's stack floor (benchmarks/stack_floor.py) does the work mcc-serve does for an answer: the same
top-1 classes for real images, one-image and multi-image requests alike. Else its throughput would be no floor."""

import importlib.util
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from mcc_serve.runtime.engine import Engine
from mcc_serve.runtime.preprocess import Preprocessor

from ..conftest import REPO
from .test_app import client_for


def load_floor():
    spec = importlib.util.spec_from_file_location("stack_floor", REPO / "benchmarks" / "stack_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stack_floor_answers_the_top1_mcc_serve_gives(bundle, digit_pngs):
    digits, _ = digit_pngs
    rng = np.random.default_rng(0)
    noise = []  # of several sizes: the short-trained test model calls most digits one class
    for k in range(20):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8 + k, 8 + 2 * k), dtype=np.uint8)).save(buf, format="PNG")
        noise.append(buf.getvalue())
    pngs = [*digits, *noise]
    files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    serve = client_for(bundle)
    try:
        want = [p["top_k"][0]["index"] for p in serve.post("/v1/predict?top_k=1", files=files).json()["predictions"]]
    finally:
        serve.__exit__(None, None, None)
    with TestClient(load_floor().make_app(str(bundle), max_batch_size=4)) as floor:  # runs its lifespan
        one_each = [floor.post("/", files=[f]).json()["predictions"][0]["index"] for f in files]
        together = [p["index"] for p in floor.post("/", files=files).json()["predictions"]]
    # images whose top two logits are apart: batch size and softmax rounding cannot swap their order
    engine = Engine.load(bundle)
    pre = Preprocessor.from_model_json(engine.meta, 10**8)
    top2 = np.sort(engine.run(np.stack([pre.load(p) for p in pngs])), axis=1)[:, -2:]  # (N, 2)
    clear = np.flatnonzero(top2[:, 1] - top2[:, 0] > 1e-3)
    assert len(want) == len(pngs) and len(clear) >= len(pngs) // 2 and len({want[i] for i in clear}) >= 2
    assert [one_each[i] for i in clear] == [want[i] for i in clear]
    assert [together[i] for i in clear] == [want[i] for i in clear]
