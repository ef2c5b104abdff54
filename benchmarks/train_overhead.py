"""Training-time cost of the MC head against the linear head, eager and fused, and of what feeds the step.

All rows in one run, calls interleaved, medians (benchmarks/common.py):
  full    a full training step (forward, loss, backward, clip, AdamW) of resnet50 at 224x224, C=1000: MC shared and
          local, eager and fused (``--compile head``), against the linear head;
  small   the same step for resnet18 at 28x28, C=10;
  head    a training step of the head alone on 2048-d features (the paper's ResNet-50 head) at C=1000 and
          C=21,843 (ImageNet-21k): time and, on CUDA, peak memory, MC / linear;
  draw    drawing the sub-centers at C=1000: one vectorised draw against the authors' per-class loop;
  e2e     ``mcc_train.train.train_one_epoch`` (the data loader over an in-memory dataset, the loss read one step
          late, the schedule) against the bare step loop on one batch already on the device: images/s;
  input   the input pipeline (``load_data`` + timm's train transforms, --workers processes) on a folder of real JPEG
          files at 224, against the full step's images/s.

    python benchmarks/train_overhead.py [--device cpu|cuda] [--repeats N] [--workers N] [--skip ROW ...]

On CUDA: bf16 autocast, channels_last, fused AdamW, batch 128 (full, e2e), 256 (head). On CPU: fp32, smaller
batches (printed) and fewer repeats: what the CPU can measure, not the GPU targets.
Targets (GPU): full <= 1.02, head <= 1.5x (C=1000) and <= 2.0x (C=21,843), head peak memory <= 1.5x at C=21,843
(memory a step allocates beyond the parameters, gradients and optimizer state held before it), e2e >= 0.95,
draw >= 20x. The JSON is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timm.loss import SoftTargetCrossEntropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median_ms, print_table, time_interleaved, write_json  # noqa: E402
from mcc_train import MultiCenterHead, MultiCenterLoss, TrainConfig, create_model  # noqa: E402
from mcc_train.head import fuse_mc  # noqa: E402

ROWS = ("full", "small", "head", "draw", "e2e", "input")
VARIANTS = {  # name -> (head, sampling, fused)
    "linear": ("linear", None, False),
    "MC shared": ("mc", "shared", False),
    "MC local": ("mc", "local", False),
    "MC shared, fused": ("mc", "shared", True),
    "MC local, fused": ("mc", "local", True),
}


class Setup:
    """Device, precision and sizes for this run."""

    def __init__(self, args):
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.amp = torch.bfloat16 if self.cuda else None
        self.full_batch = args.full_batch or (128 if self.cuda else 8)
        self.head_batch = 256 if self.cuda else 64
        self.repeats = args.repeats or (30 if self.cuda else 8)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def make_model(arch: str, num_classes: int, variant: str, s: Setup, img_size: int) -> torch.nn.Module:
    head, sampling, _ = VARIANTS[variant]
    mc = {"mc": TrainConfig(sampling=sampling).mc()} if head == "mc" else {}
    model = create_model(arch, num_classes, head=head, img_size=img_size, **mc).to(s.dev)
    return model.to(memory_format=torch.channels_last) if s.cuda else model


def make_step(model: torch.nn.Module, variant: str, x: torch.Tensor, soft: torch.Tensor, s: Setup, clip=5.0):
    """One training step as mcc-train takes it (autocast forward, fp32 loss, backward, clip, AdamW) on a fixed batch;
    returns (step, loss_fn, optimizer)."""
    head = model if isinstance(model, (MultiCenterHead, torch.nn.Linear)) else model.get_classifier()
    loss_fn = MultiCenterLoss(head) if isinstance(head, MultiCenterHead) else SoftTargetCrossEntropy()
    if VARIANTS[variant][2]:
        fuse_mc(model, loss_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=s.cuda or None)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(s.dev.type, dtype=s.amp, enabled=s.amp is not None):
            logits = model(x)
        loss_fn(logits.float(), soft).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    return step, loss_fn, optimizer


def synced(step, s: Setup):
    def run():
        step()
        s.sync()

    return run


def batch(s: Setup, n: int, chans: int, size: int, num_classes: int):
    x = torch.randn(n, chans, size, size, device=s.dev)
    if s.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (n,), device=s.dev)
    soft = torch.nn.functional.one_hot(y, num_classes).float() * 0.9 + 0.1 / num_classes  # label smoothing 0.1
    return x, soft


def step_rows(name: str, arch: str, size: int, num_classes: int, n: int, s: Setup, record: dict, rows: list):
    """MC / linear for every variant on a full model step."""
    x, soft = batch(s, n, 3, size, num_classes)
    steps = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        steps[variant] = synced(make_step(make_model(arch, num_classes, variant, s, size), variant, x, soft, s)[0], s)
    t = time_interleaved(steps, s.repeats)
    base = median_ms(t["linear"])
    record[name] = {"batch": n, **{v: {"ms": median_ms(t[v]), "img_s": n / median_ms(t[v]) * 1000} for v in t}}
    for variant in list(VARIANTS)[1:]:
        ratio = median_ms(t[variant]) / base
        label = f"{arch} {size}x{size}, C={num_classes}, batch {n}, step"
        rows.append(
            [
                label,
                variant,
                base,
                median_ms(t[variant]),
                f"{ratio:.3f}x",
                "<= 1.02x" if name == "full" else "",
                n / median_ms(t[variant]) * 1000,
            ]
        )
    return n / median_ms(t["MC shared, fused"]) * 1000


def head_rows(num_classes: int, s: Setup, record: dict, rows: list, target: float):
    n, d = s.head_batch, 2048
    feats = torch.randn(n, d, device=s.dev)
    y = torch.randint(0, num_classes, (n,), device=s.dev)
    soft = torch.nn.functional.one_hot(y, num_classes).float()
    steps, memory = {}, {}
    for variant, (head, sampling, _) in VARIANTS.items():
        torch.manual_seed(0)
        module = (
            torch.nn.Linear(d, num_classes) if head == "linear" else MultiCenterHead(d, num_classes, sampling=sampling)
        )
        step = synced(make_step(module.to(s.dev), variant, feats, soft, s, clip=None)[0], s)
        steps[variant] = step
        if s.cuda:
            step()  # compiled and the optimizer state made before the peak is read
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step()
            memory[variant] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    repeats = s.repeats if num_classes <= 1000 or s.cuda else max(3, s.repeats // 2)
    t = time_interleaved(steps, repeats)
    base = median_ms(t["linear"])
    record[f"head_c{num_classes}"] = {
        "batch": n,
        "d": d,
        **{v: {"ms": median_ms(t[v]), "peak_mib": memory.get(v)} for v in t},
    }
    for variant in list(VARIANTS)[1:]:
        ratio = median_ms(t[variant]) / base
        mem = f", mem {memory[variant] / memory['linear']:.2f}x" if memory else ""
        rows.append(
            [
                f"head only, C={num_classes}, d={d}, batch {n}",
                variant,
                base,
                median_ms(t[variant]),
                f"{ratio:.3f}x{mem}",
                f"<= {target}x",
                "",
            ]
        )


def authors_loop_draw(head: MultiCenterHead, s: Setup):
    """The authors' approach: per class, noise drawn on the CPU, copied to the device, one small kernel each."""
    weight, std = head.weight.detach(), head.std().detach()
    K, d = head.num_subcenters, head.in_features

    def draw():
        rows = []
        for c in range(head.num_classes):
            eps = torch.randn(K, d).to(weight.device)
            rows.append(torch.cat([weight[c : c + 1], weight[c] + std[c] * eps]))
        torch.cat(rows)
        s.sync()

    return draw


def draw_row(s: Setup, record: dict, rows: list):
    head = MultiCenterHead(2048, 1000).to(s.dev)

    def vectorised():
        with torch.no_grad():
            head.sample_centers()
        s.sync()

    t = time_interleaved({"loop": authors_loop_draw(head, s), "vectorised": vectorised}, max(5, s.repeats // 3))
    speedup = median_ms(t["loop"]) / median_ms(t["vectorised"])
    record["draw_c1000"] = {"loop_ms": median_ms(t["loop"]), "vectorised_ms": median_ms(t["vectorised"])}
    rows.append(
        [
            "draw C*K*d sub-centers, C=1000",
            "loop vs vectorised",
            median_ms(t["loop"]),
            median_ms(t["vectorised"]),
            f"{speedup:.0f}x faster",
            ">= 20x",
            "",
        ]
    )


def e2e_row(s: Setup, workers: int, record: dict, rows: list):
    """train_one_epoch over an in-memory dataset against the bare loop on one device batch: same model, batch,
    loss, clip and optimizer."""
    from mcc_train.train import Runtime, build_step, train_one_epoch

    arch, size, num_classes = ("resnet50", 224, 1000) if s.cuda else ("resnet18", 28, 10)
    n, steps = s.full_batch if s.cuda else 64, 50 if s.cuda else 8  # one epoch: its loader start-up included
    images = torch.randn(n * steps, 3, size, size)
    labels = torch.randint(0, num_classes, (n * steps,))
    data = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(
        data, n, shuffle=True, drop_last=True, num_workers=workers, pin_memory=s.cuda, persistent_workers=workers > 0
    )
    cfg = TrainConfig(arch=arch, epochs=1, lr=1e-4, warmup_epochs=0, compile="head", progress=False)
    rt = Runtime(s.dev, amp_dtype=s.amp, channels_last=s.cuda)
    torch.manual_seed(0)
    model = make_model(arch, num_classes, "MC shared, fused", s, size)
    step = build_step(model, cfg, rt, num_classes, steps)
    x, soft = batch(s, n, 3, size, num_classes)

    def loop():  # the same forward, loss, backward, clip and optimizer, on one batch already on the device
        for _ in range(steps):
            step.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(s.dev.type, dtype=s.amp, enabled=s.amp is not None):
                logits = model(x)
            step.loss_fn(logits.float(), soft).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            step.optimizer.step()
        s.sync()

    def epoch():
        train_one_epoch(step, loader, cfg, rt, 0, num_classes)  # its end-of-epoch loss read syncs

    t = time_interleaved({"bare": loop, "mcc-train": epoch}, max(3, s.repeats // 4), warmup=1)
    bare_ips, e2e_ips = n * steps / (median_ms(t["bare"]) / 1000), n * steps / (median_ms(t["mcc-train"]) / 1000)
    record["e2e"] = {
        "arch": arch,
        "img_size": size,
        "batch": n,
        "steps": steps,
        "workers": workers,
        "bare_img_s": bare_ips,
        "mcc_train_img_s": e2e_ips,
    }
    label = f"end to end, {arch} {size}x{size}, batch {n}, {steps} steps, {workers} workers"
    rows.append(
        [
            label,
            "bare loop vs train_one_epoch",
            1000 * n / bare_ips,
            1000 * n / e2e_ips,
            f"{bare_ips / e2e_ips:.3f}x",
            "<= 1.05x",
            e2e_ips,
        ]
    )


def jpeg_folder(root: Path, per_class: int = 64, classes: int = 4, size: int = 256) -> Path:
    """A folder of real JPEG files, 256x256 RGB: digits upscaled and tinted, with noise (JPEG work like a photo's)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.asarray(
                    Image.fromarray((digits.images[c * 50 + i % 50] * 16).astype(np.uint8)).resize(
                        (size, size), Image.BICUBIC
                    ),
                    dtype=np.float32,
                )
                rgb = base[..., None] * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 18, (size, size, 3))
                Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def input_row(s: Setup, workers: int, step_ips: float | None, record: dict, rows: list):
    from mcc_train.data import build_data_config, build_transforms, load_data, set_transforms

    with tempfile.TemporaryDirectory() as tmp:
        splits = load_data(f"imagefolder:{jpeg_folder(Path(tmp))}")
        model = create_model("resnet50", splits.num_classes, head="mc")
        dc = build_data_config(model, 224, 3, 1.0, "bicubic")
        set_transforms(splits, *build_transforms(dc, 0.5, (0.08, 1.0)), 3)
        batches = 40 if workers < 4 else 200
        sampler = torch.utils.data.RandomSampler(splits.train, replacement=True, num_samples=32 * (batches + 5))
        loader = iter(torch.utils.data.DataLoader(splits.train, 32, sampler=sampler, num_workers=workers))
        for _ in range(5):  # the workers started and their prefetch filled: what follows is the steady state
            next(loader)
        start = time.perf_counter()
        seen = sum(len(images) for images, _ in loader)
        ips = seen / (time.perf_counter() - start)
    record["input_jpeg_224"] = {
        "workers": workers,
        "img_s": ips,
        "img_s_per_worker": ips / max(workers, 1),
        "step_img_s": step_ips,
    }
    need = f"{math.ceil(step_ips / (ips / max(workers, 1)))} workers feed the step" if step_ips else ""
    label = f"input: JPEG 256 -> 224, train transforms, {workers} workers"
    rows.append([label, "loader vs full MC step (img/s)", ips, step_ips or float("nan"), need, "loader >= step", ips])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 30 CUDA, 8 CPU)")
    parser.add_argument("--full-batch", type=int, default=None, help="batch of the full step (default 128 CUDA, 8 CPU)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: all cores but one)")
    parser.add_argument("--skip", nargs="*", default=[], choices=ROWS, help="rows to leave out")
    args = parser.parse_args()
    s = Setup(args)
    workers = args.workers if args.workers is not None else max(1, (torch.multiprocessing.cpu_count() or 2) - 1)
    torch.manual_seed(0)
    rows, record = [], {}
    precision = "bf16 autocast, channels_last, fused AdamW" if s.cuda else "fp32"
    headers = ["measurement", "variant", "baseline ms", "MC ms", "MC / baseline", "target (GPU)", "img/s"]

    def save(final: bool = False) -> None:
        if final:
            print(f"\ntrain overhead on {s.dev} ({precision}), medians of {s.repeats} interleaved runs\n")
            table = print_table(headers, rows)
        else:
            table = None
        write_json(
            "train_overhead",
            {
                "device": str(s.dev),
                "precision": precision,
                "complete": final,
                "results": record,
                "rows": rows,
                "table": table,
            },
        )

    step_ips = None
    if "full" not in args.skip:
        step_ips = step_rows("full", "resnet50", 224, 1000, s.full_batch, s, record, rows)
        save()
    if "small" not in args.skip:
        step_rows("small", "resnet18", 28, 10, 128, s, record, rows)
        save()
    if "head" not in args.skip:
        head_rows(1000, s, record, rows, 1.5)
        head_rows(21843, s, record, rows, 2.0)
        save()
    if "draw" not in args.skip:
        draw_row(s, record, rows)
    if "e2e" not in args.skip:
        e2e_row(s, workers, record, rows)
        save()
    if "input" not in args.skip:
        input_row(s, workers, step_ips, record, rows)
    save(final=True)


if __name__ == "__main__":
    main()
