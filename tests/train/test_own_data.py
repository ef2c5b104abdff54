"""A user's own image folder: recursive classes, mixed colour modes, bad files, 16-bit images, failed starts."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mcc_serve.runtime.preprocess import Preprocessor
from mcc_serve.runtime.preprocess import to_8bit as serve_to_8bit
from mcc_train import UsageError
from mcc_train.checkpoint import load_checkpoint
from mcc_train.cli import main
from mcc_train.data import FolderDataset, load_data, to_8bit

from ..conftest import make_imagefolder


def folder_args(root, out, *extra):
    model = ["--arch", "resnet10t", "--img-size", "16", "--batch-size", "4", "--workers", "0", "--no-progress"]
    return [*model, "--epochs", "1", "--data", f"imagefolder:{root}", "--out", str(out), *map(str, extra)]


def test_class_folders_are_searched_recursively(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=2, mode="L")
    nested = root / "train" / "cat" / "2026" / "march"
    nested.mkdir(parents=True)
    Image.new("L", (20, 20), 30).save(nested / "deep.png")
    splits = load_data(f"imagefolder:{root}")
    files = [str(p) for p, _ in splits.train.samples]
    assert str(nested / "deep.png") in files and len(files) == 7
    (root / "val" / "fish" / "0.png").unlink()
    (root / "val" / "fish" / "1.png").unlink()
    (root / "val" / "fish" / "notes").mkdir()  # a sub-folder, but no image anywhere in the class
    with pytest.raises(UsageError, match=f"no readable images in class folder {root / 'val' / 'fish'}"):
        load_data(f"imagefolder:{root}")


@pytest.mark.parametrize("position", ["first", "last"])
def test_one_colour_image_anywhere_makes_the_data_colour(tmp_path, position):
    root = make_imagefolder(tmp_path / "d", per_class=3, mode="L")
    name = {"first": "cat/0.png", "last": "fish/2.png"}[position]
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(root / "train" / name)
    splits = load_data(f"imagefolder:{root}")
    assert not splits.grayscale and "1 of 18 images are colour" in splits.channels_note
    assert load_data(f"imagefolder:{make_imagefolder(tmp_path / 'g', mode='L')}").grayscale


def test_the_channel_decision_is_in_the_start_line_and_in_chans_overrides(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "d", per_class=2, mode="L")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(root / "val" / "dog" / "colour.png")
    assert main(folder_args(root, tmp_path / "a")) == 0
    assert "in_chans 3 (1 of 13 images are colour, e.g." in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "a" / "last.pt")["in_chans"] == 3
    assert main(folder_args(root, tmp_path / "b", "--in-chans", "1")) == 0
    assert load_checkpoint(tmp_path / "b" / "last.pt")["in_chans"] == 1
    assert "in_chans 1 (--in-chans)" in capsys.readouterr().err


def test_every_bad_file_is_reported_at_start_or_skipped(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "d", per_class=3)
    bad_train = root / "train" / "cat" / "notes.jpg"
    bad_train.write_text("not an image")
    bad_val = root / "val" / "dog" / "2.png"
    bad_val.write_bytes(bad_val.read_bytes()[:70])  # a valid header, truncated pixels: found before epoch 1
    out = tmp_path / "o"
    assert main(folder_args(root, out)) == 2
    log = capsys.readouterr().err
    err = log.strip().splitlines()
    assert err[-1].startswith("mcc-train: error: --data") and "2 unreadable image file(s)" in err[-1]
    assert "--skip-bad-images" in err[-1]
    assert f"unreadable image: {bad_train}" in log and f"unreadable image: {bad_val}" in log  # all, at once
    assert not out.exists()  # a failed start leaves no empty --out

    assert main(folder_args(root, out, "--skip-bad-images")) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["skip_bad_images"] is True
    assert sorted(saved["skipped_images"]) == sorted([str(bad_train), str(bad_val)])
    assert main(["--config", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0  # reads back


def test_a_failed_start_never_mixes_a_new_config_with_older_checkpoints(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=2)
    out = tmp_path / "o"
    assert main(folder_args(root, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(folder_args(root, out, "--overwrite", "--arch", "resnet_nope")) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def sixteen_bit_pair(tmp_path):
    """The same picture as a 16-bit PNG and as its 8-bit copy."""
    x = np.random.default_rng(0).integers(0, 256, (24, 24)).astype(np.uint8)
    Image.fromarray(x).save(tmp_path / "eight.png")
    Image.fromarray(x.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I;16")
    return tmp_path / "eight.png", tmp_path / "sixteen.png", x


def test_16_bit_images_are_their_8_bit_copies_in_training_and_serving(tmp_path):
    eight, sixteen, x = sixteen_bit_pair(tmp_path)
    for mode in ("L", "RGB"):
        data = FolderDataset([(eight, 0), (sixteen, 0)], mode=mode)
        assert np.array_equal(np.asarray(data[0][0]), np.asarray(data[1][0]))
    assert np.array_equal(np.asarray(data[1][0])[..., 0], x)
    pre = Preprocessor(1, 16, (0.5,), (0.25,), "bicubic", 1.0)
    assert np.array_equal(pre.load(eight.read_bytes()), pre.load(sixteen.read_bytes()))
    # the two packages' rules agree on every 16-bit value and on floats
    ramp = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
    assert np.array_equal(np.asarray(to_8bit(ramp)), np.asarray(serve_to_8bit(ramp)))
    floats = Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    assert np.array_equal(np.asarray(to_8bit(floats)), np.asarray(serve_to_8bit(floats)))
    assert np.asarray(to_8bit(floats)).max() == 255


def test_a_16_bit_folder_trains_like_its_8_bit_copy(tmp_path):
    roots = []
    for bits in (8, 16):
        root = tmp_path / f"b{bits}"
        for split in ("train", "val"):
            for c in range(2):
                folder = root / split / f"c{c}"
                folder.mkdir(parents=True)
                for i in range(4):
                    x = np.full((20, 20), 40 + 150 * c + 5 * i, np.uint8)
                    Image.fromarray(x if bits == 8 else x.astype(np.uint16) * 257).save(folder / f"{i}.png")
        roots.append(root)
    for root in roots:
        assert main(folder_args(root, tmp_path / root.name)) == 0
    a, b = (load_checkpoint(tmp_path / r.name / "last.pt") for r in roots)
    assert a["in_chans"] == b["in_chans"] == 1
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_a_train_image_truncated_past_its_header_is_skipped_with_the_flag(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "d", per_class=3)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header reads; the pixels do not
    assert main(folder_args(root, tmp_path / "a")) == 2
    assert "pass --skip-bad-images" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(folder_args(root, tmp_path / "b", "--skip-bad-images", "--epochs", "2")) == 0
    assert capsys.readouterr().err.count(f"skipping unreadable image: {bad}") == 1  # once, not every epoch
