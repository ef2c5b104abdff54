"""The training loop: one process, or one of many under torchrun (DDP).

Read top to bottom: ``train`` builds the data, model, optimizer and schedule, then alternates
``train_one_epoch`` and ``evaluate``; rank 0 writes checkpoints, metrics.csv and curves.png.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .config import TrainConfig, save_yaml
from .data import ArrayDataset, build_data_config, build_transforms, cache_in_memory, load_data, set_transforms
from .errors import UsageError
from .head import MultiCenterHead, MultiCenterLoss
from .model import create_model, get_mc_head
from .plots import plot_curves

_logger = logging.getLogger("mcc_train")

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "eval_loss",
    "top1",
    "top5",
    "lr",
    "sub_center_std",
    "offset_ratio",
    "logit_margin",
    "logit_spread",
    "epoch_time_s",
]


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size, and the precision it trains in."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None: full fp32
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device; join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    amp_dtype = None
    if use_cuda and cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Runtime(device, rank, world_size, amp_dtype, channels_last=use_cuda and cfg.channels_last)


def top_k_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Counts of samples whose target is among the top-k logits, one per k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # (B, k)
    hits = top.eq(target.unsqueeze(-1))  # (B, k)
    return [hits[:, : min(k, logits.shape[-1])].any(-1).sum() for k in ks]


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, mixup, cfg, rt, epoch, scaler, num_classes) -> float:
    """One pass over the training data; returns the mean training loss over all ranks."""
    model.train()
    steps = len(loader)
    total, count = torch.zeros((), device=rt.device), 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=None if rt.is_main and cfg.progress else True,
        leave=False,
    )
    for step, (images, target) in enumerate(bar):
        images = images.to(rt.device, non_blocking=True)
        target = target.to(rt.device, non_blocking=True)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, soft = mixup(images, target)  # soft: (B, C), label smoothing included
        else:
            soft = mixup_target(target, num_classes, smoothing=cfg.label_smoothing)  # (B, C)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            logits = model(images)  # (B, C*(K+1)) for MC, (B, C) for linear
        loss = loss_fn(logits.float(), soft)
        loss_value = loss.item()  # the step's one host sync: the divergence check and the progress bar share it
        if not math.isfinite(loss_value):
            raise UsageError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {loss_value}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(num_updates=epoch * steps + step + 1)
        total += loss.detach() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    sums = all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=rt.device)]), rt)
    return (sums[0] / sums[1]).item()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(model, loader, rt: Runtime, head: MultiCenterHead | None = None) -> dict:
    """Eval-mode loss, top-1 and top-5 (percent) over the whole val set, summed across ranks.

    Also the scale of the logits: ``logit_margin``, the mean of (target logit - best other logit), and for an MC
    ``head`` ``logit_spread``, the mean std of the target class's sub-center logits around its mean-center logit.
    """
    model.eval()
    features = []
    hook = head.register_forward_hook(lambda m, args, out: features.append(args[0])) if head is not None else None
    try:
        sums = eval_sums(model, loader, rt, head, features)
    finally:
        if hook is not None:
            hook.remove()
    loss, top1, top5, n, margin, spread = all_reduce_sum(sums, rt).tolist()
    metrics = {"eval_loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "logit_margin": margin / n}
    if head is not None:
        metrics["logit_spread"] = spread / n
    return metrics


def eval_sums(model, loader, rt: Runtime, head: MultiCenterHead | None, features: list) -> torch.Tensor:
    """Sums over this rank's val shard: loss, top-1 and top-5 hits, count, logit margin, sub-center spread."""
    sums = torch.zeros(6, dtype=torch.float64, device=rt.device)
    for images, target in loader:
        images = images.to(rt.device, non_blocking=True)
        target = target.to(rt.device, non_blocking=True)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            logits = model(images).float()  # (B, C): the mean centers only
        top1, top5 = top_k_correct(logits, target)
        true = logits.gather(1, target[:, None]).squeeze(1)  # (B,)
        other = logits.scatter(1, target[:, None], float("-inf")).amax(1)  # (B,)
        spread = head.logit_std(features.pop().float()).gather(1, target[:, None]).sum() if head is not None else 0.0
        sums += torch.stack(
            [
                F.cross_entropy(logits, target, reduction="sum"),
                top1,
                top5,
                target.new_tensor(len(target)),
                (true - other).sum(),
                torch.as_tensor(spread, device=rt.device),
            ]
        ).double()
    return sums


def build_loaders(splits, cfg: TrainConfig, rt: Runtime):
    """Train loader (shuffled, sharded over ranks, whole batches) and val loader (sharded without padding)."""
    pin = rt.device.type == "cuda"
    train_sampler = DistributedSampler(splits.train, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed)
    train = DataLoader(
        splits.train,
        cfg.batch_size,
        sampler=train_sampler,
        num_workers=cfg.workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=cfg.workers > 0,
    )
    val_index = list(range(rt.rank, len(splits.val), rt.world_size))  # every val image exactly once over ranks
    val_set = torch.utils.data.Subset(splits.val, val_index)
    if isinstance(splits.val, ArrayDataset):
        val_set = cache_in_memory(val_set)
    val = DataLoader(
        val_set,
        cfg.batch_size * 2,
        num_workers=cfg.workers,
        pin_memory=pin,
        persistent_workers=cfg.workers > 0,
    )
    if len(train) == 0:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than the {len(splits.train) // rt.world_size} training images "
            "per rank; lower it"
        )
    return train, train_sampler, val


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """Create --out; refuse to overwrite an earlier run's checkpoints unless resuming or --overwrite."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not cfg.resume and not cfg.overwrite and (out / "last.pt").exists():
        raise UsageError(
            f"--out {out} already holds a run; continue it with --resume {out / 'last.pt'}, "
            "pick another --out, or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the final summary (best top-1, epochs, paths)."""
    cfg.validate()
    rt = setup_runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rt: Runtime) -> dict:
    start_time = time.time()
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    out = prepare_out_dir(cfg) if rt.is_main else Path(cfg.out)

    splits = load_data(cfg.data, cfg.subset)
    in_chans = cfg.in_chans or (1 if splits.grayscale else 3)
    hflip = cfg.hflip if cfg.hflip is not None else (0.0 if splits.name == "digits" else 0.5)
    random_seed(cfg.seed, 0)  # the same initial weights on every rank
    model = create_model(
        cfg.arch,
        splits.num_classes,
        head=cfg.head,
        in_chans=in_chans,
        mc=cfg.mc(),
        img_size=cfg.img_size,
        checkpoint_path=cfg.checkpoint_path,
        drop_rate=cfg.drop_rate,
        **cfg.model_kwargs,
    )
    data_config = build_data_config(model, cfg.img_size, in_chans, cfg.crop_pct, cfg.interpolation)
    train_tf, val_tf = build_transforms(data_config, hflip, cfg.scale)
    set_transforms(splits, train_tf, val_tf, in_chans)
    train_loader, train_sampler, val_loader = build_loaders(splits, cfg, rt)

    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    head = get_mc_head(model)
    loss_fn = MultiCenterLoss(head, cfg.kl_weight) if head is not None else SoftTargetCrossEntropy()
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.epochs,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1),
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=splits.num_classes,
        )

    start_epoch, best_top1, best_epoch = 0, -1.0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, best_top1, best_epoch = resume["epoch"], resume["best_top1"], resume["best_epoch"]
        if start_epoch >= cfg.epochs:
            raise UsageError(f"--resume {cfg.resume}: already trained {start_epoch} epochs; raise --epochs to go on")
    ddp_model = (
        DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        if rt.distributed
        else model
    )

    if rt.is_main:
        save_yaml(cfg, out / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(
            "%s %s head, %d classes, %d train / %d val images, %.2fM params, %s x%d%s, %d steps/epoch per rank",
            cfg.arch,
            cfg.head,
            splits.num_classes,
            len(splits.train),
            len(splits.val),
            n_params / 1e6,
            rt.device,
            rt.world_size,
            f", amp {str(rt.amp_dtype).split('.')[-1]}" if rt.amp_dtype else "",
            len(train_loader),
        )
    metrics = {}
    rows = read_metrics(out / "metrics.csv", start_epoch) if rt.is_main else []
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.time()
        random_seed(cfg.seed * 1000 + epoch, rt.rank)  # per epoch: a resumed run draws what the unbroken one would
        train_sampler.set_epoch(epoch)
        scheduler.step(epoch)
        train_loss = train_one_epoch(
            ddp_model, train_loader, optimizer, scheduler, loss_fn, mixup, cfg, rt, epoch, scaler, splits.num_classes
        )
        lr = optimizer.param_groups[0]["lr"]  # at the epoch's last step
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, **evaluate(ddp_model, val_loader, rt, head), "lr": lr}
        if head is not None:
            metrics["sub_center_std"] = head.std().mean().item()
            metrics["offset_ratio"] = head.offset_ratio().mean().item()
        metrics["epoch_time_s"] = time.time() - epoch_start
        is_best = metrics["top1"] > best_top1
        if is_best:
            best_top1, best_epoch = metrics["top1"], epoch + 1
        if rt.is_main:
            state = {
                "arch": cfg.arch,
                "head": cfg.head,
                "num_classes": splits.num_classes,
                "in_chans": in_chans,
                "class_names": splits.class_names,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": epoch + 1,
                "config": cfg.to_dict(),
                "data_config": _plain(data_config),
                "metrics": metrics,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
            }
            rows.append(metrics)
            write_metrics(out / "metrics.csv", rows)  # before the checkpoint: a resume trims rows past it
            save_checkpoint(state, out / "last.pt")
            if is_best:
                save_checkpoint(state, out / "best.pt")
            plot_curves(out / "metrics.csv", out / "curves.png")
            _logger.info(
                "epoch %d/%d  train_loss %.4f  eval_loss %.4f  top1 %.2f  top5 %.2f  lr %.2e%s  (%.1fs)",
                epoch + 1,
                cfg.epochs,
                train_loss,
                metrics["eval_loss"],
                metrics["top1"],
                metrics["top5"],
                lr,
                f"  std {metrics['sub_center_std']:.4f}" if head is not None else "",
                metrics["epoch_time_s"],
            )
    return {
        "epochs": cfg.epochs,
        "best_top1": best_top1,
        "best_epoch": best_epoch,
        "last": metrics,
        "out": str(out),
        "wall_time_s": time.time() - start_time,
    }


def _plain(data_config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """Rows of an earlier metrics.csv for epochs <= up_to_epoch (a resumed run redoes the later ones)."""
    if up_to_epoch == 0 or not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit() and int(row["epoch"]) <= up_to_epoch]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv, one row per epoch, atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS} for row in rows)

    atomic_write(path, write)
