"""TrainConfig as the CLI and YAML files build it: MC presets, model kwargs and their errors."""

import dataclasses

import pytest
import torch
import yaml

from mcc_train import create_model
from mcc_train.cli import main, parse_config
from mcc_train.head import MC_DEFAULTS, MC_PRESETS

PAPER = dataclasses.asdict(MC_PRESETS["paper"])


def mc_fields(cfg) -> dict:
    return dataclasses.asdict(cfg.mc())


def test_defaults_are_mccs_and_the_paper_preset_sets_the_papers_settings():
    assert mc_fields(parse_config([])) == dataclasses.asdict(MC_DEFAULTS)
    assert mc_fields(parse_config(["--mc-preset", "paper"])) == PAPER


def test_single_flags_and_yaml_keys_override_the_preset(tmp_path):
    cfg = parse_config(["--mc-preset", "paper", "--sigma-scale", "0.05"])
    assert mc_fields(cfg) == {**PAPER, "sigma_scale": 0.05}
    (tmp_path / "r.yaml").write_text("mc-preset: paper\nnum-subcenters: 4\n")
    cfg = parse_config(["--config", str(tmp_path / "r.yaml"), "--sampling", "local"])
    assert mc_fields(cfg) == {**PAPER, "num_subcenters": 4, "sampling": "local"}


def test_a_flag_beats_a_yaml_key_whatever_its_spelling(tmp_path):
    (tmp_path / "r.yaml").write_text("sigma-scale: 0.2\nmc-preset: paper\nsampling: local\n")
    cfg = parse_config(["--mc-preset", "paper", "--sigma-scale", "0.05", "--config", str(tmp_path / "r.yaml")])
    assert (cfg.sigma_scale, cfg.sampling) == (0.05, "local")
    assert parse_config(["--config", str(tmp_path / "r.yaml")]).mc_preset == "paper"


def test_a_preset_given_on_resume_replaces_the_resumed_settings(tmp_path):
    from ..conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "c.pt", "resnet10t")
    saved = torch.load(ckpt, weights_only=True)
    saved["config"] |= {"sigma_scale": 0.7, "num_subcenters": 3}
    torch.save(saved, ckpt)
    assert parse_config(["--resume", str(ckpt)]).sigma_scale == 0.7
    assert mc_fields(parse_config(["--resume", str(ckpt), "--mc-preset", "paper"])) == PAPER


def test_model_kwargs_are_parsed_as_yaml_scalars_and_reach_timm(tmp_path):
    cfg = parse_config(["--model-kwargs", "patch_size=4", "qkv_bias=false", "global_pool=avg"])
    assert cfg.model_kwargs == {"patch_size": 4, "qkv_bias": False, "global_pool": "avg"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model_kwargs": {"depth": 2}}))
    assert parse_config(["--config", str(tmp_path / "r.yaml")]).model_kwargs == {"depth": 2}
    model = create_model("test_vit", 10, in_chans=1, img_size=16, patch_size=4, sigma_mode="relative")
    assert model.patch_embed.grid_size == (4, 4) and model.get_classifier().sigma_mode == "relative"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mc-preset", "fancy"], "--mc-preset must be one of paper, default, got 'fancy'"),
        (["--sigma-mode", "proportional"], "--sigma-mode must be one of absolute, relative, got 'proportional'"),
        (["--model-kwargs", "patch_size"], "--model-kwargs: expected KEY=VALUE pairs"),
        (["--model-kwargs", "num_classes=3"], "--model-kwargs may not set num_classes"),
        (["--model-kwargs", "sigma_scale=3"], "--model-kwargs may not set sigma_scale"),
        (["--model-kwargs", "head=linear"], "--model-kwargs may not set head"),
        (["--model-kwargs", "day=2020-01-01"], "--model-kwargs: expected KEY=VALUE pairs"),
    ],
)
def test_bad_mc_and_model_flags_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_kwarg_the_model_does_not_take_is_named(tmp_path, capsys):
    code = main(["--arch", "resnet10t", "--model-kwargs", "patch_size=4", "--out", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unexpected keyword argument 'patch_size'" in err


def test_a_preset_that_is_not_a_name_is_one_line(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("mc_preset: [paper]\n")
    assert main(["--config", str(tmp_path / "r.yaml")]) == 2
    assert "--mc-preset must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [["global_pool=bogus"], ["patch_size=0"], ["embed_dim=65"]])
def test_values_the_model_rejects_are_one_line(kwargs, tmp_path, capsys):
    args = [
        "--arch",
        "test_vit",
        "--img-size",
        "16",
        "--model-kwargs",
        *kwargs,
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test_vit: cannot build it with" in err and "--model-kwargs" in err
