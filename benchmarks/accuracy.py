"""Where does the MC head help? Linear vs MC variants, paired by seed, on real data, on CPU or GPU.

Every variant trains with the same backbone, recipe and seeds as the linear head, so each comparison is a
paired difference per seed; the tables give its mean and a 95% confidence interval (t-distribution over seeds),
and the verdict ("better", "worse", "no difference shown") comes from that interval alone.

The grid: two backbone families (a CNN and a ViT) x two regimes (all training images with a short schedule;
10% of them with 5x the epochs). In every cell: linear, MC with the paper's settings and MC with mcc's
defaults on 5 seeds, and the ablations on 2 seeds (the ViT cells run the scale-related ablations only).
Beside the grid, the paper's table 6 in one cell (the CNN, full data): softmax, L-Softmax, ArcFace and CosFace,
each with the linear and the MC head, on 5 seeds.

Writes docs/RESULTS.md, docs/accuracy.png (paired differences with CI whiskers), docs/scale.png (sub-center
scale per epoch), docs/centers.png (features and centers, linear vs MC), docs/table6.png (table 6's pairs) and
benchmarks/results/accuracy_<device>.json (every run). Finished runs are cached there by their config (the
values that differ from TrainConfig's defaults, see ``run_key``), so an interrupted study continues where it
stopped, a run whose config did not change is never redone, and a new TrainConfig field with a default leaves
the cache valid. NOTE: the key is the run's config, not the code: after changing what mcc computes with a
given config (or a default's meaning), delete the cache file.

    python benchmarks/accuracy.py                      # the grid on this machine's device (GPU when there is one)
    python benchmarks/accuracy.py --device cpu --jobs 2
    python benchmarks/accuracy.py --quick              # digits, 3 variants x 3 seeds: checks the pipeline (~1 min)
    python benchmarks/accuracy.py --report             # rewrite the docs from the cached runs only
    python benchmarks/accuracy.py --device cpu --jobs 2 --only table6   # only the softmax variants (table 6)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mcc_serve.runtime.choices import DEVICES, LOSSES  # noqa: E402
from mcc_train import TrainConfig  # noqa: E402
from mcc_train.config import RENAMED  # noqa: E402
from mcc_train.head import MC_DEFAULTS, MC_PRESETS, MCSettings  # noqa: E402

DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
MAIN_SEEDS, ABLATION_SEEDS = 5, 2
CLIP = 8  # accuracy.png's x axis ends at +-CLIP points
# config keys that do not change what a run computes
NOT_HASHED = {"out", "overwrite", "progress", "workers", "resume", "device", "mc_preset", "tensorboard"}
_DEFAULTS, _MISSING = TrainConfig().to_dict(), object()  # run_key: a key TrainConfig no longer has is always hashed


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict
    main: bool = False  # MAIN_SEEDS seeds, else ABLATION_SEEDS
    baseline: str = "linear"  # paired against this variant's runs


LINEAR, PAPER, DEFAULT = "linear", "MC paper", "MC default"
MAIN = [
    Variant(LINEAR, {"head": "linear"}, main=True),
    Variant(PAPER, {"mc_preset": "paper"}, main=True),
    Variant(DEFAULT, {"mc_preset": "default"}, main=True),
]
SCALE_ABLATIONS = [  # one change each from the paper's settings
    Variant("MC sigma 0.01", {"mc_preset": "paper", "sigma_scale": 0.01}),
    Variant("MC sigma 0.03", {"mc_preset": "paper", "sigma_scale": 0.03}),
    Variant("MC local sampling", {"mc_preset": "paper", "sampling": "local"}),
    Variant("MC relative sigma 0.25", {"mc_preset": "paper", "sigma_mode": "relative", "sigma_scale": 0.25}),
    Variant("MC relative sigma 0.5", {"mc_preset": "paper", "sigma_mode": "relative", "sigma_scale": 0.5}),
    Variant("MC relative sigma 1", {"mc_preset": "paper", "sigma_mode": "relative", "sigma_scale": 1.0}),
]
LS, MIX = {"label_smoothing": 0.1}, {"mixup": 0.2, "cutmix": 1.0}
OTHER_ABLATIONS = [
    Variant("MC K=1", {"mc_preset": "paper", "num_subcenters": 1}),
    Variant("MC K=4", {"mc_preset": "paper", "num_subcenters": 4}),
    Variant("MC without L_sigma", {"mc_preset": "paper", "kl_weight": 0.0}),
    Variant("MC center weight 0.75", {"mc_preset": "paper", "center_weight": 0.75}),
    Variant("linear + label smoothing", {"head": "linear", **LS}),
    Variant("MC + label smoothing", {"mc_preset": "paper", **LS}, baseline="linear + label smoothing"),
    Variant("linear + mixup/cutmix", {"head": "linear", **MIX}),
    Variant("MC + mixup/cutmix", {"mc_preset": "paper", **MIX}, baseline="linear + mixup/cutmix"),
]
MARGIN_LOSSES = {"lsoftmax": "L-Softmax", "arcface": "ArcFace", "cosface": "CosFace"}  # the paper's table 6 order
TABLE6 = [MAIN[0], MAIN[2]] + [  # softmax, then each margin variant: linear vs plain linear, MC vs its own linear
    v
    for loss, label in MARGIN_LOSSES.items()
    for v in (
        Variant(f"{label} linear", {"head": "linear", "loss": loss}, main=True),
        Variant(f"{label} MC default", {"mc_preset": "default", "loss": loss}, main=True, baseline=f"{label} linear"),
    )
]


@dataclass(frozen=True)
class Cell:
    """One backbone in one data regime."""

    name: str
    overrides: dict
    variants: list[Variant] = field(default_factory=list)


def grid(scale: str) -> tuple[list[Cell], str]:
    """The cells of the study at ``scale`` (cpu, gpu, quick) and a one-line description of the recipe."""
    if scale == "quick":
        base = dict(
            data="digits",
            arch="test_resnet",
            img_size=16,
            epochs=8,
            batch_size=64,
            lr=2e-3,
            label_smoothing=0.0,
            scale=(0.7, 1.0),
        )
        cells = [Cell("digits, test_resnet", base, MAIN)]
        return cells, "digits (1,437 train / 360 val images), test_resnet at 16x16, 8 epochs, batch 64, AdamW lr 2e-3"
    base = dict(data="fashion-mnist", label_smoothing=0.0, scale=(0.8, 1.0), lr=2e-3, weight_decay=0.05)
    if scale == "cpu":
        cnn = dict(arch="test_resnet", img_size=28, batch_size=128)
        vit = dict(arch="test_vit", model_kwargs={"patch_size": 7}, img_size=28, batch_size=128)
        full, poor = dict(epochs=2), dict(subset=6000, epochs=10)
        recipe = (
            "Fashion-MNIST at 28x28; CNN: timm's test_resnet (0.37M parameters, d = 96); ViT: timm's test_vit "
            "(width 64, depth 6, patch 7: 16 tokens, d = 64); batch 128, AdamW lr 2e-3, weight decay 0.05, "
            "cosine with 1 warm-up epoch, no label smoothing; full: 60,000 images x 2 epochs; "
            "data-poor: 6,000 images x 10 epochs"
        )
    else:
        cnn = dict(arch="resnet18", img_size=32, batch_size=512)
        vit = dict(arch="vit_tiny_patch16_224", model_kwargs={"patch_size": 4}, img_size=32, batch_size=512)
        full, poor = dict(epochs=15), dict(subset=6000, epochs=75, batch_size=256)
        recipe = (
            "Fashion-MNIST at 32x32; CNN: resnet18; ViT: vit_tiny (patch 4: 64 tokens); AdamW lr 2e-3, "
            "weight decay 0.05, cosine with 1 warm-up epoch, no label smoothing; full: 60,000 images x 15 "
            "epochs, batch 512; data-poor: 6,000 images x 75 epochs, batch 256"
        )
    cnn_variants = MAIN + SCALE_ABLATIONS + OTHER_ABLATIONS
    vit_variants = MAIN + SCALE_ABLATIONS
    cells = [
        Cell("CNN, full data", {**base, **cnn, **full}, cnn_variants),
        Cell("CNN, data-poor", {**base, **cnn, **poor}, cnn_variants),
        Cell("ViT, full data", {**base, **vit, **full}, vit_variants),
        Cell("ViT, data-poor", {**base, **vit, **poor}, vit_variants),
    ]
    return cells, recipe


def table6(scale: str) -> list[Cell]:
    """The paper's table 6 (softmax, L-Softmax, ArcFace, CosFace, each with the linear and the MC head), in one
    cell of the grid: the CNN with all the data (its softmax rows are that cell's linear and MC default runs)."""
    if scale == "quick":
        return []
    cell = grid(scale)[0][0]
    return [Cell(cell.name, cell.overrides, TABLE6)]


def seeds(variant: Variant, scale: str) -> list[int]:
    return list(range(3 if scale == "quick" else MAIN_SEEDS if variant.main else ABLATION_SEEDS))


def run_config(cell: Cell, variant: Variant, seed: int) -> dict:
    """The full, resolved TrainConfig of one run, as plain values: a margin left at its kind's default is written
    out, so a cached run keeps the m and s it trained with when ``LOSSES`` changes."""
    cfg = TrainConfig.from_dict({**cell.overrides, **variant.overrides, "seed": seed}).validate()
    kind = LOSSES[cfg.loss]
    if kind.margin and cfg.margin is None:
        cfg.margin = kind.margin
    if kind.scale and cfg.margin_scale is None:
        cfg.margin_scale = kind.scale
    return cfg.to_dict()


def run_key(config: dict) -> str:
    """A run is identified by what it computes: the config keys whose value differs from ``TrainConfig()``'s (a
    key the config lacks is at its default), less those that do not change the result (``NOT_HASHED``, and a
    linear head's MC settings). A field added to TrainConfig with a default, or renamed (``RENAMED``), leaves
    the keys of the runs cached before it unchanged."""
    config = {RENAMED.get(k, k): v for k, v in config.items()}
    ignored = NOT_HASHED | (set(MCSettings.__dataclass_fields__) if config.get("head") == "linear" else set())
    kept = {k: v for k, v in sorted(config.items()) if k not in ignored and v != _DEFAULTS.get(k, _MISSING)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def run_one(config: dict, out: str, device: str, workers: int, threads: int) -> dict:
    """Train one run in this (worker) process; returns its record for the cache."""
    import torch

    from mcc_train.train import train

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = TrainConfig.from_dict(
        {**config, "out": out, "overwrite": True, "progress": False, "device": device, "workers": workers}
    )
    started = time.time()
    summary = train(cfg)
    with open(Path(out) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def column(name: str) -> list[float | None]:
        return [float(r[name]) if r.get(name) else None for r in rows]

    return {
        "top1": summary["last"]["top1"],
        "wall_s": time.time() - started,
        "curves": {k: column(k) for k in ("top1", "offset_ratio", "logit_margin", "logit_spread", "sub_center_std")},
        "config": config,
        "device": device_name(device),
        "checkpoint": str(Path(out) / "last.pt"),
    }


def device_name(device: str) -> str:
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


# ---------------------------------------------------------------------------------------------------- statistics


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired(values: list[float], baseline: list[float]) -> dict:
    """Mean paired difference with a 95% CI over seeds, and the verdict the interval supports."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "lo": math.nan, "hi": math.nan, "verdict": "one seed: no interval"}
    half = t_quantile(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"
    return {"n": n, "mean": mean, "lo": lo, "hi": hi, "verdict": verdict}


# ---------------------------------------------------------------------------------------------------- the study


@dataclass
class Study:
    scale: str
    cells: list[Cell]
    recipe: str
    cache_path: Path
    runs: dict  # run key -> record
    table6: list[Cell] = field(default_factory=list)  # the softmax-variant comparison, beside the grid

    def key(self, cell: Cell, variant: Variant, seed: int) -> str:
        return run_key(run_config(cell, variant, seed))

    def top1(self, cell: Cell, variant: Variant) -> dict[int, float]:
        """Finished runs of a variant, seed -> top-1 (a failed run has none)."""
        out = {}
        for seed in seeds(variant, self.scale):
            record = self.runs.get(self.key(cell, variant, seed))
            if record is not None and "error" not in record:
                out[seed] = record["top1"]
        return out

    def same_runs(self, cell: Cell, a: str, b: str) -> bool:
        """Whether two variants resolve to the same runs (mcc's defaults equal to the paper's, say)."""
        va, vb = (next(v for v in cell.variants if v.name == name) for name in (a, b))
        return self.key(cell, va, 0) == self.key(cell, vb, 0)

    def comparison(
        self, cell: Cell, variant: Variant, max_seeds: int | None = None, first_seed: int = 0, baseline: str = ""
    ) -> dict | None:
        """The paired difference to the variant's baseline (or to ``baseline``, a variant's name, when given) over
        the seeds both have finished (only seeds ``first_seed`` and later, and the first ``max_seeds`` of them)."""
        base = next(v for v in cell.variants if v.name == (baseline or variant.baseline))
        mine, theirs = self.top1(cell, variant), self.top1(cell, base)
        common = [s for s in sorted(set(mine) & set(theirs)) if s >= first_seed][:max_seeds]
        return paired([mine[s] for s in common], [theirs[s] for s in common]) if common else None

    def keys(self, cells: list[Cell]) -> set[str]:
        """The run keys of ``cells``' variants and seeds."""
        return {self.key(c, v, s) for c in cells for v in c.variants for s in seeds(v, self.scale)}

    def todo(self, cells: list[Cell] | None = None) -> list[tuple[Cell, Variant, int]]:
        """Unfinished runs of ``cells`` (default: the grid and table 6), cheapest evidence first: seeds 0-1 of
        everything, then the main rows' other seeds, and mcc's defaults last (so a study that changes the
        defaults reruns only those)."""
        order = []
        for cell in self.cells + self.table6 if cells is None else cells:
            for variant in cell.variants:
                for seed in seeds(variant, self.scale):
                    rank = (variant.name == DEFAULT, seed >= ABLATION_SEEDS)
                    order.append((rank, cell, variant, seed))
        order.sort(key=lambda item: item[0])
        keys, todo = set(), []
        for _, cell, variant, seed in order:
            k = self.key(cell, variant, seed)
            if k not in self.runs and k not in keys:  # a default that equals an ablation runs once
                keys.add(k)
                todo.append((cell, variant, seed))
        return todo

    def save(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scale": self.scale, "runs": self.runs}, indent=1))
        tmp.replace(self.cache_path)


def execute(
    study: Study, runs_dir: Path, device: str, jobs: int, workers: int, threads: int, cells: list[Cell] | None = None
) -> None:
    """Run what is missing (of ``cells`` only, when given), ``jobs`` processes at a time; every finished run is
    saved at once."""
    todo = study.todo(cells)
    if not todo:
        return
    print(f"{len(todo)} runs to do, {jobs} at a time, {threads} thread(s) each", flush=True)
    started, done = time.time(), 0
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # a clean process per run
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), **fresh) as pool:
        futures = {}
        for cell, variant, seed in todo:
            config = run_config(cell, variant, seed)
            out = runs_dir / study.scale / run_key(config)
            futures[pool.submit(run_one, config, str(out), device, workers, threads)] = (cell, variant, seed, config)
        for future in as_completed(futures):
            cell, variant, seed, config = futures[future]
            try:
                record = future.result()
                outcome = f"top-1 {record['top1']:.2f} ({record['wall_s']:.0f}s"
            except Exception as e:  # a diverged or broken run is recorded, and the others go on
                record = {"error": f"{type(e).__name__}: {e}".splitlines()[0], "config": config}
                outcome = f"FAILED: {record['error']} ("
            record |= {"cell": cell.name, "variant": variant.name, "seed": seed}
            study.runs[run_key(config)] = record
            study.save()
            done += 1
            eta = (time.time() - started) / done * (len(todo) - done)
            print(
                f"[{done}/{len(todo)}] {cell.name} | {variant.name} | seed {seed}: {outcome}; "
                f"about {eta / 60:.0f} min left)",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------------- the report


def fmt_ci(c: dict | None) -> str:
    if c is None:
        return "-"
    if math.isnan(c["lo"]):
        return f"{c['mean']:+.2f}"
    return f"{c['mean']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def cell_table(study: Study, cell: Cell) -> list[str]:
    lines = [
        "| variant | seeds | top-1 mean | std | difference to its baseline, 95% CI | baseline | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in cell.variants:
        vals = list(study.top1(cell, variant).values())
        n_want = len(seeds(variant, study.scale))
        if not vals:
            lines.append(f"| {variant.name} | 0/{n_want} | - | - | - | {variant.baseline} | pending |")
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        c = study.comparison(cell, variant) if variant.name != LINEAR else None
        diff = fmt_ci(c) if variant.name != LINEAR else "(reference)"
        verdict, baseline = (c["verdict"] if c else "", variant.baseline) if variant.name != LINEAR else ("", "")
        twin = next(
            (v.name for v in cell.variants if v.name != DEFAULT and study.same_runs(cell, DEFAULT, v.name)), None
        )
        if variant.name == DEFAULT and twin:
            verdict += f" (seeds 0-{ABLATION_SEEDS - 1} are the runs of {twin})"
        seeds_txt = f"{len(vals)}" + ("" if len(vals) == n_want else f"/{n_want}")
        lines.append(
            f"| {variant.name} | {seeds_txt} | {statistics.mean(vals):.2f} | {sd:.2f} | {diff} | "
            f"{baseline} | {verdict} |"
        )
    return lines


def init_offset_ratio(config: dict) -> float:
    """A sub-center's offset over its center's norm before the first step, for the model train() builds."""
    key = run_key(config)
    if key not in _INIT_RATIOS:
        _INIT_RATIOS[key] = _init_offset_ratio(config)
    return _INIT_RATIOS[key]


_INIT_RATIOS: dict[str, float] = {}


def _init_offset_ratio(config: dict) -> float:
    from timm.utils import random_seed

    from mcc_train import create_model, get_mc_head
    from mcc_train.data import load_data

    cfg = TrainConfig.from_dict(config)
    splits = load_data(cfg.data, cfg.subset)
    random_seed(cfg.seed, 0)  # as train() does right before it builds the model
    in_chans = cfg.in_chans or (1 if splits.grayscale else 3)
    model = create_model(
        cfg.arch,
        splits.num_classes,
        head=cfg.head,
        in_chans=in_chans,
        mc=cfg.mc(),
        img_size=cfg.img_size,
        drop_rate=cfg.drop_rate,
        **cfg.model_kwargs,
    )
    return get_mc_head(model).offset_ratio().mean().item()


def scale_table(study: Study, cell: Cell) -> list[str]:
    """Sub-center offset over center norm (at init, then per epoch), and sub-center logit spread against the
    logit margin, per epoch."""
    lines = [
        "| variant (seed 0) | offset / center norm: at init; per epoch | logit spread / margin, per epoch |",
        "|---|---|---|",
    ]
    for variant in cell.variants:
        record = study.runs.get(study.key(cell, variant, 0))
        if record is None or "error" in record or variant not in MAIN + SCALE_ABLATIONS or variant.name == LINEAR:
            continue
        curves = record["curves"]
        ratio = f"{init_offset_ratio(record['config']):.2f}; " + ", ".join(
            f"{v:.2f}" for v in curves["offset_ratio"] if v is not None
        )
        spread = ", ".join(
            f"{s:.2f}/{m:.2f}" for s, m in zip(curves["logit_spread"], curves["logit_margin"], strict=True) if s
        )
        lines.append(f"| {variant.name} | {ratio} | {spread} |")
    return lines


def summary_lines(study: Study) -> list[str]:
    """Which MC variants the intervals call better or worse than their baseline, cell by cell."""
    lines, tested = [], 0
    for cell in study.cells:
        found = {"better": [], "worse": [], "no difference shown": [], "other": []}
        for variant in cell.variants:
            if variant.overrides.get("head") == "linear":
                continue
            if variant.name == DEFAULT and study.same_runs(cell, DEFAULT, PAPER):
                continue  # the same runs as the paper's row: not a second piece of evidence
            c = study.comparison(cell, variant)
            if c is not None and not math.isnan(c["lo"]):
                tested += 1
                found[c["verdict"]].append(f"{variant.name} ({fmt_ci(c)})")
            else:
                found["other"].append(variant.name)
        lines.append(
            f"- **{cell.name}**: better: {'; '.join(found['better']) or 'none'}. "
            f"Worse: {'; '.join(found['worse']) or 'none'}. "
            f"No difference shown: {len(found['no difference shown'])} variants"
            + (f"; pending: {', '.join(found['other'])}" if found["other"] else "")
            + "."
        )
    lines += [
        "",
        f"{tested} comparisons at 95% each: even if no variant had any effect, about {0.05 * tested:.1f} of "
        "them would come out *better* or *worse* by chance. A verdict that stands alone in one cell, with no "
        "echo in the other cells, is weak evidence.",
    ]
    return lines


def default_ranking(study: Study) -> list[dict]:
    """The rule that picks mcc's default MC settings, applied to the runs at hand.

    Candidates: the paper's settings and every variant of the scale ablations, the ones run in every cell. Each
    is scored by its worst cell: the lowest mean paired difference to linear over the four cells, on the seeds
    every candidate has (0 and 1). The default is the best-scoring candidate that no cell calls *worse*; its
    5-seed rows (MC default) then check it on three more seeds.
    """
    rows = []
    for variant in [v for v in MAIN + SCALE_ABLATIONS if v.name not in (LINEAR, DEFAULT)]:
        diffs = [study.comparison(cell, variant, ABLATION_SEEDS) for cell in study.cells]  # the same seeds for all
        if any(c is None for c in diffs):
            continue
        rows.append(
            {
                "variant": variant.name,
                "worst": min(c["mean"] for c in diffs),
                "mean": statistics.mean(c["mean"] for c in diffs),
                "worse_in": [cell.name for cell, c in zip(study.cells, diffs, strict=True) if c["verdict"] == "worse"],
                "per_cell": [c["mean"] for c in diffs],
            }
        )
    return sorted(rows, key=lambda r: (bool(r["worse_in"]), -r["worst"]))


def ranking_lines(study: Study) -> list[str]:
    rows = default_ranking(study)
    if not rows:
        return []
    names = " | ".join(cell.name for cell in study.cells)
    rule = " ".join(default_ranking.__doc__.split("\n\n")[1].split())
    lines = [
        "### How the default was chosen",
        "",
        rule,
        "",
        f"| candidate | {names} | worst cell | mean | worse in |",
        "|---|" + "---|" * (len(study.cells) + 3),
    ]
    for r in rows:
        cells = " | ".join(f"{m:+.2f}" for m in r["per_cell"])
        lines.append(
            f"| {r['variant']} | {cells} | {r['worst']:+.2f} | {r['mean']:+.2f} | {', '.join(r['worse_in']) or '-'} |"
        )
    lines += ["", f"By this rule: **{rows[0]['variant']}**. mcc's defaults now: {describe(MC_DEFAULTS)}.", ""]
    default = next(v for v in MAIN if v.name == DEFAULT)
    fresh = [study.comparison(cell, default, first_seed=ABLATION_SEEDS) for cell in study.cells]
    if all(c is not None for c in fresh):  # the seeds the choice did not see: no winner's curse
        lines += [
            f"The default on the seeds the choice did not see ({ABLATION_SEEDS} to {MAIN_SEEDS - 1}), against "
            "linear: "
            + "; ".join(f"{cell.name} {fmt_ci(c)} ({c['verdict']})" for cell, c in zip(study.cells, fresh, strict=True))
            + ".",
            "",
        ]
    return lines


def describe(mc) -> str:
    return (
        f"K={mc.num_subcenters}, center weight {mc.center_weight}, {mc.sigma_mode} sigma {mc.sigma_scale}, "
        f"{mc.sampling} sampling, L_sigma weight {mc.kl_weight:g}"
    )


def write_report(studies: list[Study], docs: Path, commands: dict[str, str]) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    d = MC_DEFAULTS
    lines = [
        "# MC head against linear head: results",
        "",
        "Written by `benchmarks/accuracy.py` from the runs cached in `benchmarks/results/accuracy_<device>.json`; "
        "every number below is from those files. Top-1 is the eval accuracy (%) after the last epoch on the full "
        "validation split (Fashion-MNIST: the 10,000 test images), with the mean centers only: the model as "
        "exported. Each MC variant is compared with the linear head trained with the same seed (same initial "
        "weights, same data order): the difference column is the mean over seeds of (variant - baseline) with a "
        "95% confidence interval from the t-distribution over seeds; the verdict is *better* or *worse* only when "
        "the interval excludes 0. Two seeds give a wide interval (t = 12.7): the ablations can show a large effect, "
        "not rule out a small one.",
        "",
        f"mcc's MC defaults at the time of writing: {describe(d)}. The paper's (`--mc-preset paper`): "
        f"{describe(MC_PRESETS['paper'])}. Every ablation changes one thing from the paper's settings.",
        "",
    ]
    reading = docs / "reading.md"  # the interpretation, written by hand from the tables
    if reading.is_file():
        lines += [reading.read_text().strip(), ""]
    for study in studies:
        runs = [study.runs[k] for k in study.keys(study.cells) if k in study.runs]  # the grid's, not table 6's
        devices = sorted({r["device"] for r in runs if "device" in r})
        hours = sum(r.get("wall_s", 0) for r in runs) / 3600
        failed = [f"{r['cell']} | {r['variant']} | seed {r['seed']}: {r['error']}" for r in runs if "error" in r]
        lines += [
            f"## On {', '.join(devices)}",
            "",
            f"Command: `{commands[study.scale]}`. Recipe: {study.recipe}. "
            f"{len(runs)} runs, {hours:.1f} hours of run time in all (runs went in parallel).",
            "",
            "**Where the intervals exclude zero:**",
            "",
            *summary_lines(study),
            "",
        ]
        if failed:
            lines += ["**Runs that failed** (left out of the tables):", "", *[f"- {f}" for f in failed], ""]
        for cell in study.cells:
            lines += [f"### {cell.name}", "", *cell_table(study, cell), ""]
        if study.scale != "quick":
            lines += ranking_lines(study)
        lines += [
            "### Scale of the sub-centers",
            "",
            "Per epoch, from the eval pass: the expected norm of a sub-center's offset over its mean center's "
            "norm (`||std_c|| / ||w_c||`, mean over classes), and the std of a sub-center's logit around its "
            "mean's logit for the true class (`logit_spread`) next to the mean margin between the true class's "
            "logit and the best other one (`logit_margin`). Seed 0.",
            "",
        ]
        for cell in study.cells:
            lines += [f"**{cell.name}**", "", *scale_table(study, cell), ""]
    lines += [
        "![paired differences to linear with 95% CIs](accuracy.png)",
        "",
        "![sub-center scale per epoch](scale.png)",
        "",
        "![features and centers, linear vs MC](centers.png)",
        "",
    ]
    for study in [s for s in studies if has_table6(s)]:
        lines += table6_lines(study, commands[study.scale])
    (docs / "RESULTS.md").write_text("\n".join(lines))


def has_table6(study: Study) -> bool:
    """Whether any run of table 6's own (beyond the grid's softmax rows) is cached."""
    return bool(study.keys(study.table6) - study.keys(study.cells) & set(study.runs))


def table6_lines(study: Study, command: str) -> list[str]:
    """The paper's table 6 on this study's device: each softmax variant with the linear and the MC head, every row
    paired with linear softmax and each MC row with the linear head of its own loss; then the margin sweep."""
    cell = study.table6[0]
    own = study.keys(study.table6) - study.keys(study.cells)  # the softmax rows are the grid's runs
    runs = [study.runs[k] for k in own if k in study.runs]
    devices = sorted({r["device"] for r in runs if "device" in r})
    minutes = sum(r.get("wall_s", 0) for r in runs) / 60
    margins = []
    for label in MARGIN_LOSSES.values():
        config = run_config(cell, next(v for v in cell.variants if v.name == f"{label} linear"), 0)
        scale = f", s = {config['margin_scale']:g}" if config["margin_scale"] else ""
        margins.append(f"{label} m = {config['margin']:g}{scale}")
    lines = [
        "## Softmax variants (the paper's table 6)",
        "",
        f"On {', '.join(devices)}. Command: `{command} --only table6` (runs only what this section lacks). "
        f"Cell: {cell.name} of the grid above, same recipe; its softmax rows are that cell's *linear* and *MC "
        f"default* runs. Margins: mcc's defaults (`LOSSES` in `mcc_train/margins.py`, chosen by the sweep "
        f"below): {'; '.join(margins)}. MC: mcc's default preset ({describe(MC_DEFAULTS)}). {len(runs)} runs "
        f"of its own (of {len(own)}), {minutes:.0f} minutes of run time (runs went in parallel).",
        "",
        "Every row is paired by seed with linear softmax (does the loss, alone or with MC, beat the ordinary "
        "classifier?), and each MC row with the linear head of the same loss (does MC add to that loss? the "
        "paper's table 6 question).",
        "",
        "| loss | head | seeds | top-1 mean | std | difference to linear softmax, 95% CI | verdict "
        "| MC - linear, same loss, 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tested, verdicts = 0, {"better": [], "worse": []}
    for variant in cell.variants:
        vals = list(study.top1(cell, variant).values())
        label = variant.name.removesuffix(" linear").removesuffix(" MC default")
        loss = "softmax" if variant.name in (LINEAR, DEFAULT) else label
        head = "linear" if variant.overrides.get("head") == "linear" else "MC"
        n_want = len(seeds(variant, study.scale))
        if not vals:
            lines.append(f"| {loss} | {head} | 0/{n_want} | - | - | - | pending | - | |")
            continue
        row = [
            loss,
            head,
            f"{len(vals)}" + ("" if len(vals) == n_want else f"/{n_want}"),
            f"{statistics.mean(vals):.2f}",
            f"{statistics.stdev(vals) if len(vals) > 1 else 0:.2f}",
        ]
        pairs = [
            study.comparison(cell, variant, baseline=LINEAR) if variant.name != LINEAR else None,
            study.comparison(cell, variant) if head == "MC" else None,
        ]
        for name, c in zip(("vs linear softmax", "MC - linear"), pairs, strict=True):
            row += [fmt_ci(c), c["verdict"]] if c else ["(reference)" if variant.name == LINEAR else "", ""]
            if c is not None and not math.isnan(c["lo"]) and not (name == "MC - linear" and loss == "softmax"):
                tested += 1  # softmax's MC - linear is the grid's MC default row, counted there
                if c["verdict"] in verdicts:
                    verdicts[c["verdict"]].append(f"{loss} {head} {name} {fmt_ci(c)}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"**Where the intervals exclude zero:** better: {'; '.join(verdicts['better']) or 'none'}. "
        f"Worse: {'; '.join(verdicts['worse']) or 'none'}. {tested} new comparisons at 95% each: about "
        f"{0.05 * tested:.1f} would exclude zero by chance.",
        "",
        "![paired differences, table 6](table6.png)",
        "",
    ]
    sweep = RESULTS / "margin_sweep.json"
    if sweep.is_file():
        lines += [
            "### How the margin defaults were chosen (`benchmarks/margin_sweep.py`)",
            "",
            *json.loads(sweep.read_text()).get("markdown", ["(no table: run the sweep)"]),
            "",
        ]
    return lines


def plot_accuracy(study: Study, path: Path, title: str = "MC variants against the linear head") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(4.6 * len(study.cells), 7.5)  # one cell (table 6): room for the title
    fig, axes = plt.subplots(1, len(study.cells), figsize=(width, 6.5), squeeze=False)
    colours = {"better": "tab:green", "worse": "tab:red"}
    for ax, cell in zip(axes[0], study.cells, strict=True):
        names, rows = [], []
        for variant in cell.variants:
            c = study.comparison(cell, variant) if variant.name != variant.baseline else None
            if c is not None and variant.name != LINEAR:
                names.append(variant.name + ("" if variant.baseline == LINEAR else f"\n(vs {variant.baseline})"))
                rows.append(c)
        y = range(len(rows))
        for i, c in zip(y, rows, strict=True):
            colour = colours.get(c["verdict"], "tab:grey")
            err = None if math.isnan(c["lo"]) else [[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]]
            ax.errorbar(c["mean"], i, xerr=err, fmt="o", color=colour, capsize=3)
            ax.annotate(
                f"n={c['n']}", (c["mean"], i), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center"
            )
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(list(y), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("top-1 difference to baseline (points), 95% CI")
        ax.set_title(cell.name, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        lo = [c["lo"] for c in rows if not math.isnan(c["lo"])]
        hi = [c["hi"] for c in rows if not math.isnan(c["hi"])]
        if lo:  # two-seed intervals can be huge: clip the axis at +-CLIP, mark the cut whiskers, the table has all
            left, right = max(min(lo), -CLIP) - 0.4, min(max(hi), CLIP) + 0.4
            ax.set_xlim(left, right)
            for i, c in zip(y, rows, strict=True):
                if c["lo"] < left:
                    ax.plot(left, i, marker="<", color="k", ms=5, clip_on=False)
                if c["hi"] > right:
                    ax.plot(right, i, marker=">", color="k", ms=5, clip_on=False)
    sep = "\n" if len(study.cells) == 1 else " "
    fig.suptitle(
        f"{title}, paired by seed{sep}(green: better, red: worse; "
        f"a triangle: the interval goes on past the axis, cut at +-{CLIP} points)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_scale(study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(study.cells), figsize=(4.2 * len(study.cells), 9), squeeze=False)
    shown = [PAPER, "MC local sampling", "MC relative sigma 1", "MC relative sigma 0.5", DEFAULT, "MC sigma 0.01"]
    for col, cell in enumerate(study.cells):
        plotted = set()
        for variant in [v for v in cell.variants if v.name in shown]:
            record = study.runs.get(study.key(cell, variant, 0))
            if record is None or "error" in record or study.key(cell, variant, 0) in plotted:
                continue  # e.g. mcc's default when it is one of the ablations: one line, not two
            plotted.add(study.key(cell, variant, 0))
            curves = record["curves"]
            epochs = range(len(curves["offset_ratio"]) + 1)  # 0: at initialisation
            line = axes[0][col].plot(
                epochs, [init_offset_ratio(record["config"]), *curves["offset_ratio"]], "o-", ms=3, label=variant.name
            )[0]
            axes[1][col].plot(epochs[1:], curves["logit_spread"], "o-", ms=3, color=line.get_color())
            axes[2][col].plot(epochs[1:], curves["logit_margin"], "o-", ms=3, color=line.get_color())
        linear = study.runs.get(study.key(cell, MAIN[0], 0))
        if linear is not None and "error" not in linear:
            margin = linear["curves"]["logit_margin"]
            axes[2][col].plot(range(1, len(margin) + 1), margin, "k--", lw=1, label="linear")
            axes[2][col].legend(fontsize=7)
        axes[0][col].set(title=cell.name, ylabel="offset norm / center norm (epoch 0: init)", yscale="log")
        axes[1][col].set(ylabel="sub-center logit spread (true class)", ylim=(0, None))
        axes[2][col].set(xlabel="epoch", ylabel="logit margin (true - best other)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.axhline(0, color="k", lw=0.5)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_centers(study: Study, path: Path) -> None:
    """The paper's figure 1 from trained models: 2-D PCA of validation features with each class's mean center
    and a cloud of sampled sub-centers, for linear vs MC (paper) vs MC (default), same data and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from export.collapse import load_trained
    from mcc_train.data import build_transforms, load_data, set_transforms
    from mcc_train.model import get_mc_head

    cell = study.cells[-1]  # the data-poor ViT, where the paper's settings fail most (the quick study: digits)
    picks = [v for v in cell.variants if v.name in (LINEAR, PAPER, DEFAULT)]
    records = [study.runs.get(study.key(cell, v, 0)) for v in picks]
    if any(r is None or "error" in r or not Path(r["checkpoint"]).is_file() for r in records):
        return
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 5), squeeze=False)
    torch.manual_seed(0)
    for ax, variant, record in zip(axes[0], picks, records, strict=True):
        loaded = load_trained(record["checkpoint"])
        model, dc = loaded.model, loaded.ckpt["data_config"]
        splits = load_data(record["config"]["data"])
        _, val_tf = build_transforms({**dc, "input_size": tuple(dc["input_size"])}, 0.0, (1.0, 1.0))
        set_transforms(splits, val_tf, val_tf, loaded.in_chans)
        idx = torch.randperm(len(splits.val))[:1500].tolist()
        images = torch.stack([splits.val[i][0] for i in idx])
        labels = torch.tensor([splits.val[i][1] for i in idx])
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(images), pre_logits=True)  # (N, d)
        mean = feats.mean(0)
        _, _, v = torch.pca_lowrank(feats - mean, q=2, center=False)  # v: (d, 2)
        xy = (feats - mean) @ v  # (N, 2)
        head = get_mc_head(model)
        weight = (head.weight if head is not None else model.get_classifier().weight).detach()  # (C, d)
        # centers are directions in feature space: draw them scaled to the feature cloud's radius
        scale = xy.norm(dim=1).quantile(0.9) / (weight @ v).norm(dim=1).max()
        for c in range(loaded.num_classes):
            pts = xy[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.5, color=f"C{c}", linewidths=0)
            center = (weight[c] @ v) * scale
            if head is not None:
                with torch.no_grad():
                    sub = head.weight[c] + head.std()[c] * torch.randn(60, head.in_features)  # (60, d)
                sub_xy = (sub @ v) * scale
                ax.scatter(sub_xy[:, 0], sub_xy[:, 1], s=14, marker="+", alpha=0.6, color=f"C{c}", linewidths=0.7)
            ax.scatter(*center, s=140, marker="*", edgecolor="k", color=f"C{c}", zorder=5)
        if head is None:
            title = f"{variant.name}\nstars: class centers (weight rows)"
        else:
            ratio = head.offset_ratio().mean().item()
            title = (
                f"{variant.name}: {head.sigma_mode} sigma {head.sigma_scale}, offset/center norm {ratio:.2f}\n"
                "stars: mean centers, +: 60 sampled sub-centers per class"
            )
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{cell.name}, seed 0: validation features (dots, PCA to 2-D) and class centers", fontsize=10)
    fig.text(
        0.5,
        0.01,
        "Centers and sub-centers are directions in feature space, projected on the same two principal "
        "axes and drawn at one common scale (the largest center reaches the 90th-percentile feature radius). A "
        "2-D projection keeps only a small share of a sub-center's d-dimensional offset: the clouds look tighter "
        "than the offset/center norm in each title.",
        ha="center",
        fontsize=7,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the command


def load_runs(cache_path: Path) -> dict:
    """The cached runs of a study file, keyed by this version of ``run_key``."""
    runs = json.loads(cache_path.read_text())["runs"] if cache_path.is_file() else {}
    return {run_key(r["config"]): r for r in runs.values()}


def load_study(scale: str, cache_path: Path) -> Study:
    cells, recipe = grid(scale)
    return Study(scale, cells, recipe, cache_path, load_runs(cache_path), table6(scale))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: 4 on a GPU, else cores/1)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading workers per run (default: 0 on CPU)")
    parser.add_argument("--quick", action="store_true", help="digits, 3 variants x 3 seeds (about a minute)")
    parser.add_argument("--report", action="store_true", help="only rewrite the docs from the cached runs")
    parser.add_argument(
        "--only",
        choices=("grid", "table6"),
        default=None,
        help="run only the grid, or only the softmax variants (the paper's table 6)",
    )
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "accuracy"), help="checkpoints of every run")
    parser.add_argument("--results", default=None, help="the cache JSON (default: benchmarks/results/...)")
    parser.add_argument("--docs", default=None, help="where RESULTS.md and the plots go (default: docs/)")
    args = parser.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    scale = "quick" if args.quick else "gpu" if cuda else "cpu"
    cores = os.cpu_count() or 1
    jobs = args.jobs or (4 if cuda else max(1, min(cores, 8)))
    threads = max(1, cores // jobs) if not cuda else 2
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    cache_name = f"accuracy_quick_{'cuda' if cuda else 'cpu'}" if args.quick else f"accuracy_{scale}"
    results = Path(args.results) if args.results else RESULTS / f"{cache_name}.json"
    docs = Path(args.docs) if args.docs else (Path(args.runs_dir) / "quick-docs" if args.quick else DOCS)

    study = load_study(scale, results)
    if not args.report:
        cells = {"grid": study.cells, "table6": study.table6}.get(args.only)
        execute(study, Path(args.runs_dir), "cuda" if cuda else "cpu", jobs, workers, threads, cells)
    # docs/ shows every full study that has runs: the CPU grid and, once run, the GPU grid
    others = [] if args.quick else [load_study(k, RESULTS / f"accuracy_{k}.json") for k in ("gpu", "cpu") if k != scale]
    studies = sorted([study, *[s for s in others if s.runs]], key=lambda s: s.scale != "gpu")  # the GPU grid first
    commands = {
        "quick": "python benchmarks/accuracy.py --quick",
        "cpu": "python benchmarks/accuracy.py --device cpu --jobs 2",
        "gpu": "python benchmarks/accuracy.py --device cuda",
    }
    write_report(studies, docs, commands)
    plot_accuracy(studies[0], docs / "accuracy.png")
    plot_scale(studies[0], docs / "scale.png")
    plot_centers(studies[0], docs / "centers.png")
    if has_table6(studies[0]):
        plot_accuracy(
            dataclasses.replace(studies[0], cells=studies[0].table6),
            docs / "table6.png",
            "Softmax variants (table 6): each row against its baseline",
        )
    print((docs / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
