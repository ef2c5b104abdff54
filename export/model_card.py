"""The bundle's README.md: a Hugging Face model card that says what the model is, how it was checked, how to run it.

Written from model.json and the proof's report, after the proof, into the staged bundle directory:
``huggingface_hub.upload_folder(folder_path=BUNDLE, ...)`` publishes the bundle with it as it is.
"""

from __future__ import annotations

import math
from pathlib import Path

from mcc_serve.runtime.choices import LOSSES

from .collapse import COSINE_TIMM_CALL
from .proof import MAX_ABS_TOL, Report

MAX_LISTED_CLASSES = 50  # more than this: the first ones, and a pointer to config.json's label_names
TAGS = ("image-classification", "timm", "mcc", "multi-center-classifier", "onnx")
RESULT = {True: "passed", False: "**FAILED**", None: "info"}
WEIGHTS = {"model": "the weights as trained", "ema": "the EMA weights"}
VARIANT_KEYS = ("loss", "margin", "margin_scale", "classifier_kind")  # model.json's head: the softmax variant


def render_model_card(meta: dict, report: Report, bundle_name: str, training_data: str | None = None) -> str:
    """The model card's Markdown, with YAML front matter, for a bundle directory named ``bundle_name``.

    Args:
        meta: the bundle's model.json.
        report: the proof's report (what parity.json records).
        bundle_name: the bundle directory's name, as the usage snippets refer to it.
        training_data: the ``--data`` the model was trained on, e.g. ``digits``; None if unknown.
    """
    sections = [
        front_matter(),
        summary(meta, bundle_name),
        details(meta, training_data),
        training_metrics(meta["metrics"]),
        verification(report, meta),
        usage(meta, bundle_name),
    ]
    return "\n".join(sections)


def front_matter() -> str:
    # NOTE: no `license:`: the weights are the user's, trained on the user's data; the publisher adds one.
    tags = "".join(f"- {t}\n" for t in TAGS)
    return f"---\nlibrary_name: timm\npipeline_tag: image-classification\ntags:\n{tags}---\n"


def summary(meta: dict, bundle_name: str) -> str:
    src = meta["source"]
    which = "exponential moving average (EMA) of the weights" if src["weights"] == "ema" else "weights"
    epoch = f" after epoch {src['epoch']}" if src.get("epoch") is not None else ""
    head = meta["head"]
    trained = "mcc's multi-center (MC) head" if head["type"] == "mc" else "a linear head"
    if LOSSES[head["loss"]].has_margin:
        trained += f" and the {LOSSES[head['loss']].title} loss"
    model = f"the vanilla timm `{meta['arch']}` with a linear classifier"
    if head["classifier_kind"] == "cosine":
        model = f"timm's `{meta['arch']}` with a cosine classifier"
    cosine = (
        f" Its pre-logit features are L2-normalised before the classifier, whose weight rows are the class centers "
        f"scaled to norm s = {head['margin_scale']:g} (bias zero): the logits are s times the cosines."
        if head["classifier_kind"] == "cosine"
        else ""
    )
    collapsed = "collapsed to its mean class centers" if head["type"] == "mc" else "kept as trained"
    return (
        f"# {bundle_name}: {meta['arch']}, {meta['num_classes']} classes\n\n"
        f"A `{meta['arch']}` image classifier trained with {trained} and exported by `mcc-export`: the head is "
        f"{collapsed}, so this **is** {model}, as the verification "
        f"below checks.{cosine} It holds the {which}{epoch} of the training run.\n"
    )


def public_data(spec: str) -> str:
    """A --data spec without the directories above its data folder (a card is meant for publishing):
    ``imagefolder:/home/me/pets`` -> ``imagefolder:pets``."""
    kind, sep, arg = spec.partition(":")
    return f"{kind}:{Path(arg).name}" if sep and arg else spec


def details(meta: dict, training_data: str | None) -> str:
    pre, head = meta["preprocess"], meta["head"]
    size = pre["input_size"][-1]
    scaled = math.floor(size / pre["crop_pct"])  # as timm's eval transform
    resize = f"resize to {scaled}x{scaled}" if pre["crop_mode"] == "squash" else f"resize the shorter side to {scaled}"
    names = [_cell(n) for n in meta["class_names"]]
    listed = ", ".join(f"`{n}`" for n in names[:MAX_LISTED_CLASSES])
    if len(names) > MAX_LISTED_CLASSES:
        listed += f", ... (all {len(names)} in config.json's `label_names`)"
    mc = ", ".join(f"{k}={v}" for k, v in head.items() if k not in ("type", "classifier", *VARIANT_KEYS))
    model_args = ", ".join(f"{k}={v!r}" for k, v in meta["model_kwargs"].items())
    src = meta["source"]
    rows = [
        ("architecture", f"`{meta['arch']}`" + (f" ({model_args})" if model_args else "")),
        ("classes", f"{meta['num_classes']}: {listed}"),
        ("input", f"`{meta['input']['name']}`: float32 (N, {', '.join(map(str, pre['input_size']))})"),
        ("output", f"`{meta['output']['name']}`: float32 (N, {meta['num_classes']}) logits"),
        (
            "preprocessing",
            f"{resize} ({pre['interpolation']}), center crop {size}x{size}, "
            f"scale to [0, 1], mean {_floats(pre['mean'])}, std {_floats(pre['std'])}"
            + (" (grayscale)" if meta["in_chans"] == 1 else " (RGB)"),
        ),
        ("training data", f"`{_cell(public_data(training_data))}`" if training_data else "unknown"),
        ("training head", f"{head['type']}" + (f" ({mc})" if head["type"] == "mc" and mc else "")),
        ("training loss", training_loss(head)),
        ("classifier", classifier(head)),
        (
            "weights",
            f"{WEIGHTS[src['weights']]} of `{_basename(src.get('checkpoint'))}`, sha256 `{_short(src.get('sha256'))}`",
        ),
    ]
    return "## Model details\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def training_loss(head: dict) -> str:
    """The softmax variant and its settings: ``ArcFace (m=0.3, s=16)``."""
    settings = [f"{k}={head[key]:g}" for k, key in (("m", "margin"), ("s", "margin_scale")) if head[key] is not None]
    return LOSSES[head["loss"]].title + (f" ({', '.join(settings)})" if settings else "")


def classifier(head: dict) -> str:
    """What the exported classifier computes on the pre-logit features x."""
    if head["classifier_kind"] == "cosine":
        return f"cosine: `s * normalize(x) @ normalize(W)^T`, s = {head['margin_scale']:g} (model.onnx normalises x)"
    return "linear: `x @ W^T + b`"


def training_metrics(metrics: dict) -> str:
    if not metrics:
        return "## Training metrics\n\nNo evaluation metrics were recorded for these weights.\n"
    rows = "".join(f"| {_cell(k)} | {_number(v)} |\n" for k, v in metrics.items())
    intro = "On the validation split, at the exported epoch."
    return f"## Training metrics\n\n{intro}\n\n| metric | value |\n|---|---|\n{rows}"


def verification(report: Report, meta: dict) -> str:
    failed = [c.name for c in report.checks if c.passed is False]
    cosine = meta["head"]["classifier_kind"] == "cosine"
    baseline = "baseline cosine model's" if cosine else "vanilla timm"
    passed = sum(c.passed is True for c in report.checks)
    lines = [
        "## Verification",
        "",
        f"**{'Passed' if report.passed else 'FAILED'}**: {passed} checks passed, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + ". `mcc-export --verify` re-runs them from the files; `parity.json` holds the full record.",
        "",
    ]
    if report.outputs:
        worst = max(r["max_abs"] for r in report.outputs.values())
        lines.append(f"- max abs difference, onnxruntime vs the PyTorch model: {worst:.2e} (tolerance {MAX_ABS_TOL:g})")
    for batch, r in report.latency.items():
        lines.append(
            f"- latency ratio against the {baseline} export (batch {batch}): {r['ratio']:.3f} "
            f"({r['ours_ms']:.3f} ms vs {r['vanilla_ms']:.3f} ms)"
        )
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {_cell(c.name)} | {RESULT[c.passed]} | {_cell(c.detail)} |" for c in report.checks]
    return "\n".join(lines) + "\n"


def usage(meta: dict, bundle_name: str) -> str:
    pre = meta["preprocess"]
    mode = "L" if meta["in_chans"] == 1 else "RGB"
    transform_args = (
        f"input_size={tuple(pre['input_size'])}, interpolation={pre['interpolation']!r}, "
        f"crop_pct={pre['crop_pct']}, crop_mode={pre['crop_mode']!r}, mean={tuple(pre['mean'])}, "
        f"std={tuple(pre['std'])}"
    )
    timm_intro = "With timm (config.json and model.safetensors; `hf-hub:USER/REPO` once uploaded)"
    onnx_intro = "With onnxruntime (model.onnx; the preprocessing is timm's eval transform, also given in model.json's "
    onnx_intro += "`preprocess`)"
    if meta["head"]["classifier_kind"] == "cosine":
        timm_intro += (
            ". The classifier is a cosine one, which timm builds as a plain linear layer: L2-normalise the pre-logit "
            "features before it, as below (`model(x)` alone skips that; config.json's `cosine_classifier` says so)"
        )
        onnx_intro += ". model.onnx contains the normalisation: onnxruntime and mcc-serve need nothing extra"
        imports = "import timm\nimport torch.nn.functional as F\n"
        logits = f"logits = {COSINE_TIMM_CALL}\nprobs = logits.softmax(-1)"
    else:
        imports, logits = "import timm\n", "probs = model(x).softmax(-1)"
    return f"""## How to use

{timm_intro}:

```python
{imports}from PIL import Image
from timm.data import create_transform, resolve_data_config

model = timm.create_model("local-dir:{bundle_name}", pretrained=True).eval()
transform = create_transform(**resolve_data_config({{}}, model=model))
x = transform(Image.open("image.png").convert("{mode}")).unsqueeze(0)  # (1, {", ".join(map(str, pre["input_size"]))})
{logits}
```

{onnx_intro}:

```python
import onnxruntime as ort
from PIL import Image
from timm.data import create_transform

transform = create_transform({transform_args})
x = transform(Image.open("image.png").convert("{mode}")).unsqueeze(0).numpy()  # float32
session = ort.InferenceSession("{bundle_name}/model.onnx")
logits = session.run(["{meta["output"]["name"]}"], {{"{meta["input"]["name"]}": x}})[0]  # (1, {meta["num_classes"]})
```

As an HTTP service (dynamic batching, Open Inference Protocol, metrics):

```bash
mcc-serve {bundle_name}
```
"""


def _floats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _cell(str(v))


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _basename(path: str | None) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else "unknown"


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "unknown"
