"""Training-time cost of the MC head against the linear head, and of the vectorised sub-center draw.

Three measurements, in one run (calls interleaved, medians):
  (a) a full training step of resnet18 at 28x28, C=10, same batch: MC / linear;
  (b) a training step of a C=1000 head on 2048-d features alone (the paper's ResNet-50 ImageNet head): MC / linear,
      for the paper's shared draw and for the local reparameterization;
  (c) drawing the sub-centers at C=1000: one vectorised draw against a Python loop over classes that draws on the
      CPU and copies to the device (the authors' code).

    python benchmarks/train_overhead.py [--repeats 30] [--device cpu|cuda]

Targets: (a) <= 1.03, (b) <= 3.5, (c) >= 20x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timm.loss import SoftTargetCrossEntropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median_ms, print_table, time_interleaved, write_json  # noqa: E402
from mcc_train import MultiCenterHead, MultiCenterLoss, create_model  # noqa: E402


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One AdamW training step (forward, loss, backward, update) of ``model`` on a fixed batch."""
    head = model if isinstance(model, MultiCenterHead) else getattr(model, "get_classifier", lambda: None)()
    loss_fn = MultiCenterLoss(head) if isinstance(head, MultiCenterHead) else SoftTargetCrossEntropy()
    soft = torch.nn.functional.one_hot(y, 1000 if x.ndim == 2 else 10).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), soft).backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def authors_loop_draw(head: MultiCenterHead):
    """The authors' approach: per class, noise drawn on the CPU, copied to the device, one small kernel each."""
    weight, std = head.weight.detach(), head.std().detach()
    K, d = head.num_subcenters, head.in_features

    def draw():
        rows = []
        for c in range(head.num_classes):
            eps = torch.randn(K, d).to(weight.device)
            rows.append(torch.cat([weight[c : c + 1], weight[c] + std[c] * eps]))
        centers = torch.cat(rows)
        if weight.is_cuda:
            torch.cuda.synchronize()
        return centers

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows, record = [], {}

    # (a) resnet18 at 28x28, C=10
    x = torch.randn(args.batch_size, 3, 28, 28, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    steps = {head: make_step(create_model("resnet18", 10, head=head).to(dev), x, y) for head in ("linear", "mc")}
    t = time_interleaved(steps, args.repeats)
    ratio = median_ms(t["mc"]) / median_ms(t["linear"])
    record["resnet18_28px_c10"] = {"linear_ms": median_ms(t["linear"]), "mc_ms": median_ms(t["mc"]), "ratio": ratio}
    rows.append(
        [
            "(a) resnet18 28x28, C=10, step",
            "shared",
            median_ms(t["linear"]),
            median_ms(t["mc"]),
            f"{ratio:.3f}",
            "<= 1.03",
            "yes" if ratio <= 1.03 else "NO",
        ]
    )

    # (b) C=1000 head on 2048-d features
    feats = torch.randn(args.batch_size, 2048, device=dev)
    y = torch.randint(0, 1000, (args.batch_size,), device=dev)
    heads = {
        "linear": torch.nn.Linear(2048, 1000),
        "shared": MultiCenterHead(2048, 1000, sampling="shared"),
        "local": MultiCenterHead(2048, 1000, sampling="local"),
    }
    t = time_interleaved({k: make_step(h.to(dev), feats, y) for k, h in heads.items()}, args.repeats)
    for mode in ("shared", "local"):
        ratio = median_ms(t[mode]) / median_ms(t["linear"])
        record[f"head_c1000_d2048_{mode}"] = {
            "linear_ms": median_ms(t["linear"]),
            "mc_ms": median_ms(t[mode]),
            "ratio": ratio,
        }
        rows.append(
            [
                "(b) C=1000 head on 2048-d, step",
                mode,
                median_ms(t["linear"]),
                median_ms(t[mode]),
                f"{ratio:.3f}",
                "<= 3.5",
                "yes" if ratio <= 3.5 else "NO",
            ]
        )

    # (c) drawing the sub-centers, C=1000, d=2048, K=2
    head = heads["shared"]
    t = time_interleaved(
        {"loop": authors_loop_draw(head), "vectorised": lambda: head.sample_centers().detach()},
        max(5, args.repeats // 3),
    )
    speedup = median_ms(t["loop"]) / median_ms(t["vectorised"])
    record["draw_c1000"] = {
        "loop_ms": median_ms(t["loop"]),
        "vectorised_ms": median_ms(t["vectorised"]),
        "speedup": speedup,
    }
    met = "yes" if speedup >= 20 else "NO"
    rows.append(
        [
            "(c) draw C*K*d sub-centers, C=1000",
            "loop vs vectorised",
            median_ms(t["loop"]),
            median_ms(t["vectorised"]),
            f"{speedup:.1f}x",
            ">= 20x",
            met,
        ]
    )

    print(f"\ntrain overhead on {dev}, batch {args.batch_size}, medians of {args.repeats} interleaved runs\n")
    table = print_table(["measurement", "mode", "baseline ms", "MC ms", "ratio", "target", "met"], rows)
    write_json("train_overhead", {"device": str(dev), "batch_size": args.batch_size, "results": record, "table": table})


if __name__ == "__main__":
    main()
