"""benchmarks/accuracy.py: the paired statistics, the run cache, and the quick study end to end."""

import json
import math
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # spawned run processes find the module the same way
import accuracy  # noqa: E402


def test_paired_difference_and_t_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, df=2) = 4.3027 -> half width 4.3027 / sqrt(3) = 2.4841
    c = accuracy.paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert c["n"] == 3 and c["mean"] == 2.0
    assert math.isclose(c["lo"], 2 - 2.48414, abs_tol=1e-4) and math.isclose(c["hi"], 2 + 2.48414, abs_tol=1e-4)
    assert c["verdict"] == "no difference shown"
    assert accuracy.paired([11.0, 11.1, 10.9], [10.0, 10.0, 10.0])["verdict"] == "better"
    assert accuracy.paired([9.0, 8.9, 9.1, 9.0], [10.0, 10.0, 10.0, 10.0])["verdict"] == "worse"
    one = accuracy.paired([11.0], [10.0])
    assert one["mean"] == 1.0 and math.isnan(one["lo"]) and one["verdict"] == "one seed: no interval"


def test_runs_are_keyed_by_what_they_compute():
    cell = accuracy.grid("cpu")[0][0]
    paper = next(v for v in cell.variants if v.name == accuracy.PAPER)
    config = accuracy.run_config(cell, paper, 0)
    key = accuracy.run_key(config)
    assert accuracy.run_key({**config, "out": "elsewhere", "workers": 8, "device": "cuda"}) == key
    assert accuracy.run_key({**config, "mc_preset": None}) == key  # the preset's name is not what is computed
    assert accuracy.run_key({**config, "seed": 1}) != key
    assert accuracy.run_key({**config, "sigma_scale": 0.03}) != key
    linear = accuracy.run_config(cell, accuracy.MAIN[0], 0)
    assert accuracy.run_key({**linear, "sigma_scale": 0.5}) == accuracy.run_key(linear)  # MC settings unused


def test_run_keys_survive_new_and_renamed_config_fields():
    # a run cached before a field existed (or under its old name) keeps its key: only non-default values count
    cell = accuracy.grid("cpu")[0][0]
    config = accuracy.run_config(cell, accuracy.MAIN[1], 0)
    older = {k: v for k, v in config.items() if k not in ("loss", "margin", "margin_scale", "opt", "sched")}
    older["checkpoint_path"] = older.pop("pretrained_file")
    assert accuracy.run_key(older) == accuracy.run_key(config)
    assert accuracy.run_key({**config, "loss": "cosface"}) != accuracy.run_key(config)


def test_table6_pairs_each_margin_variant_with_its_linear_head_and_pins_its_margin():
    cell = accuracy.table6("cpu")[0]
    assert cell.overrides == accuracy.grid("cpu")[0][0].overrides  # the grid's CNN, full data
    by_name = {v.name: v for v in cell.variants}
    for label in ("L-Softmax", "ArcFace", "CosFace"):
        linear, mc = by_name[f"{label} linear"], by_name[f"{label} MC default"]
        assert linear.baseline == accuracy.LINEAR and mc.baseline == linear.name and linear.main and mc.main
    arcface = accuracy.run_config(cell, by_name["ArcFace linear"], 0)
    assert arcface["margin"] is not None and arcface["margin_scale"] is not None  # a later LOSSES change reruns it
    assert accuracy.table6("quick") == []


def test_the_grid_has_both_regimes_both_families_and_the_named_variants():
    cells, _ = accuracy.grid("cpu")
    assert [c.name for c in cells] == ["CNN, full data", "CNN, data-poor", "ViT, full data", "ViT, data-poor"]
    names = {v.name for v in cells[0].variants}
    wanted = ["linear", "MC paper", "MC default", "MC sigma 0.01", "MC local sampling", "MC K=1", "MC K=4"]
    wanted += ["MC without L_sigma", "MC center weight 0.75", "MC + label smoothing", "MC + mixup/cutmix"]
    assert set(wanted) <= names
    assert all(len(accuracy.seeds(v, "cpu")) == 5 for v in accuracy.MAIN)
    poor, full = cells[1].overrides, cells[0].overrides
    assert poor["subset"] == 6000 and poor["epochs"] == 5 * full["epochs"]


@pytest.mark.slow
def test_quick_study_runs_caches_and_reports(tmp_path):
    args = [
        "--quick",
        "--jobs",
        "2",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "r.json"),
        "--docs",
        str(tmp_path / "docs"),
    ]
    accuracy.main(args)
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    distinct = 9 if accuracy.MC_PRESETS["default"] != accuracy.MC_PRESETS["paper"] else 6
    assert len(runs) == distinct and all(0 <= r["top1"] <= 100 for r in runs.values())
    report = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| linear | 3 |" in report and "| MC paper | 3 |" in report and "| MC default | 3 |" in report
    assert any(v in report for v in ("| better |", "| worse |", "| no difference shown |"))
    for png in ("accuracy.png", "scale.png", "centers.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:4] == b"\x89PNG"
    mtime = (tmp_path / "r.json").stat().st_mtime_ns
    accuracy.main(args)  # everything cached: nothing reruns
    assert (tmp_path / "r.json").stat().st_mtime_ns == mtime
