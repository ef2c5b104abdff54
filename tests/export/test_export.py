"""mcc-export: the bundle, its proof, and the proof failing when it should."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file

from export import ExportConfig, export_checkpoint, verify_bundle
from export.bundle import sha256_file
from export.cli import main
from export.onnx_graph import export_onnx
from mcc_train.checkpoint import load_checkpoint
from mcc_train.head import MC_DEFAULTS

from ..conftest import make_checkpoint, run_cli

FAST = {"latency_runs": 3, "num_real": 16}


def check_bundle(bundle, arch, in_chans, img_size):
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["README.md", "config.json", "model.json", "model.onnx", "model.safetensors", "parity.json"]
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["format"] == "mcc-bundle" and meta["version"] == 1 and meta["arch"] == arch
    assert meta["input"]["shape"] == [None, in_chans, img_size, img_size] and meta["num_classes"] == 10
    assert meta["files"]["model.onnx"]["sha256"] == sha256_file(bundle / "model.onnx")
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] and not [c for c in parity["checks"] if c["passed"] is False]
    # a user without mcc: timm + safetensors, strict
    model = timm.create_model(
        arch, num_classes=10, in_chans=in_chans, **({"img_size": img_size} if arch.startswith(("vit", "deit")) else {})
    ).eval()
    model.load_state_dict(load_file(bundle / "model.safetensors"), strict=True)
    x = torch.randn(3, in_chans, img_size, img_size)  # batch 3: the batch axis is dynamic
    out = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5, rtol=0)
    return meta, parity


def test_trained_checkpoint_exports_with_real_image_parity(trained_run, tmp_path):
    report = export_checkpoint(ExportConfig(str(trained_run / "best.pt"), str(tmp_path / "b"), **FAST))
    meta, parity = check_bundle(tmp_path / "b", "resnet10t", 1, 16)
    names = {c["name"]: c for c in parity["checks"]}
    assert names["weights: dropped keys"]["detail"] == "dropped ['fc.log_var']"
    assert (
        names["outputs: ORT vs PyTorch (real)"]["passed"]
        and "16 inputs" in names["outputs: ORT vs PyTorch (real)"]["detail"]
    )
    assert names["outputs: vanilla == MC bit for bit (real)"]["passed"]
    assert names["graph: FLOPs"]["passed"] and report.latency["1"]["ratio"] > 0
    ckpt = load_checkpoint(trained_run / "best.pt")
    assert meta["preprocess"]["mean"] == ckpt["data_config"]["mean"] and meta["class_names"] == ckpt["class_names"]
    plain = {"loss": "softmax", "margin": None, "margin_scale": None, "classifier_kind": "linear"}
    assert meta["head"] == {"type": "mc", "classifier": "fc", **MC_DEFAULTS.head_kwargs(), **plain}
    assert meta["model_kwargs"] == {}
    assert meta["source"]["sha256"] == sha256_file(trained_run / "best.pt") and meta["metrics"]["top1"] >= 0
    assert verify_bundle(tmp_path / "b", latency_runs=2).passed  # again, from the files alone


@pytest.mark.parametrize(
    "arch",
    [
        "mobilenetv3_small_100",
        "vit_tiny_patch16_224",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("deit_small_patch16_224", marks=pytest.mark.slow),
    ],
)
def test_archs_export_as_their_vanilla_model(arch, tmp_path):
    ckpt = make_checkpoint(tmp_path / "mc.pt", arch)
    assert export_checkpoint(ExportConfig(str(ckpt), str(tmp_path / "b"), **FAST)).passed
    check_bundle(tmp_path / "b", arch, 3, 32)


def test_relative_sigma_head_with_model_kwargs_exports_as_the_vanilla_model(tmp_path):
    ckpt = make_checkpoint(
        tmp_path / "vit.pt",
        "test_vit",
        img_size=16,
        sigma_mode="relative",
        sigma_scale=0.5,
        model_kwargs={"patch_size": 4},
    )
    report = export_checkpoint(ExportConfig(str(ckpt), str(tmp_path / "b"), **FAST))
    assert report.passed, report.table()
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["model_kwargs"] == {"patch_size": 4} and meta["head"]["sigma_mode"] == "relative"
    vanilla = timm.create_model("test_vit", num_classes=10, img_size=16, patch_size=4).eval()
    vanilla.load_state_dict(load_file(tmp_path / "b" / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 16, 16)
    out = ort.InferenceSession(str(tmp_path / "b" / "model.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, vanilla(x).numpy(), atol=1e-5, rtol=0)
    assert verify_bundle(tmp_path / "b", latency_runs=2).passed


def test_linear_head_checkpoint_exports(tmp_path):
    ckpt = make_checkpoint(tmp_path / "lin.pt", "resnet18", head="linear")
    report = export_checkpoint(ExportConfig(str(ckpt), str(tmp_path / "b"), **FAST))
    assert {c.name: c.detail for c in report.checks}["weights: dropped keys"] == "dropped nothing"


def test_fp16_model_is_written_and_measured(trained_run, tmp_path):
    export_checkpoint(ExportConfig(str(trained_run / "best.pt"), str(tmp_path / "b"), fp16=True, **FAST))
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert (tmp_path / "b" / "model_fp16.onnx").is_file()
    assert 0 < parity["fp16"]["max_abs"] < 0.1 and parity["fp16"]["images"] == 16
    assert 0 <= parity["fp16"]["top1_agreement"] <= 1


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, trained_run):
    out = tmp_path_factory.mktemp("bundle") / "b"
    proc = run_cli("export", trained_run / "best.pt", "--out", out, "--latency-runs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "all checks passed" in proc.stdout and "graph: op sequence" in proc.stdout
    return out


def test_cli_verify_passes_on_an_intact_bundle(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    proc = run_cli("export", "--verify", copy, "--latency-runs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout and "latency (batch 1)" in proc.stdout


def test_one_changed_byte_in_model_onnx_is_rejected(bundle, tmp_path, capsys):
    copy = shutil.copytree(bundle, tmp_path / "b")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    assert main(["--verify", str(copy)]) == 1
    assert "model.onnx" in capsys.readouterr().out.split("FAIL")[0].splitlines()[-1]


def test_edited_model_json_is_rejected(bundle, tmp_path, capsys):
    copy = shutil.copytree(bundle, tmp_path / "b")
    meta = json.loads((copy / "model.json").read_text())
    meta["preprocess"]["mean"] = [0.0]
    (copy / "model.json").write_text(json.dumps(meta))
    assert main(["--verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "edited after export" in out and "VERIFICATION FAILED" in out
    (copy / "parity.json").unlink()  # without the record, the checkpoint still contradicts the edit
    assert main(["--verify", str(copy), "--latency-runs", "1"]) == 1
    assert "model.json disagrees with the checkpoint" in capsys.readouterr().out


def test_a_graph_that_is_not_the_vanilla_one_fails(bundle, tmp_path, capsys):
    """The proof can fail: swap in another network's ONNX (and fix the checksums as a careless tool would)."""
    copy = shutil.copytree(bundle, tmp_path / "b")
    other = timm.create_model("resnet14t", num_classes=10, in_chans=1)
    export_onnx(other, copy / "model.onnx", (1, 16, 16), 18)
    meta = json.loads((copy / "model.json").read_text())
    meta["files"]["model.onnx"]["sha256"] = sha256_file(copy / "model.onnx")
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / "parity.json").unlink()
    assert main(["--verify", str(copy), "--latency-runs", "1"]) == 1
    out = capsys.readouterr().out
    assert "graph: op sequence" in out and "FAIL" in out.split("graph: op sequence")[1].splitlines()[0]


def test_verify_without_the_source_checkpoint(bundle, tmp_path, capsys):
    copy = shutil.copytree(bundle, tmp_path / "b")
    meta = json.loads((copy / "model.json").read_text())
    meta["source"]["checkpoint"] = str(tmp_path / "moved.pt")
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / "parity.json").unlink()
    assert main(["--verify", str(copy), "--latency-runs", "1"]) == 0
    assert "not found; checks against the MC model are skipped" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", "torch-dict"])
def test_bad_checkpoints_get_one_line_exit_2_and_no_bundle(content, tmp_path, capsys, trained_run):
    path = tmp_path / "bad.pt"
    if content == "torch-dict":
        torch.save({"state_dict": {}}, path)
        expected = "not an mcc checkpoint"
    else:
        path.write_bytes(content)
        expected = "not a readable checkpoint"
    assert main([str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_truncated_real_checkpoint_and_existing_out(trained_run, tmp_path, capsys):
    data = (trained_run / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert main([str(tmp_path / "cut.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err and not (tmp_path / "b").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert main([str(trained_run / "last.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "already holds files" in capsys.readouterr().err and (tmp_path / "b" / "keep.txt").read_text() == "mine"
    assert main(["--verify", str(tmp_path / "nope")]) == 2
    assert "no such bundle directory" in capsys.readouterr().err
