"""mcc-export --int8: the quantized model, its recorded accuracy, its proof, and serving it."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import ExportConfig, export_checkpoint, verify_bundle
from export.cli import main as export_main
from export.eval_cli import main as eval_main

FAST = {"latency_runs": 3, "num_real": 16}


@pytest.fixture(scope="module")
def int8_bundle(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    cfg = ExportConfig(str(trained_run / "best.pt"), str(out), int8=True, calibration_images=64, **FAST)
    report = export_checkpoint(cfg)
    assert report.passed
    return out


def test_the_int8_model_is_quantized_and_its_accuracy_is_recorded_beside_fp32s(int8_bundle):
    meta = json.loads((int8_bundle / "model.json").read_text())
    assert "model_int8.onnx" in meta["files"]
    graph = onnx.load(str(int8_bundle / "model_int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}  # QDQ
    weights = [i for i in graph.initializer if i.data_type == 3]
    assert weights and any(len(w.dims) == 4 for w in weights)  # int8 conv weights
    scales = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert scales  # per-channel: a scale per output channel
    parity = json.loads((int8_bundle / "parity.json").read_text())["int8"]
    assert parity["calibration_images"] == 64 and parity["val_images"] == 360  # all of digits' val split
    assert parity["top1_fp32"] == pytest.approx(meta["metrics"]["top1"], abs=1e-6)  # the fp32 model as trained
    assert abs(parity["top1_int8"] - parity["top1_fp32"]) <= 3.0
    low, high = parity["top1_change_ci95"]  # paired by image, around the measured change
    assert low <= parity["top1_int8"] - parity["top1_fp32"] <= high
    assert parity["proof"]["top1_agreement"] >= 0.9 and parity["proof"]["images"] == 256


def test_mcc_eval_on_the_int8_model_gives_the_recorded_top1(int8_bundle, capsys):
    parity = json.loads((int8_bundle / "parity.json").read_text())["int8"]
    assert eval_main([str(int8_bundle), "--data", "digits", "--precision", "int8", "--workers", "0"]) == 0
    assert f"top-1 {parity['top1_int8']:.2f}%" in capsys.readouterr().out
    assert eval_main([str(int8_bundle), "--data", "digits", "--precision", "int8", "--ema"]) == 2
    assert "--ema applies to a checkpoint" in capsys.readouterr().err


def test_verify_checks_the_int8_model_and_catches_a_swapped_file(int8_bundle, tmp_path):
    report = verify_bundle(int8_bundle, latency_runs=2)
    names = {c.name: c.passed for c in report.checks}
    assert names["file model_int8.onnx"] and names["int8 model: top-1 agreement"]
    swapped = tmp_path / "swapped"
    shutil.copytree(int8_bundle, swapped)
    shutil.copy(swapped / "model.onnx", swapped / "model_int8.onnx")  # an fp32 file where the int8 one was
    assert export_main(["--verify", str(swapped), "--latency-runs", "2"]) == 1


def test_int8_needs_its_training_data_and_a_bundle_without_it_is_refused(trained_run, tmp_path, capsys):
    from mcc_train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained_run / "best.pt")
    ckpt["config"]["data"] = f"imagefolder:{tmp_path / 'gone'}"
    save_checkpoint(ckpt, tmp_path / "moved.pt")
    assert export_main([str(tmp_path / "moved.pt"), "--out", str(tmp_path / "b"), "--int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcc-export: error: --int8 calibrates on the training images") and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_mcc_serve_runs_the_int8_model(int8_bundle):
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    from ..serve.test_app import client_for

    pngs = []
    for img in load_digits().images[:8]:
        buf = io.BytesIO()
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    client = client_for(int8_bundle, precision="int8")
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:8])]
    answer = client.post("/v1/predict?top_k=10", files=files)
    assert answer.status_code == 200
    client.__exit__(None, None, None)
    from mcc_serve.runtime.preprocess import Preprocessor

    meta = json.loads((int8_bundle / "model.json").read_text())
    pre = Preprocessor.from_model_json(meta, 10**8)
    x = np.stack([pre.load(p) for p in pngs[:8]])
    direct = ort.InferenceSession(str(int8_bundle / "model_int8.onnx")).run(None, {"input": x})[0]
    names = meta["class_names"]
    for row, result in zip(direct, answer.json()["predictions"], strict=True):
        assert result["top_k"][0]["label"] == names[int(row.argmax())]
