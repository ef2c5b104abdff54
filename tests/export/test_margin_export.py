"""mcc-export for the softmax variants: L-Softmax bundles are the vanilla linear model, CosFace/ArcFace bundles the
baseline cosine model (timm with its pre-logits L2-normalised), and the proof holds and fails as it should."""

import io
import json
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from export.bundle import sha256_file
from export.cli import main
from export.onnx_graph import count_flops, export_onnx, graph_signature
from mcc_serve.main import create_app
from mcc_serve.runtime import bundle as schema
from mcc_serve.runtime.choices import CLASSIFIER_KINDS, LOSSES
from mcc_serve.runtime.preprocess import Preprocessor
from mcc_serve.settings import ServeSettings
from mcc_train.checkpoint import load_checkpoint
from mcc_train.cli import main as train_main

from ..conftest import FAST_TRAIN

pytestmark = pytest.mark.slow  # six trainings and exports

# every variant with either head; one trains at s = 10, where s * cos and normalize(x) . (s w) round differently
RUNS = {
    ("lsoftmax", "mc"): [],
    ("lsoftmax", "linear"): [],
    ("cosface", "mc"): [],
    ("cosface", "linear"): ["--margin-scale", "10"],
    ("arcface", "mc"): [],
    ("arcface", "linear"): [],
}
IDS = [f"{loss}-{head}" for loss, head in RUNS]


class NormalizedLinear(torch.nn.Linear):
    """The baseline cosine classifier written out here, independent of mcc: normalise, then timm's linear layer."""

    def forward(self, x):
        return F.linear(F.normalize(x, dim=1), self.weight, self.bias)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    """(loss, head) -> (checkpoint, bundle): each trained 1 epoch on digits by mcc-train and exported by mcc-export,
    whose exit status 0 says the proof passed (in-process: 6 runs, so the interpreter starts once)."""
    out = {}
    for (loss, head), extra in RUNS.items():
        root = tmp_path_factory.mktemp(f"{loss}-{head}")
        ckpt, bundle = root / "run" / "best.pt", root / "b"
        assert (
            train_main(
                [*FAST_TRAIN, "--epochs", "1", "--loss", loss, "--head", head, *extra, "--out", str(root / "run")]
            )
            == 0
        )
        assert main([str(ckpt), "--out", str(bundle), "--latency-runs", "1"]) == 0
        out[loss, head] = (ckpt, bundle)
    return out


def timm_logits(bundle, x: torch.Tensor) -> np.ndarray:
    """The bundle's function rebuilt by a timm user: the arch, a strict load of model.safetensors, and for a cosine
    classifier the pre-logits L2-normalised."""
    meta = json.loads((bundle / "model.json").read_text())
    model = timm.create_model(meta["arch"], num_classes=meta["num_classes"], in_chans=meta["in_chans"]).eval()
    model.load_state_dict(load_file(bundle / "model.safetensors"), strict=True)
    with torch.no_grad():
        if meta["head"]["classifier_kind"] == "cosine":
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            return model.get_classifier()(F.normalize(features, dim=1)).numpy()
        return model(x).numpy()


def onnx_logits(bundle, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x.numpy()})[0]


def checks(bundle) -> dict:
    return {c["name"]: c for c in json.loads((bundle / "parity.json").read_text())["checks"]}


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_every_variant_exports_with_the_proof_passed(bundles, run):
    _, bundle = bundles[run]
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] and not [c for c in parity["checks"] if c["passed"] is False]
    assert parity["outputs"]["real"]["max_abs"] <= 1e-5 and parity["outputs"]["real"]["top1_agreement"] == 1.0


def test_mcc_export_verify_passes_again_from_the_files(bundles, capsys):
    _, bundle = bundles["arcface", "mc"]  # a cosine MC bundle; the linear kinds' proof is the one tests/export runs
    assert main(["--verify", str(bundle), "--latency-runs", "1"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "all checks passed" in out and "(sha256 matches)" in out


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_plain_timm_and_the_bundle_weights_give_the_onnx_logits(bundles, run):
    _, bundle = bundles[run]
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(timm_logits(bundle, x), onnx_logits(bundle, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_model_json_and_weights_say_which_classifier(bundles, run):
    ckpt_path, bundle = bundles[run]
    loss, head = run
    meta = json.loads((bundle / "model.json").read_text())
    cosine = LOSSES[loss].cosine
    scale = 10.0 if run == ("cosface", "linear") else 16.0
    assert meta["head"]["type"] == head and meta["head"]["loss"] == loss
    assert meta["head"]["margin"] == LOSSES[loss].margin
    assert meta["head"]["classifier_kind"] == ("cosine" if cosine else "linear")
    assert meta["head"]["margin_scale"] == (scale if cosine else None)
    state = load_file(bundle / "model.safetensors")
    weight, bias = state["fc.weight"], state["fc.bias"]
    trained = load_checkpoint(ckpt_path)["model"]
    config = json.loads((bundle / "config.json").read_text())
    if cosine:  # rows of norm s along the mean centers, a zero bias the checkpoint does not have
        torch.testing.assert_close(weight.norm(dim=1), torch.full((10,), scale), rtol=1e-5, atol=0)
        torch.testing.assert_close(weight, scale * F.normalize(trained["fc.weight"], dim=1), rtol=1e-5, atol=0)
        assert not bias.any() and "fc.bias" not in trained
        assert config["cosine_classifier"]["scale"] == scale and "F.normalize" in config["cosine_classifier"]["usage"]
    else:  # L-Softmax: the trained weight and bias as they are
        assert torch.equal(weight, trained["fc.weight"]) and torch.equal(bias, trained["fc.bias"])
        assert "cosine_classifier" not in config
    names = checks(bundle)
    assert names["weights: dropped keys"]["detail"] == (
        f"dropped {['fc.log_var'] if head == 'mc' else 'nothing'}" + (", added ['fc.bias'] (zero)" if cosine else "")
    )
    assert ("weights: cosine classifier" in names) == cosine
    equal_check = "outputs: baseline cosine == MC (real)" if cosine else "outputs: vanilla == MC bit for bit (real)"
    assert names[equal_check]["passed"]


def test_cosine_graph_is_the_baseline_cosine_model_exported_the_same_way(bundles, tmp_path):
    _, bundle = bundles["arcface", "mc"]
    baseline = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    baseline.fc = NormalizedLinear(baseline.fc.in_features, 10)
    baseline.load_state_dict(load_file(bundle / "model.safetensors"), strict=True)
    export_onnx(baseline.eval(), tmp_path / "baseline.onnx", (1, 16, 16), 18)
    ours, theirs = onnx.load(str(bundle / "model.onnx")), onnx.load(str(tmp_path / "baseline.onnx"))
    assert graph_signature(ours) == graph_signature(theirs) and count_flops(ours) == count_flops(theirs)
    ops = graph_signature(ours)["ops"]
    # the feature normalisation (F.normalize: x / max(||x||, eps)) sits right before the classifier
    assert {"ReduceL2", "Div"} <= set(ops) and ops[-1] == "Gemm"
    linear_ops = graph_signature(onnx.load(str(bundles["lsoftmax", "mc"][1] / "model.onnx")))["ops"]
    assert "ReduceL2" not in linear_ops and linear_ops[-1] == "Gemm" and ops != linear_ops
    names = checks(bundle)
    assert names["graph: op sequence"]["passed"] and "baseline cosine" in names["graph: FLOPs"]["detail"]


def test_a_cosine_bundle_holding_the_raw_mean_centers_fails(bundles, tmp_path, capsys):
    """Tampering the proof catches: the classifier swapped for the unnormalised mean centers, checksums fixed."""
    ckpt_path, bundle = bundles["cosface", "mc"]
    copy = shutil.copytree(bundle, tmp_path / "b")
    state = load_file(copy / "model.safetensors")
    state["fc.weight"] = load_checkpoint(ckpt_path)["model"]["fc.weight"].clone()
    save_file(state, str(copy / "model.safetensors"))
    meta = json.loads((copy / "model.json").read_text())
    meta["files"]["model.safetensors"]["sha256"] = sha256_file(copy / "model.safetensors")
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / "parity.json").unlink()
    assert main(["--verify", str(copy), "--latency-runs", "1"]) == 1
    out = capsys.readouterr().out
    failed = {line.split("  FAIL")[0].strip() for line in out.splitlines() if "  FAIL  " in line}
    assert {"weights: cosine classifier", "weights: values", "config.json: local-dir model"} <= failed


def test_cosine_bundle_card_tells_timm_users_to_normalise(bundles):
    _, bundle = bundles["arcface", "linear"]
    card = (bundle / "README.md").read_text()
    assert "with a cosine classifier" in card and "| training loss | ArcFace (m=0.3, s=16) |" in card
    assert "F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=1)" in card
    assert "onnxruntime and mcc-serve need nothing extra" in card
    assert "F.normalize" not in (bundles["lsoftmax", "linear"][1] / "README.md").read_text()


def test_mcc_serve_answers_a_cosine_bundle_unchanged(bundles):
    _, bundle = bundles["cosface", "linear"]
    pngs = []
    for img in load_digits().images[:4]:
        buf = io.BytesIO()
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    with TestClient(create_app(ServeSettings(bundle=str(bundle)))) as client:
        deadline = time.time() + 60
        while client.get("/v2/health/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)  # warming up
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
        r = client.post("/v1/predict?top_k=1", files=files)
    assert r.status_code == 200, r.text
    pre = Preprocessor.from_model_json(json.loads((bundle / "model.json").read_text()), 10**8)
    logits = timm_logits(bundle, torch.from_numpy(np.stack([pre.load(p) for p in pngs])))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for pred, p in zip(r.json()["predictions"], probs, strict=True):
        assert pred["top_k"][0]["index"] == int(p.argmax()) and abs(pred["top_k"][0]["probability"] - p.max()) < 1e-5


def test_model_json_schema_knows_the_variants_and_reads_older_bundles(bundles):
    meta = json.loads((bundles["cosface", "mc"][1] / "model.json").read_text())
    for name, kind in LOSSES.items():  # every variant of the registry, with its classifier and no other
        head = {**meta["head"], "loss": name, "margin": kind.margin, "margin_scale": kind.scale}
        assert schema.validate_model_json({**meta, "head": {**head, "classifier_kind": kind.classifier_kind}})
        (other,) = set(CLASSIFIER_KINDS) - {kind.classifier_kind}
        with pytest.raises(schema.BundleError, match=f"classifier_kind '{other}' does not fit loss '{name}'"):
            schema.validate_model_json({**meta, "head": {**head, "classifier_kind": other}})
    older = json.loads(json.dumps(meta))
    for key in ("loss", "margin", "margin_scale", "classifier_kind"):
        del older["head"][key]
    head = schema.validate_model_json(older)["head"]
    assert [head[k] for k in ("loss", "classifier_kind", "margin", "margin_scale")] == ["softmax", "linear", None, None]
    for edit, message in [
        ({"classifier_kind": "linear"}, "head: classifier_kind 'linear' does not fit loss 'cosface'"),
        ({"margin_scale": None}, "head: loss 'cosface' needs margin_scale"),
        ({"loss": "sphereface"}, "head.loss: Input should be"),
    ]:
        with pytest.raises(schema.BundleError, match=message):
            schema.validate_model_json({**meta, "head": {**meta["head"], **edit}})
