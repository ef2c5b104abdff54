"""mcc-eval and mcc-predict: the numbers a user quotes and the CSV a user reads, on real files."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from export import ExportConfig, export_checkpoint
from export.eval_cli import main as eval_main
from mcc_serve.predict_cli import main as predict_main
from mcc_serve.runtime.engine import softmax
from mcc_serve.runtime.preprocess import Preprocessor

from ..conftest import PYTHON, REPO, make_imagefolder

DIGIT_PIXELS = np.round(load_digits().images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), as mcc_train.data
REPORT = ["confusion.png", "metrics.json", "misclassified.csv", "per_class.csv"]


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "bundle"
    export_checkpoint(ExportConfig(str(trained_run / "best.pt"), str(out), latency_runs=2, num_real=8))
    return out


@pytest.fixture(scope="module")
def bundle_report(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    assert eval_main([str(bundle), "--data", "digits", "--out", str(out), "--workers", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ten digit images as a user has them: PNG and JPEG, grey and colour, in nested folders, and one corrupt."""
    root = tmp_path_factory.mktemp("photos")
    images = DIGIT_PIXELS[:10]  # (10, 8, 8)
    (root / "more" / "deeper").mkdir(parents=True)
    for i, img in enumerate(images):
        folder = root / ["", "more", "more/deeper"][i % 3]
        if i % 2:
            Image.fromarray(img).convert("RGB").resize((24, 24)).save(folder / f"{i}.jpg", quality=95)
        else:
            Image.fromarray(img).save(folder / f"{i}.png")
    (root / "bad.png").write_text("not an image")
    (root / "notes.md").write_text("not an image suffix: not looked at")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_eval_top1_of_bundle_and_checkpoint_equals_the_top1_recorded_at_export(bundle, bundle_report, trained_run):
    recorded = json.loads((bundle / "model.json").read_text())["metrics"]["top1"]
    assert json.loads((bundle_report / "metrics.json").read_text())["top1"] == pytest.approx(recorded, abs=1e-6)
    ckpt_out = bundle_report.parent / "ckpt"
    assert eval_main([str(trained_run / "best.pt"), "--data", "digits", "--out", str(ckpt_out)]) == 0
    assert json.loads((ckpt_out / "metrics.json").read_text())["top1"] == pytest.approx(recorded, abs=1e-6)
    # image by image: the served preprocessing + ONNX give the checkpoint's (timm transform + torch) predictions
    served, trained = read_csv(bundle_report / "misclassified.csv"), read_csv(ckpt_out / "misclassified.csv")
    assert [(r["path"], r["predicted"]) for r in served] == [(r["path"], r["predicted"]) for r in trained]
    np.testing.assert_allclose([float(r["prob"]) for r in served], [float(r["prob"]) for r in trained], atol=2e-6)


def test_eval_report_files_agree_with_each_other(bundle, bundle_report):
    assert sorted(p.name for p in bundle_report.iterdir()) == REPORT
    m = json.loads((bundle_report / "metrics.json").read_text())
    assert (m["model"], m["data"], m["split"], m["n"]) == (str(bundle), "digits", "val", 360)  # 20% of 1797
    assert list(m["topk"]) == ["5"] and m["topk"]["5"] >= m["top1"]
    per_class = read_csv(bundle_report / "per_class.csv")
    assert [r["class"] for r in per_class] == list(m["per_class"]) == [str(i) for i in range(10)]
    assert sum(int(r["support"]) for r in per_class) == m["n"]
    cm = np.array(m["confusion"])
    assert cm.sum() == m["n"] and list(cm.sum(1)) == [m["per_class"][c]["support"] for c in m["per_class"]]
    correct = round(m["top1"] * m["n"] / 100)
    assert np.trace(cm) == correct
    for r in per_class:
        s = m["per_class"][r["class"]]
        assert float(r["recall"]) == pytest.approx(s["recall"], abs=1e-6) and 0 <= s["precision"] <= 1
    wrong = read_csv(bundle_report / "misclassified.csv")
    assert len(wrong) == m["n"] - correct
    assert all(r["true"] != r["predicted"] and r["path"].startswith("val[") for r in wrong)
    probs = [float(r["prob"]) for r in wrong]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
    with Image.open(bundle_report / "confusion.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_eval_prints_accuracy_and_a_per_class_table(bundle, capsys):
    assert eval_main([str(bundle), "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert "top-1 " in out and "top-5 " in out and "precision" in out and "macro avg" in out
    assert len(out.strip().splitlines()) == 2 + 10 + 1  # summary, header, 10 classes, macro average


def test_eval_on_a_folder_lists_misclassified_files_and_matches_the_checkpoint(bundle, trained_run, tmp_path):
    data = tmp_path / "d"  # ROOT/{train,val}/<digit>/*.png: real digits, as files
    target = load_digits().target
    for c in range(10):
        for split, index in zip(("train", "train", "val", "val", "val"), np.flatnonzero(target == c)[:5], strict=True):
            (data / split / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(DIGIT_PIXELS[index]).save(data / split / str(c) / f"{index}.png")
    tops = []
    for model, out in ((bundle, tmp_path / "b"), (trained_run / "best.pt", tmp_path / "c")):
        assert eval_main([str(model), "--data", f"imagefolder:{data}", "--out", str(out)]) == 0
        tops.append(json.loads((out / "metrics.json").read_text())["top1"])
        for row in read_csv(out / "misclassified.csv"):
            assert Path(row["path"]).is_file() and row["path"].startswith(str(data / "val"))
    assert tops[0] == tops[1]
    shutil.rmtree(data / "train")  # a held-out folder with val/ alone evaluates the same
    assert eval_main([str(bundle), "--data", f"imagefolder:{data}", "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["top1"] == tops[0]


def test_eval_refuses_an_unwritable_out_before_any_work(bundle, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert eval_main([str(bundle), "--data", "digits", "--out", str(tmp_path / "file" / "r")]) == 2
    assert "is a file, not a directory" in one_error_line(capsys.readouterr().err, "mcc-eval")


def test_eval_refuses_data_whose_classes_are_not_the_models(bundle, tmp_path, capsys):
    data = make_imagefolder(tmp_path / "pets", per_class=1)  # cat, dog, fish
    assert eval_main([str(bundle), "--data", f"imagefolder:{data}"]) == 2
    assert "are different from the model's (0, 1, 2, 3, 4, ...)" in one_error_line(capsys.readouterr().err, "mcc-eval")
    assert eval_main([str(tmp_path / "nope"), "--data", "digits"]) == 2
    assert "no such bundle directory or checkpoint file" in one_error_line(capsys.readouterr().err, "mcc-eval")


def test_predict_writes_the_top_k_that_onnxruntime_gives_and_skips_unreadable_files(bundle, photos, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert predict_main([str(bundle), str(photos), "--out", str(out), "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "bad.png" in err and "notes.md" not in err
    rows = read_csv(out)
    assert list(rows[0]) == [
        "path",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
        "label_4",
        "prob_4",
        "label_5",
        "prob_5",
    ]
    paths = [r["path"] for r in rows]
    assert len(paths) == 10 and {p.rsplit("/", 1)[-1] for p in paths} == {
        f"{i}.{'jpg' if i % 2 else 'png'}" for i in range(10)
    }
    assert str(photos / "more" / "deeper" / "2.png") in paths  # folders are searched recursively
    probs = np.array([[float(r[f"prob_{j}"]) for j in range(1, 6)] for r in rows])  # (10, 5)
    assert (probs >= 0).all() and (probs <= 1).all() and (np.diff(probs, axis=1) <= 0).all()
    # the same images through onnxruntime directly, preprocessed as mcc-serve does
    meta = json.loads((bundle / "model.json").read_text())
    pre = Preprocessor.from_model_json(meta, max_pixels=10**6)
    x = np.stack([pre.load(Path(p).read_bytes()) for p in paths])  # (10, 1, 16, 16)
    want = softmax(ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0])  # (10, 10)
    top = np.argsort(-want, axis=1, kind="stable")[:, :5]
    assert [[r[f"label_{j}"] for j in range(1, 6)] for r in rows] == [[meta["class_names"][i] for i in t] for t in top]
    np.testing.assert_allclose(probs, np.take_along_axis(want, top, 1), atol=1e-5)


def test_predict_reads_list_files_and_caps_top_k_at_the_classes(bundle, photos, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n{photos / '0.png'}\n\n{photos / 'more'}\n{tmp_path / 'gone.png'}\n")
    assert predict_main([str(bundle), str(listing), "--top-k", "50", "--out", "-"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert len(rows) == 1 + 6 and rows[0]["path"] == str(photos / "0.png")  # 0.png, then more/ (recursive)
    assert list(rows[0]) == ["path"] + [f"{c}_{j}" for j in range(1, 11) for c in ("label", "prob")]  # 10 classes
    assert sorted(rows[0][f"label_{j}"] for j in range(1, 11)) == sorted(str(i) for i in range(10))
    assert "gone.png: no such file or directory (listed in" in captured.err


def test_predict_on_a_bundle_runs_without_torch(bundle, photos, trained_run, tmp_path):
    out = tmp_path / "p.csv"
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from mcc_serve.predict_cli import main\n"
        f"assert main([{str(bundle)!r}, {str(photos / '0.png')!r}, '--out', {str(out)!r}]) == 0\n"
        f"sys.exit(main([{str(trained_run / 'best.pt')!r}, {str(photos)!r}]))\n"
    )
    proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert len(read_csv(out)) == 1
    first, second = proc.stderr.strip().splitlines()  # the bundle's summary, then the checkpoint's refusal
    assert first.startswith("mcc-predict: 1 image -> ")
    assert proc.returncode == 2 and "reading a checkpoint needs torch" in one_error_line(second, "mcc-predict")


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-model", "no such bundle directory or checkpoint file"),
        ("not-a-bundle", "no model.json"),
        ("corrupt-checkpoint", "not a readable checkpoint"),
        ("top-k-0", "--top-k must be >= 1"),
        ("no-images", "no image files in"),
        ("none-readable", "none of the 1 image files could be read"),
        ("out-is-a-directory", "is a directory; give a file name"),
        ("out-under-a-file", "is a file, not a directory"),
    ],
)
def test_predict_bad_input_is_one_line_and_exit_2(case, message, bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    model, paths, extra = str(bundle), [str(tmp_path / "empty")], []
    if case == "no-model":
        model = str(tmp_path / "nope")
    elif case == "not-a-bundle":
        model = str(tmp_path / "empty")
    elif case == "corrupt-checkpoint":
        model = str(tmp_path / "broken.pt")
    elif case == "top-k-0":
        extra = ["--top-k", "0"]
    elif case == "none-readable":
        paths = [str(tmp_path / "bad.png")]
    out = {"out-is-a-directory": tmp_path / "empty", "out-under-a-file": tmp_path / "bad.png" / "p.csv"}.get(
        case, tmp_path / "p.csv"
    )
    assert predict_main([model, *paths, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in one_error_line(err[-1], "mcc-predict")
    assert not out.is_file()  # no partial CSV


def test_ema_weights_evaluate_to_the_top1_the_ema_bundle_records(tmp_path, capsys):
    from mcc_train.cli import main as train_main

    from ..conftest import FAST_TRAIN

    assert train_main([*FAST_TRAIN, "--epochs", "2", "--model-ema", "--out", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "last.pt"
    export_checkpoint(ExportConfig(str(ckpt), str(tmp_path / "b"), latency_runs=2, num_real=8, weights="ema"))
    recorded = json.loads((tmp_path / "b" / "model.json").read_text())["metrics"]["top1"]
    for model, extra in ((tmp_path / "b", []), (ckpt, ["--ema"])):
        assert eval_main([str(model), "--data", "digits", "--out", str(tmp_path / "r"), "--workers", "0", *extra]) == 0
        assert json.loads((tmp_path / "r" / "metrics.json").read_text())["top1"] == pytest.approx(recorded, abs=1e-6)
    capsys.readouterr()
    assert eval_main([str(tmp_path / "b"), "--data", "digits", "--ema"]) == 2
    assert "--ema applies to a checkpoint" in one_error_line(capsys.readouterr().err, "mcc-eval")
