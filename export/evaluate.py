"""mcc-eval's work: a bundle or a checkpoint on a split of a ``--data`` set -> top-1, top-5, per-class precision,
recall and F1, and the confusion matrix.

A bundle is evaluated as it is served: its ONNX model in onnxruntime, each image preprocessed by mcc-serve's
``Preprocessor`` from model.json (an image file from its bytes, an in-memory image from its pixels). A checkpoint
is evaluated as training evaluated it: its torch model in eval mode with timm's eval transform. On the data a model
was trained on, both give the top-1 recorded in the checkpoint and in model.json's ``metrics`` (for EMA weights,
``--ema`` on the checkpoint, the checkpoint's ``metrics_ema``, which an ``mcc-export --ema`` bundle records).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mcc_serve.runtime.bundle import BundleError
from mcc_serve.runtime.choices import DEVICES, MAX_IMAGE_PIXELS, PRECISIONS
from mcc_serve.runtime.engine import softmax
from mcc_serve.runtime.offline import InputError, check_output, is_bundle, load_file, preprocess_batches
from mcc_serve.runtime.preprocess import Preprocessor
from mcc_serve.runtime.service import Model, load_bundle, top_k
from mcc_train import UsageError
from mcc_train.checkpoint import atomic_write
from mcc_train.data import ArrayDataset, FolderDataset, build_transforms, load_data

from .collapse import load_trained

SPLITS = ("val", "train")
TOP_K = 5  # the second accuracy reported, when the model has more classes than this
REPORT_FILES = ("metrics.json", "per_class.csv", "confusion.png", "misclassified.csv")


@dataclass
class EvalConfig:
    model: str  # a bundle directory or an mcc-train checkpoint
    data: str  # a --data spec, as mcc-train takes
    split: str = "val"
    out: str | None = None  # directory for the report files; None: print only
    batch_size: int = 64
    device: str = "auto"
    workers: int = 2  # threads that decode and preprocess images
    skip_bad_images: bool = False
    progress: bool = True
    weights: str = "model"  # of a checkpoint: "model", or "ema" (its EMA weights)
    precision: str = "fp32"  # of a bundle: which of its ONNX files (fp32, fp16, int8) runs

    def validate(self) -> EvalConfig:
        checks = [
            (self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}"),
            (
                self.weights == "model" or not Path(self.model).is_dir(),
                "--ema applies to a checkpoint; a bundle holds the weights it was exported with",
            ),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (
                self.precision == "fp32" or Path(self.model).is_dir(),
                "--precision applies to a bundle (its model_fp16.onnx or model_int8.onnx); a checkpoint runs in fp32",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.out is not None:
            try:
                check_output(self.out, "dir")
            except InputError as e:
                raise UsageError(str(e)) from None
        return self


@dataclass
class EvalResult:
    class_names: list[str]
    names: list[str]  # each image: its file, or SPLIT[INDEX] for in-memory data
    labels: np.ndarray  # (N,) true class indices
    probs: np.ndarray  # (N, C) softmax of the model's logits


def torch_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def load_checkpoint_model(
    path: str | Path, device: str = "auto", max_pixels: int = MAX_IMAGE_PIXELS, weights: str = "model"
) -> Model:
    """A checkpoint's model (the MC head's mean centers: the exported model), preprocessing as its bundle would.
    ``weights="ema"``: its EMA weights (mcc-train --model-ema), as ``mcc-export --ema`` exports them."""
    loaded = load_trained(path, weights)
    dev = torch_device(device)
    net = loaded.model.to(dev)
    data_config = dict(loaded.ckpt["data_config"])

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(x).to(dev)).float().cpu().numpy()  # (N, C, H, W) -> (N, num_classes)

    pre = Preprocessor.from_model_json({"preprocess": data_config}, max_pixels)
    return Model(str(path), list(loaded.ckpt["class_names"]), pre, run, meta={"preprocess": data_config})


def served_loader(dataset: ArrayDataset | FolderDataset, pre: Preprocessor) -> Callable[[int], np.ndarray]:
    """Item i -> (C, H, W) as mcc-serve preprocesses it: a file from its bytes, an in-memory image from its pixels."""
    if isinstance(dataset, FolderDataset):
        return lambda i: load_file(pre, dataset.samples[i][0])
    return lambda i: pre(pre.decode(Image.fromarray(dataset.images[i])))


def transformed_loader(dataset: ArrayDataset | FolderDataset, model: Model) -> Callable[[int], np.ndarray]:
    """Item i -> (C, H, W) through timm's eval transform, as mcc-train evaluated."""
    _, eval_tf = build_transforms(model.meta["preprocess"], hflip=0.0, scale=(1.0, 1.0))
    dataset.transform, dataset.mode = eval_tf, "L" if model.preprocess.in_chans == 1 else "RGB"
    return lambda i: dataset[i][0].numpy()


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run the model over every image of the split (UsageError on bad input)."""
    try:
        bundle = is_bundle(cfg.model)
        if bundle:
            model = load_bundle(cfg.model, cfg.device, precision=cfg.precision)
        else:
            model = load_checkpoint_model(cfg.model, cfg.device, weights=cfg.weights)
    except (BundleError, InputError) as e:
        raise UsageError(str(e)) from None
    splits = load_data(cfg.data, skip_bad_images=cfg.skip_bad_images, only=cfg.split)  # a test folder needs no train/
    check_classes(splits.class_names, model, cfg.data)
    dataset = getattr(splits, cfg.split)
    load = served_loader(dataset, model.preprocess) if bundle else transformed_loader(dataset, model)

    n = len(dataset)
    probs = np.empty((n, model.num_classes), np.float32)  # (N, C)
    bar = tqdm(total=n, desc=f"eval {cfg.split}", unit="img", disable=None if cfg.progress else True, leave=False)
    with bar:
        for batch in preprocess_batches(range(n), load, cfg.batch_size, cfg.workers):
            if batch.skipped:
                raise UsageError(f"{batch.skipped[0]}; remove or replace it")
            probs[batch.items] = softmax(model.run(batch.x))
            bar.update(len(batch.items))
    if isinstance(dataset, FolderDataset):
        names = [str(path) for path, _ in dataset.samples]
    else:
        names = [f"{cfg.split}[{i}]" for i in range(n)]
    return EvalResult(list(model.class_names), names, np.asarray(dataset.labels, np.int64), probs)


def check_classes(data_classes: list[str], model: Model, spec: str) -> None:
    if data_classes == model.class_names:
        return

    def preview(names: list[str]) -> str:
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

    how = "in another order" if sorted(data_classes) == sorted(model.class_names) else "different"
    raise UsageError(
        f"--data {spec}: its classes ({preview(data_classes)}) are {how} from the model's "
        f"({preview(model.class_names)}); evaluate on data with the classes the model was trained on"
    )


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarize(result: EvalResult, cfg: EvalConfig) -> dict:
    """metrics.json: accuracies in percent (as mcc-train logs them), per-class scores in [0, 1]."""
    n, num_classes = result.probs.shape
    cm = confusion_matrix(result.labels, result.probs.argmax(1), num_classes)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)  # each (C,)
    precision = np.divide(tp, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(num_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=precision + recall > 0)
    topk = {}
    if num_classes > TOP_K:
        index, _ = top_k(result.probs, TOP_K)  # (N, k)
        topk[str(TOP_K)] = 100 * int((index == result.labels[:, None]).any(1).sum()) / n
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(result.class_names, precision, recall, f1, support, strict=True)
    }
    return {
        "model": cfg.model,
        "data": cfg.data,
        "split": cfg.split,
        "n": n,
        "top1": 100 * int(tp.sum()) / n,
        "topk": topk,
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def format_report(metrics: dict) -> str:
    """The accuracies on one line, then per class: precision, recall, F1, support."""
    accuracy = [f"top-1 {metrics['top1']:.2f}%"] + [f"top-{k} {v:.2f}%" for k, v in metrics["topk"].items()]
    width = max(8, *(len(name) for name in metrics["per_class"]))
    lines = [
        f"{metrics['model']} on {metrics['data']} {metrics['split']} ({metrics['n']} images): {'  '.join(accuracy)}",
        f"{'class':<{width}}  precision  recall     f1  support",
    ]
    rows = [*metrics["per_class"].items(), ("macro avg", {**metrics["macro"], "support": metrics["n"]})]
    for name, s in rows:
        lines.append(f"{name:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  {s['support']:7d}")
    return "\n".join(lines)


def write_report(result: EvalResult, metrics: dict, out: str | Path) -> None:
    """metrics.json, per_class.csv, confusion.png and misclassified.csv in ``out`` (created), each written whole."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    rows = [[name, s["precision"], s["recall"], s["f1"], s["support"]] for name, s in metrics["per_class"].items()]
    write_csv(out / "per_class.csv", ["class", "precision", "recall", "f1", "support"], rows)
    preds = result.probs.argmax(1)  # (N,)
    wrong = np.flatnonzero(preds != result.labels)
    wrong = wrong[np.argsort(-result.probs[wrong, preds[wrong]], kind="stable")]  # the most confident first
    rows = [
        [result.names[i], result.class_names[result.labels[i]], result.class_names[preds[i]], result.probs[i, preds[i]]]
        for i in wrong
    ]
    write_csv(out / "misclassified.csv", ["path", "true", "predicted", "prob"], rows)
    plot_confusion(np.asarray(metrics["confusion"]), result.class_names, metrics["top1"], out / "confusion.png")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[f"{v:.6f}" if isinstance(v, float | np.floating) else v for v in row] for row in rows])
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def plot_confusion(cm: np.ndarray, class_names: list[str], top1: float, path: Path) -> None:
    """The confusion matrix normalised per true class (each row sums to 1), cells annotated up to 30 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    support = cm.sum(1, keepdims=True)  # (C, 1)
    norm = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)  # (C, C)
    c = len(class_names)
    side = min(4 + 0.35 * c, 30)
    fontsize = max(4, min(10, 300 / c))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(c), class_names, fontsize=fontsize)
    if c <= 30:
        for (i, j), v in np.ndenumerate(norm):
            if v > 0:
                color = "white" if v > 0.5 else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize - 2, color=color)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion, normalised per true class (top-1 {top1:.2f}%)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def predict_loader(path: str, device: str = "auto", weights: str = "model") -> Model:
    """mcc-predict's loader for a checkpoint (the ``mcc.model_loaders`` entry point), its errors in mcc-predict's
    terms."""
    try:
        return load_checkpoint_model(path, device, weights=weights)
    except UsageError as e:
        raise InputError(str(e)) from None
