"""Which margin m and scale s should L-Softmax, CosFace and ArcFace default to on a few classes? A short sweep.

CosFace and ArcFace come from face recognition, where s = 64 suits 10^5 identities: a cosine logit lies in [-s, s],
and with 10 classes s = 64 lets the target's probability reach 1 at a small angle, so the loss stops pulling
long before the features separate well. This script measures it instead of guessing. Every setting trains with
the recipe of the "CNN, data-poor" cell of benchmarks/accuracy.py's CPU grid (Fashion-MNIST at 28x28, timm's
test_resnet, 6,000 training images x 10 epochs, batch 128, AdamW lr 2e-3, no label smoothing), the linear head,
seeds 0 and 1, and is paired by seed with plain softmax, as in accuracy.py (whose run cache, ``execute`` and
``paired`` it uses).

One factor at a time around the pivot, the defaults the sweep started from (CosFace m 0.2, ArcFace m 0.3, both
s 16; L-Softmax m 2): s in {8, 16, 32, 64} at the pivot's m; m in {0.1, 0.2, 0.35} (CosFace) and {0.1, 0.3, 0.5}
(ArcFace) at s 16; L-Softmax m in {2, 3, 4}. The pick, per kind, is the rule in ``pick``: the pivot unless a
setting beats it by more than the sweep's noise.

Writes benchmarks/results/margin_sweep.json: every run (the cache: a finished run is never redone), the table,
the noise and the picks; docs/RESULTS.md shows the table (``python benchmarks/accuracy.py --report``).

    python benchmarks/margin_sweep.py --jobs 2      # 32 runs on 2 cores
    python benchmarks/margin_sweep.py --report      # the table from the cached runs only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned run processes find accuracy the same way
from accuracy import RESULTS, ROOT, Cell, Study, Variant, execute, fmt_ci, grid, load_runs  # noqa: E402

CACHE = RESULTS / "margin_sweep.json"
COMMAND = "python benchmarks/margin_sweep.py --jobs 2"
SOFTMAX = "softmax"
PIVOT = {"cosface": (0.2, 16.0), "arcface": (0.3, 16.0), "lsoftmax": (2.0, None)}  # (m, s) the sweep centres on
SCALES = (8.0, 16.0, 32.0, 64.0)
MARGINS = {"cosface": (0.1, 0.2, 0.35), "arcface": (0.1, 0.3, 0.5), "lsoftmax": (2.0, 3.0, 4.0)}
RECIPE = (
    "Fashion-MNIST at 28x28, timm's test_resnet (0.37M parameters, d = 96), 6,000 training images x 10 epochs, "
    "batch 128, AdamW lr 2e-3, weight decay 0.05, cosine with 1 warm-up epoch, no label smoothing"
)


def setting(loss: str, m: float, s: float | None) -> Variant:
    name = f"{loss} m={m:g}" + (f" s={s:g}" if s else "")
    margin = {"margin": m} | ({"margin_scale": s} if s else {})
    return Variant(name, {"head": "linear", "loss": loss, **margin}, baseline=SOFTMAX)


def variants() -> list[Variant]:
    """Softmax, then per kind its settings (each once: the pivot is on both axes)."""
    out = [Variant(SOFTMAX, {"head": "linear"})]
    for loss, (m0, s0) in PIVOT.items():
        points = [(m0, s) for s in SCALES] if s0 else []
        points += [(m, s0) for m in MARGINS[loss] if (m, s0) not in points]
        out += [setting(loss, m, s) for m, s in sorted(points, key=lambda p: (p[0], p[1] or 0))]
    return out


def sweep_study(cache_path: Path = CACHE) -> Study:
    poor = next(c for c in grid("cpu")[0] if c.name == "CNN, data-poor")  # RECIPE describes its overrides
    cell = Cell("the CPU grid's CNN, data-poor cell with the linear head", poor.overrides, variants())
    return Study("margin_sweep", [cell], RECIPE, cache_path, load_runs(cache_path))


def rows(study: Study) -> list[dict]:
    """One row per setting: its top-1 per seed, mean and std, and the paired difference to softmax."""
    cell, out = study.cells[0], []
    for variant in cell.variants:
        top1 = study.top1(cell, variant)
        o = variant.overrides
        row = {
            "setting": variant.name,
            "loss": o.get("loss", SOFTMAX),
            "m": o.get("margin"),
            "s": o.get("margin_scale"),
            "top1": top1,
            "seeds": len(top1),
            "mean": statistics.mean(top1.values()) if top1 else None,
            "std": statistics.stdev(top1.values()) if len(top1) > 1 else None,
            "vs_softmax": study.comparison(cell, variant) if variant.name != SOFTMAX else None,
        }
        out.append(row)
    return out


def noise(table: list[dict]) -> float:
    """The sweep's noise: the pooled std over seeds of the paired differences to softmax (every margin setting
    contributes its seeds' spread): about one standard error of the gap between two settings' 2-seed means."""
    variances, df = 0.0, 0
    for r in table:
        c = r["vs_softmax"]
        if c is not None and c["n"] > 1:
            diffs = [r["top1"][s] - table[0]["top1"][s] for s in r["top1"] if s in table[0]["top1"]]
            variances += statistics.variance(diffs) * (len(diffs) - 1)
            df += len(diffs) - 1
    return math.sqrt(variances / df) if df else math.nan


def pick(table: list[dict], eps: float) -> dict[str, dict]:
    """Per kind: the pivot (the default the sweep started from, the simplest choice: nothing changes) unless its
    best setting's mean paired difference to softmax beats the pivot's by more than ``eps`` (the sweep's noise);
    then that best setting."""
    picks = {}
    for loss, (m0, s0) in PIVOT.items():
        mine = [r for r in table if r["loss"] == loss and r["vs_softmax"] is not None]
        pivot = next((r for r in mine if r["m"] == m0 and r["s"] == s0), None)
        if pivot is None:
            continue
        best = max(mine, key=lambda r: r["vs_softmax"]["mean"])
        gain = best["vs_softmax"]["mean"] - pivot["vs_softmax"]["mean"]
        chosen = best if gain > eps else pivot
        picks[loss] = {
            "m": chosen["m"],
            "s": chosen["s"],
            "setting": chosen["setting"],
            "best": best["setting"],
            "best_over_pivot": gain,
            "why": "beats the pivot by more than the noise"
            if chosen is best and best is not pivot
            else "the pivot: no setting beats it by more than the noise",
        }
    return picks


def markdown(study: Study, table: list[dict], eps: float, picks: dict[str, dict]) -> list[str]:
    n_runs = len(study.keys(study.cells))
    minutes = sum(study.runs[k].get("wall_s", 0) for k in study.keys(study.cells) if k in study.runs) / 60
    devices = sorted({r["device"] for r in study.runs.values() if "device" in r})
    lines = [
        f"Setting: {study.cells[0].name}: {study.recipe}; seeds 0-1; each setting paired by seed with plain "
        f"softmax (95% CI, t over 2 seeds: wide). {n_runs} runs, {minutes:.0f} minutes of run time on "
        f"{', '.join(devices)}. Command: `{COMMAND}`.",
        "",
        "| loss | m | s | seeds | top-1 mean | std | difference to softmax, 95% CI | verdict | pick |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = {p["setting"] for p in picks.values()}
    for r in table:
        if not r["seeds"]:
            lines.append(f"| {r['loss']} | {_num(r['m'])} | {_num(r['s'])} | 0 | - | - | - | pending | |")
            continue
        c = r["vs_softmax"]
        diff, verdict = (fmt_ci(c), c["verdict"]) if c else ("(reference)", "")
        std = f"{r['std']:.2f}" if r["std"] is not None else "-"
        lines.append(
            f"| {r['loss']} | {_num(r['m'])} | {_num(r['s'])} | {r['seeds']} | {r['mean']:.2f} | {std} | "
            f"{diff} | {verdict} | {'**default**' if r['setting'] in chosen else ''} |"
        )
    lines += [
        "",
        "By scale s (CosFace and ArcFace at their pivot m, both seeds): "
        + "; ".join(
            f"s = {s:g}: {statistics.mean(d):+.2f} on average, {sum(x < 0 for x in d)} of {len(d)} runs below softmax"
            for s, d in scale_diffs(table).items()
        )
        + ".",
        "",
    ]
    lines += [
        f"Noise (pooled std over seeds of the paired differences to softmax): {eps:.2f} points. "
        + " ".join(
            f"{loss}: {p['setting']} ({p['why']}; best {p['best']}, {p['best_over_pivot']:+.2f} over the pivot)."
            for loss, p in picks.items()
        )
    ]
    return lines


def scale_diffs(table: list[dict]) -> dict[float, list[float]]:
    """Per s, the per-seed differences to softmax of the cosine kinds' settings at their pivot m."""
    out: dict[float, list[float]] = {}
    for r in table:
        if r["s"] is not None and r["m"] == PIVOT[r["loss"]][0]:
            out.setdefault(r["s"], []).extend(r["top1"][k] - table[0]["top1"][k] for k in r["top1"])
    return dict(sorted(out.items()))


def _num(v) -> str:
    return "-" if v is None else f"{v:g}"


def write(study: Study) -> dict:
    """The sweep's JSON: the runs (the cache) and the table, noise, picks and their markdown."""
    table = rows(study)
    eps = noise(table)
    picks = pick(table, eps)
    out = {
        "scale": study.scale,
        "command": COMMAND,
        "recipe": study.recipe,
        "table": table,
        "noise": eps,
        "picks": picks,
        "markdown": markdown(study, table, eps, picks),
        "runs": study.runs,
    }
    tmp = study.cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(study.cache_path)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--report", action="store_true", help="only print the table from the cached runs")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "accuracy"), help="checkpoints of every run")
    parser.add_argument("--results", default=str(CACHE), help="the sweep's JSON (runs and table)")
    args = parser.parse_args(argv)
    study = sweep_study(Path(args.results))
    if not args.report:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        execute(study, Path(args.runs_dir), "cpu", args.jobs, 0, threads)
    print("\n".join(write(study)["markdown"]))


if __name__ == "__main__":
    main()
