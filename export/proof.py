"""The proof that a bundle is its baseline timm model: files, timm config, weights, graph, outputs; each check passes
or fails, and ``Report`` records it beside what ``measure`` reports (latency, the fp16 and int8 models).

The baseline is the vanilla timm model for a linear classifier (softmax, L-Softmax), and for a cosine one (CosFace,
ArcFace) the baseline cosine model: the same with its classifier a ``CosineLinear``, which L2-normalises the
pre-logit features (``collapse.vanilla_model``). ``verify_bundle(bundle_dir)`` re-derives every claim from the
files; nothing is taken from parity.json.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mcc_serve.runtime.bundle import BundleError
from mcc_serve.runtime.engine import check_graph as check_served_graph
from mcc_serve.runtime.session import create_session
from mcc_train import UsageError

from .bundle import (
    CONFIG_JSON,
    FP16_FILE,
    INT8_FILE,
    MODEL_JSON,
    ONNX_FILE,
    PARITY_JSON,
    WEIGHTS_FILE,
    read_model_json,
    sha256_file,
)
from .collapse import (
    COSINE_CONFIG_KEY,
    LoadedCheckpoint,
    cosine_config,
    cosine_logits,
    head_variant,
    load_trained,
    vanilla_model,
)
from .images import preprocessed
from .measure import agreement, fp16_report, measure_latency
from .onnx_graph import INPUT_NAME, count_flops, export_onnx, graph_signature

_logger = logging.getLogger("export")
MAX_ABS_TOL = 1e-5
# a weak model has near-ties that quantization noise flips, so int8 is held to fp32's class on most images, not all
INT8_MIN_AGREEMENT = 0.90
INT8_CHECK_IMAGES = 256  # val images the proof (mcc-export and --verify) compares the two models on


@dataclass
class Check:
    name: str
    passed: bool | None  # None: information only (or skipped), never a failure
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # per input kind: max_abs, top1_agreement, inputs
    latency: dict = field(default_factory=dict)
    fp16: dict = field(default_factory=dict)
    int8: dict = field(default_factory=dict)  # top-1 agreement with fp32 on real images (the proof's check)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def add(self, name: str, passed: bool | None, detail: str) -> bool | None:
        self.checks.append(Check(name, passed, detail))
        _logger.debug("%s: %s (%s)", name, passed, detail)
        return passed

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "outputs": self.outputs,
            "latency": self.latency,
            "fp16": self.fp16,
            "int8": self.int8,
        }

    def table(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "info"}
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
        lines += [f"{c.name.ljust(width)}  {mark[c.passed]:<6}  {c.detail}" for c in self.checks]
        lines.append(f"\n{'all checks passed' if self.passed else 'VERIFICATION FAILED'}")
        return "\n".join(lines)


def real_images(meta: dict, ckpt: dict | None, count: int) -> tuple[torch.Tensor | None, str]:
    """Up to ``count`` validation images of the training data, preprocessed as model.json says."""
    if ckpt is None:
        return None, "no source checkpoint, so no training data"
    spec = ckpt["config"].get("data", "")
    try:
        images, _ = preprocessed(meta, spec, "val", count)
    except UsageError as e:
        return None, f"training data unavailable ({e})"
    return images, f"{len(images)} val images of {spec}"


def verify_bundle(
    bundle: str | Path, checkpoint: str | Path | None = None, *, num_real: int = 32, latency_runs: int = 50
) -> Report:
    """Check every claim the bundle makes; see module docstring. Raises UsageError only for unreadable input."""
    bundle = Path(bundle)
    meta = read_model_json(bundle)
    report = Report()
    if not check_files(report, bundle, meta):
        return report  # the rest would prove things about files that are not the exported ones
    loaded = load_source(report, meta, checkpoint)
    if loaded is not None:
        check_metadata(report, meta, loaded)
    check_timm_config(report, bundle, meta)
    baseline = check_weights(report, bundle, meta, loaded)
    if baseline is None:
        return report
    exported = onnx.load(str(bundle / ONNX_FILE))
    input_size = tuple(meta["preprocess"]["input_size"])
    with tempfile.TemporaryDirectory() as tmp:
        reference_path = Path(tmp) / "baseline.onnx"
        # NOTE: the reference carries the bundle's weights too: the exporter's optimizer folds and deduplicates
        # constants by value, so only equal weights make equal graphs comparable.
        export_onnx(baseline, reference_path, input_size, exported.opset_import[0].version)
        check_graph(report, exported, onnx.load(str(reference_path)), meta)
        images = check_outputs(report, bundle, meta, loaded, baseline, num_real)
        check_latency(report, bundle / ONNX_FILE, reference_path, input_size, latency_runs, baseline_name(meta))
    if (bundle / FP16_FILE).is_file() and images is not None:
        check_fp16(report, bundle, images)
    if INT8_FILE in meta["files"]:
        check_int8(report, bundle, meta, loaded)
    return report


def baseline_name(meta: dict) -> str:
    """What the proof compares the bundle with, in its reports: the vanilla timm model or the baseline cosine model."""
    return "baseline cosine" if meta["head"]["classifier_kind"] == "cosine" else "vanilla"


def check_files(report: Report, bundle: Path, meta: dict) -> bool:
    """Integrity: the files are the ones model.json describes, model.json the one parity.json saw."""
    for name, record in meta["files"].items():
        path = bundle / name
        if not path.is_file():
            report.add(f"file {name}", False, "missing")
        elif sha256_file(path) != record["sha256"]:
            report.add(f"file {name}", False, "sha256 differs from model.json: the file changed after export")
        else:
            report.add(f"file {name}", True, f"sha256 {record['sha256'][:12]}… matches model.json")
    parity_path = bundle / PARITY_JSON
    if parity_path.is_file():
        recorded = json.loads(parity_path.read_text()).get("model_json_sha256")
        same = recorded == sha256_file(bundle / MODEL_JSON)
        report.add("file model.json", same, "unchanged since export" if same else "edited after export")
    return report.passed


def load_source(report: Report, meta: dict, checkpoint: str | Path | None) -> LoadedCheckpoint | None:
    """The source checkpoint's model (the weights the bundle says it holds), when it is still there and unchanged."""
    source = meta["source"]
    ckpt_path = Path(checkpoint) if checkpoint else Path(source.get("checkpoint") or "")
    if not checkpoint and not ckpt_path.is_file():
        report.add("source checkpoint", None, "not found; checks against the MC model are skipped")
        return None
    if not ckpt_path.is_file():
        raise UsageError(f"--source {ckpt_path}: no such file")
    if sha256_file(ckpt_path) != source.get("sha256"):
        report.add("source checkpoint", None, f"{ckpt_path} changed since export; MC-side checks skipped")
        return None
    loaded = load_trained(ckpt_path, source["weights"])
    which = "; its EMA weights" if source["weights"] == "ema" else ""
    report.add("source checkpoint", None, f"{ckpt_path} (sha256 matches{which})")
    return loaded


def check_metadata(report: Report, meta: dict, loaded: LoadedCheckpoint) -> None:
    """model.json's arch, classes, preprocessing and head against the source checkpoint."""
    ck, dc = loaded.ckpt, loaded.ckpt["data_config"]
    variant = head_variant(ck["config"])
    fields_ok = (
        (meta["arch"], meta["num_classes"], meta["in_chans"], meta["class_names"])
        == (ck["arch"], ck["num_classes"], ck["in_chans"], ck["class_names"])
        and all(meta["preprocess"][k] == dc[k] for k in ("mean", "std", "interpolation", "crop_pct"))
        and meta["head"]["type"] == ck["head"]
        and all(meta["head"][k] == v for k, v in variant.items())
    )
    report.add(
        "metadata",
        fields_ok,
        "model.json agrees with the checkpoint"
        if fields_ok
        else "model.json disagrees with the checkpoint (arch, classes, preprocessing, head or loss)",
    )


def check_timm_config(report: Report, bundle: Path, meta: dict) -> None:
    """config.json (timm's hub config) says what model.json says, and timm rebuilds the exported model from it.

    A bundle of an older mcc-export has no config.json: reported, not a failure.
    """
    path = bundle / CONFIG_JSON
    if not path.is_file():
        report.add("config.json", None, "absent (an older mcc-export); timm cannot load the bundle by local-dir:")
        return
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.add("config.json: fields", False, f"not valid JSON ({e})")
        return
    differ = timm_config_differences(config if isinstance(config, dict) else {}, meta)
    report.add(
        "config.json: fields",
        not differ,
        f"disagrees with model.json: {', '.join(differ)}"
        if differ
        else "arch, classes, label names, in_chans, model_args and preprocessing agree with model.json",
    )
    cosine = meta["head"]["classifier_kind"] == "cosine"
    try:
        model = timm.create_model(f"local-dir:{bundle}", pretrained=True).eval()
        x = torch.randn(8, *meta["preprocess"]["input_size"], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = (cosine_logits(model, x) if cosine else model(x)).numpy()
    except Exception as e:  # whatever timm raises on a config it cannot build or weights that do not fit
        report.add("config.json: local-dir model", False, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
        return
    err = float(np.abs(create_session(bundle / ONNX_FILE).run(None, {INPUT_NAME: x.numpy()})[0] - logits).max())
    how = ", pre-logits L2-normalised," if cosine else ""
    report.add(
        "config.json: local-dir model",
        err <= MAX_ABS_TOL,
        f"timm.create_model('local-dir:BUNDLE', pretrained=True){how} against model.onnx: max-abs {err:.2e}",
    )


def timm_config_differences(config: dict, meta: dict) -> list[str]:
    """Names of the config.json fields that disagree with model.json (empty: they agree)."""
    pretrained, args = config.get("pretrained_cfg") or {}, config.get("model_args") or {}
    expected = {
        "architecture": (config.get("architecture"), meta["arch"]),
        "num_classes": ((config.get("num_classes"), pretrained.get("num_classes")), (meta["num_classes"],) * 2),
        "label_names": (config.get("label_names"), meta["class_names"]),
        "model_args.in_chans": (args.get("in_chans", 3), meta["in_chans"]),
        COSINE_CONFIG_KEY: (config.get(COSINE_CONFIG_KEY), cosine_config(meta["head"])),
    }
    for key, value in meta["model_kwargs"].items():
        expected[f"model_args.{key}"] = (_json_size(key, args.get(key)), _json_size(key, value))
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
        expected[f"pretrained_cfg.{key}"] = (pretrained.get(key), meta["preprocess"][key])
    return [name for name, (ours, theirs) in expected.items() if ours != theirs]


def _json_size(key: str, value):
    """``img_size`` as timm records it ([H, W]); other values as JSON reads them."""
    if key == "img_size" and isinstance(value, int):
        return [value, value]
    return json.loads(json.dumps(value))


def check_weights(report: Report, bundle: Path, meta: dict, loaded: LoadedCheckpoint | None) -> torch.nn.Module | None:
    """model.safetensors is a strict vanilla timm state_dict: the source's test-time weights.

    Returns:
        The baseline model (``collapse.vanilla_model``) with the bundle's weights, or None when they do not load (the
        rest is then moot).
    """
    arch, head = meta["arch"], meta["head"]
    input_size = meta["preprocess"]["input_size"]
    baseline = vanilla_model(
        arch, meta["num_classes"], meta["in_chans"], input_size[-1], meta["model_kwargs"], head["classifier_kind"]
    )
    state = load_file(bundle / WEIGHTS_FILE)
    try:
        baseline.load_state_dict(state, strict=True)
        report.add("weights: strict load", True, f"{WEIGHTS_FILE} loads with strict=True into timm {arch}")
    except RuntimeError as e:
        report.add("weights: strict load", False, str(e).splitlines()[0][:150])
        return None
    if head["classifier_kind"] == "cosine":
        check_cosine_classifier(report, state, head)
    if loaded is not None:
        check_source_weights(report, state, baseline, loaded)
    return baseline


def check_cosine_classifier(report: Report, state: dict[str, torch.Tensor], head: dict) -> None:
    """A cosine classifier as model.json describes it: every weight row of norm s, the bias zero (from the files)."""
    weight, bias = state[f"{head['classifier']}.weight"], state[f"{head['classifier']}.bias"]
    s = head["margin_scale"]
    deviation = float((weight.norm(dim=1) / s - 1).abs().max())
    ok = deviation <= 1e-5 and not bias.any()
    report.add(
        "weights: cosine classifier",
        ok,
        f"{len(weight)} weight rows of norm s = {s:g} (relative deviation {deviation:.1e}), "
        + ("bias zero" if not bias.any() else "bias not zero"),
    )


def test_time_weights(loaded: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The weights the bundle must hold, from the checkpoint's by the method's rules rather than the exporter's code:
    less ``log_var``; for a cosine classifier ``s * normalize(W)`` row by row and a zero bias."""
    state = dict(loaded.model.state_dict())
    state.pop(f"{loaded.classifier}.log_var", None)
    variant = head_variant(loaded.ckpt["config"])
    if variant["classifier_kind"] == "cosine":
        weight = state[f"{loaded.classifier}.weight"]  # (C, d) mean centers
        state[f"{loaded.classifier}.weight"] = variant["margin_scale"] * F.normalize(weight, dim=1)
        state[f"{loaded.classifier}.bias"] = torch.zeros(len(weight), dtype=weight.dtype)  # (C,)
    return state


def check_source_weights(
    report: Report, state: dict[str, torch.Tensor], baseline: torch.nn.Module, loaded: LoadedCheckpoint
) -> None:
    """The bundle's weights are the checkpoint's test-time weights (``test_time_weights``): count, keys, values."""
    expected = test_time_weights(loaded)
    cosine = head_variant(loaded.ckpt["config"])["classifier_kind"] == "cosine"
    trained = loaded.model.state_dict()
    dropped, added = sorted(set(trained) - set(state)), sorted(set(state) - set(trained))
    n_baseline = sum(p.numel() for p in baseline.parameters())
    n_trained = sum(p.numel() for p in loaded.model.parameters())
    n_log_var = sum(p.numel() for n, p in loaded.model.named_parameters() if n.endswith(".log_var"))
    n_added = sum(state[k].numel() for k in added)
    report.add(
        "weights: parameter count",
        n_trained - n_log_var + n_added == n_baseline,
        f"MC model without log_var {n_trained - n_log_var:,}"
        + (f" + zero bias {n_added:,}" if added else "")
        + f" = {'baseline cosine' if cosine else 'vanilla'} {n_baseline:,} (log_var, training only: {n_log_var:,})",
    )
    report.add(
        "weights: dropped keys",
        dropped == sorted(set(trained) - set(expected)) and added == sorted(set(expected) - set(trained)),
        f"dropped {dropped or 'nothing'}" + (f", added {added} (zero)" if added else ""),
    )
    # a cosine classifier is computed, not copied: equal to float rounding (the norm's summation order may differ)
    rewritten = {f"{loaded.classifier}.weight", f"{loaded.classifier}.bias"} if cosine else set()
    same = set(state) == set(expected) and all(
        torch.allclose(v, expected[k], rtol=1e-5, atol=0) if k in rewritten else torch.equal(v, expected[k])
        for k, v in state.items()
    )
    detail = "every kept tensor equals the checkpoint's" if same else "tensors differ"
    if same and rewritten:
        detail += "; the classifier is s * normalize(mean centers), its bias zero"
    report.add("weights: values", same, detail)


def check_graph(report: Report, exported: onnx.ModelProto, reference: onnx.ModelProto, meta: dict) -> None:
    """The bundle's graph has the structure of its baseline model (``reference``) exported the same way."""
    ours, theirs = graph_signature(exported), graph_signature(reference)
    report.add("graph: op sequence", ours["ops"] == theirs["ops"], f"{len(ours['ops'])} nodes")
    report.add(
        "graph: attributes",
        ours["attributes"] == theirs["attributes"],
        "node attributes identical" if ours["attributes"] == theirs["attributes"] else "node attributes differ",
    )
    report.add(
        "graph: initializer shapes",
        ours["initializers"] == theirs["initializers"],
        f"{len(ours['initializers'])} initializers",
    )
    io_same = (ours["inputs"], ours["outputs"]) == (theirs["inputs"], theirs["outputs"])
    report.add("graph: inputs/outputs", io_same, f"{ours['inputs'][0][2]} -> {ours['outputs'][0][2]}")
    flops, flops_ref = count_flops(exported), count_flops(reference)
    report.add(
        "graph: FLOPs",
        flops == flops_ref,
        f"{flops / 1e6:,.2f} MFLOPs per image, {baseline_name(meta)} {flops_ref / 1e6:,.2f}",
    )
    input_size, num_classes = list(meta["preprocess"]["input_size"]), meta["num_classes"]
    shape_ok = ours["outputs"][0][2][1:] == [num_classes] and ours["inputs"][0][2][1:] == input_size
    report.add("graph: matches model.json", shape_ok, f"input {input_size}, {num_classes} classes")


def check_outputs(
    report: Report,
    bundle: Path,
    meta: dict,
    loaded: LoadedCheckpoint | None,
    baseline: torch.nn.Module,
    num_real: int,
) -> torch.Tensor | None:
    """onnxruntime against the MC model (or, without it, the baseline one) on random and real inputs; and the
    baseline model against the MC model: bit for bit for a linear classifier, to ``MAX_ABS_TOL`` for a cosine one
    (``s * (x . w)`` and ``x . (s w)`` round differently).

    Returns:
        The real images used, or None when the training data is not at hand.
    """
    ours = create_session(bundle / ONNX_FILE)
    inputs = {"random": torch.randn(8, *meta["preprocess"]["input_size"], generator=torch.Generator().manual_seed(0))}
    images, source = real_images(meta, loaded.ckpt if loaded else None, num_real)
    if images is not None:
        inputs["real"] = images
    who = "MC model (eval)" if loaded else "timm model with the bundle's weights"
    with torch.no_grad():
        for kind, x in inputs.items():
            onnx_logits = ours.run(None, {INPUT_NAME: x.numpy()})[0]
            torch_logits = (loaded.model if loaded else baseline)(x).numpy()
            err = float(np.abs(onnx_logits - torch_logits).max())
            agree = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
            report.outputs[kind] = {"max_abs": err, "top1_agreement": agree, "inputs": len(x)}
            report.add(
                f"outputs: ORT vs PyTorch ({kind})",
                err <= MAX_ABS_TOL,
                f"max-abs {err:.2e} <= {MAX_ABS_TOL:g} against the {who}, {len(x)} inputs",
            )
            report.add(f"outputs: top-1 agreement ({kind})", agree == 1.0, f"{100 * agree:.1f}%")
            if loaded and meta["head"]["classifier_kind"] == "cosine":
                gap = float((baseline(x) - loaded.model(x)).abs().max())
                report.add(
                    f"outputs: baseline cosine == MC ({kind})",
                    gap <= MAX_ABS_TOL,
                    f"timm's cosine model with the bundle's weights: max-abs {gap:.2e} <= {MAX_ABS_TOL:g}",
                )
            elif loaded:
                identical = torch.equal(baseline(x), loaded.model(x))
                report.add(
                    f"outputs: vanilla == MC bit for bit ({kind})",
                    identical,
                    "timm model with the collapsed weights gives identical logits" if identical else "logits differ",
                )
    if images is None:
        report.add("outputs: real images", None, f"skipped: {source}")
    return images


def check_latency(
    report: Report, ours: Path, baseline: Path, input_size: tuple, runs: int, name: str = "vanilla"
) -> None:
    """onnxruntime latency of the bundle against its baseline's export (``name``): reported, never asserted."""
    report.latency = measure_latency(ours, baseline, input_size, runs)
    for batch, r in report.latency.items():
        report.add(
            f"latency (batch {batch})",
            None,
            f"{r['ours_ms']:.3f} ms vs {name} {r['vanilla_ms']:.3f} ms, ratio {r['ratio']:.3f}",
        )


def check_fp16(report: Report, bundle: Path, images: torch.Tensor) -> None:
    """model_fp16.onnx's error against the fp32 model on the real images: reported."""
    report.fp16 = fp16_report(bundle / ONNX_FILE, bundle / FP16_FILE, images)
    report.add(
        "fp16 model (reported)",
        None,
        f"max-abs {report.fp16['max_abs']:.2e}, top-1 agreement "
        f"{100 * report.fp16['top1_agreement']:.1f}% on {report.fp16['images']} real images",
    )


def check_int8(report: Report, bundle: Path, meta: dict, loaded: LoadedCheckpoint | None) -> None:
    """model_int8.onnx takes and gives what model.json says, and names the fp32 model's class on at least
    ``INT8_MIN_AGREEMENT`` of up to ``INT8_CHECK_IMAGES`` validation images (a quantized model is compared by its
    answers, not to 1e-5)."""
    try:
        check_served_graph(create_session(bundle / INT8_FILE), meta, INT8_FILE)
        report.add("int8 model: inputs and outputs", True, "as model.json describes")
    except BundleError as e:
        report.add("int8 model: inputs and outputs", False, str(e))
        return
    spec = loaded.ckpt["config"].get("data") if loaded is not None else None
    try:
        images, _ = preprocessed(meta, spec, "val", INT8_CHECK_IMAGES) if spec else (None, None)
    except UsageError as e:
        images, spec = None, f"{spec} unreadable here ({e})"
    if images is None:
        report.add("int8 model: top-1 agreement", None, f"skipped: no validation images ({spec or 'no checkpoint'})")
        return
    top1_agreement, max_abs = agreement(bundle / ONNX_FILE, bundle / INT8_FILE, images.numpy())
    report.int8 = {"top1_agreement": top1_agreement, "images": len(images), "max_abs_logit_error": max_abs}
    report.add(
        "int8 model: top-1 agreement",
        top1_agreement >= INT8_MIN_AGREEMENT,
        f"{100 * top1_agreement:.1f}% of {len(images)} val images get fp32's class "
        f"(>= {100 * INT8_MIN_AGREEMENT:.0f}%); logits within {max_abs:.3f}",
    )
