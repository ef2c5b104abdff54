"""The bundle as a timm hub artifact (config.json, model card), its file modes, and the export of EMA weights."""

import json
import os
import shutil
import stat

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from timm.data import resolve_data_config

from export import ExportConfig, export_checkpoint, verify_bundle
from export.bundle import sha256_file
from export.cli import main
from export.collapse import collapsed_state_dict, load_trained
from export.exporter import PROVENANCE_KEYS
from mcc_serve.runtime.bundle import read_model_json
from mcc_train import save_checkpoint
from mcc_train.checkpoint import load_checkpoint

from ..conftest import make_checkpoint

FAST = {"latency_runs": 2, "num_real": 8}
# a grayscale digits checkpoint (a CNN that takes any size), and a ViT whose token grid needs img_size and patch_size
ARCHS = {
    "resnet10t-gray": dict(arch="resnet10t", img_size=16, in_chans=1),
    "test_vit-gray": dict(arch="test_vit", img_size=16, in_chans=1, model_kwargs={"patch_size": 4}),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory):
    """(bundle dir, the checkpoint's settings), exported in-process."""
    spec = ARCHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(root / "mc.pt", **spec)
    report = export_checkpoint(ExportConfig(str(ckpt), str(root / "b"), **FAST))
    assert report.passed, report.table()
    return root / "b", spec


def timm_vanilla(spec: dict, **kwargs) -> torch.nn.Module:
    """The vanilla model as a timm user builds it by hand: the arch, its classes, channels and model kwargs."""
    size = {"img_size": spec["img_size"]} if spec["arch"] == "test_vit" else {}
    return timm.create_model(
        spec["arch"], num_classes=10, in_chans=spec["in_chans"], **size, **spec.get("model_kwargs", {}), **kwargs
    ).eval()


def onnx_logits(bundle, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x.numpy()})[0]


def test_timm_local_dir_alone_rebuilds_the_exported_model(exported):
    bundle, spec = exported
    model = timm.create_model(f"local-dir:{bundle}", pretrained=True).eval()
    state = load_file(bundle / "model.safetensors")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(3, spec["in_chans"], spec["img_size"], spec["img_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), onnx_logits(bundle, x), atol=1e-5, rtol=0)
    pre = read_model_json(bundle)["preprocess"]
    data_config = resolve_data_config({}, model=model)
    assert tuple(data_config["input_size"]) == tuple(pre["input_size"]) == (spec["in_chans"], 16, 16)
    assert [list(data_config[k]) for k in ("mean", "std")] == [pre["mean"], pre["std"]]
    assert [data_config[k] for k in ("interpolation", "crop_pct", "crop_mode")] == [
        pre["interpolation"],
        pre["crop_pct"],
        pre["crop_mode"],
    ]
    assert model.pretrained_cfg["label_names"] == [str(i) for i in range(10)]


def test_config_json_is_what_timm_save_for_hf_writes(exported, tmp_path):
    bundle, spec = exported
    vanilla = timm_vanilla(spec)
    vanilla.load_state_dict(load_file(bundle / "model.safetensors"), strict=True)
    pre = read_model_json(bundle)["preprocess"]
    timm.models.save_for_hf(
        vanilla, tmp_path, model_config={"label_names": [str(i) for i in range(10)]}, data_config=pre
    )
    config, timms = json.loads((bundle / "config.json").read_text()), json.loads((tmp_path / "config.json").read_text())
    dropped = {k: timms["pretrained_cfg"].pop(k) for k in PROVENANCE_KEYS if k in timms["pretrained_cfg"]}
    assert "tag" in dropped and not set(PROVENANCE_KEYS) & set(config["pretrained_cfg"])  # the arch's own weights'
    assert config == timms
    assert config["architecture"] == spec["arch"] and config["model_args"]["in_chans"] == 1
    if spec["arch"] == "test_vit":
        assert config["model_args"]["patch_size"] == 4 and config["model_args"]["img_size"] == [16, 16]


def test_bundle_weights_serve_as_a_local_pretrained_file(exported):
    """What fine-tuning from a bundle does: the arch's own pretrained loading, pointed at model.safetensors."""
    bundle, spec = exported
    overlay = dict(file=str(bundle / "model.safetensors"), num_classes=10)
    model = timm_vanilla(spec, pretrained=True, pretrained_cfg_overlay=overlay)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), onnx_logits(bundle, x), atol=1e-5, rtol=0)


def test_model_card_quotes_the_proof_and_loads_as_a_hub_card(exported):
    bundle, spec = exported
    card = ModelCard.load(bundle / "README.md")  # a local path: nothing is downloaded
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert {"image-classification", "mcc", "timm"} <= set(card.data.tags)
    text = card.text
    parity = json.loads((bundle / "parity.json").read_text())
    worst = max(r["max_abs"] for r in parity["outputs"].values())
    assert "**Passed**" in text and f"{worst:.2e} (tolerance 1e-05)" in text
    assert f"ratio against the vanilla timm export (batch 1): {parity['latency']['1']['ratio']:.3f}" in text
    for check in parity["checks"]:
        assert f"| {check['name']} | {'passed' if check['passed'] else 'info'} |" in text
    assert "| top1 | 10 |" in text and f"`{spec['arch']}`" in text and "| training data | `digits` |" in text
    assert 'timm.create_model("local-dir:b", pretrained=True)' in text
    assert 'session.run(["logits"], {"input": x})' in text and 'convert("L")' in text
    assert "mcc-serve b" in text
    # documentation, not part of the proof: editing it leaves the bundle valid
    (bundle / "README.md").write_text(card.content + "\nLicence: mine.\n")
    assert "README.md" not in read_model_json(bundle)["files"]
    assert verify_bundle(bundle, latency_runs=1).passed


def test_verify_checks_config_json_against_model_json(exported, tmp_path, capsys):
    bundle, _ = exported
    copy = shutil.copytree(bundle, tmp_path / "b")
    config = json.loads((copy / "config.json").read_text())
    config["label_names"][0] = "zero"
    config["pretrained_cfg"]["mean"] = [0.1]
    (copy / "config.json").write_text(json.dumps(config))
    meta = json.loads((copy / "model.json").read_text())
    meta["files"]["config.json"]["sha256"] = sha256_file(copy / "config.json")  # as a careless tool would
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / "parity.json").unlink()
    assert main(["--verify", str(copy), "--latency-runs", "1"]) == 1
    line = capsys.readouterr().out.split("config.json: fields")[1].splitlines()[0]
    assert "FAIL" in line and "label_names, pretrained_cfg.mean" in line


def test_a_bundle_without_config_json_still_reads_and_verifies(exported, tmp_path, capsys):
    """A bundle of an older mcc-export: no config.json, no source.weights."""
    bundle, _ = exported
    copy = shutil.copytree(bundle, tmp_path / "b")
    (copy / "config.json").unlink()
    (copy / "parity.json").unlink()
    meta = json.loads((copy / "model.json").read_text())
    del meta["files"]["config.json"], meta["source"]["weights"]
    (copy / "model.json").write_text(json.dumps(meta))
    assert read_model_json(copy)["source"]["weights"] == "model"
    assert main(["--verify", str(copy), "--latency-runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "config.json" in out and "absent (an older mcc-export)" in out and "all checks passed" in out


@pytest.mark.parametrize(
    "umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)], ids=["umask022", "umask077"]
)
def test_checkpoint_and_bundle_modes_follow_the_umask(umask, dir_mode, file_mode, tmp_path):
    old = os.umask(umask)
    try:
        ckpt = make_checkpoint(tmp_path / "mc.pt", "resnet10t", img_size=16, in_chans=1)  # mcc_train.save_checkpoint
        save_checkpoint(load_checkpoint(ckpt), tmp_path / "again.pt")  # replacing a file: the same mode
        export_checkpoint(ExportConfig(str(ckpt), str(tmp_path / "out" / "b"), latency_runs=1, num_real=4))
    finally:
        os.umask(old)
    assert stat.S_IMODE(ckpt.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "again.pt").stat().st_mode) == file_mode
    bundle = tmp_path / "out" / "b"
    assert stat.S_IMODE(bundle.stat().st_mode) == dir_mode
    files = list(bundle.iterdir())
    assert len(files) == 6 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {file_mode}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pt", "mc.pt", "out"]  # no temporary left over


def with_ema(path, seed: int = 1):
    """Add a perturbed copy of the model's weights as ``model_ema`` (what mcc-train --model-ema stores)."""
    ckpt = load_checkpoint(path)
    gen = torch.Generator().manual_seed(seed)
    ckpt["model_ema"] = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in ckpt["model"].items()
    }
    ckpt["metrics_ema"] = {"top1": 12.5}
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")}, path)
    return path


def test_ema_export_holds_the_collapsed_ema_weights(tmp_path, capsys):
    ckpt = with_ema(make_checkpoint(tmp_path / "mc.pt", "resnet10t", img_size=16, in_chans=1))
    assert main([str(ckpt), "--out", str(tmp_path / "b"), "--ema", "--latency-runs", "1"]) == 0
    assert "config.json" in capsys.readouterr().out
    bundle = load_file(tmp_path / "b" / "model.safetensors")
    ema = collapsed_state_dict(load_trained(ckpt, "ema").model)
    raw = collapsed_state_dict(load_trained(ckpt).model)
    assert bundle.keys() == ema.keys() and "fc.log_var" not in bundle
    assert all(torch.equal(bundle[k], ema[k]) for k in ema)
    assert not torch.equal(bundle["fc.weight"], raw["fc.weight"])
    meta = read_model_json(tmp_path / "b")
    assert meta["source"]["weights"] == "ema" and meta["metrics"] == {"top1": 12.5}
    assert "exponential moving average (EMA)" in (tmp_path / "b" / "README.md").read_text()
    report = verify_bundle(tmp_path / "b", latency_runs=1)  # against the source's EMA weights
    checks = {c.name: c for c in report.checks}
    assert report.passed and checks["weights: values"].passed and "EMA weights" in checks["source checkpoint"].detail


def test_ema_export_of_a_checkpoint_without_ema_is_refused(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "mc.pt", "resnet10t", img_size=16, in_chans=1)
    assert main([str(ckpt), "--out", str(tmp_path / "b"), "--ema"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mcc-export: error: {ckpt} has no EMA weights; train with --model-ema"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc.pt"]
