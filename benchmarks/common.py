"""Shared by the benchmark scripts: interleaved timing, a printed table, a JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def time_interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved so drift and noise hit all of them alike; the order
    alternates from round to round, so no function always runs right after the same other one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in list(fns.items())[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def print_table(headers: list[str], rows: list[list]) -> str:
    """Print a Markdown table (docs/benchmarks.md pastes it as is) and return it."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in cells]
    table = "\n".join(lines)
    print(table)
    return table


def machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}, indent=2))
    print(f"wrote {path}")
    return path
