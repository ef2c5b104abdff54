"""The training loop: one process, or one of many under torchrun (DDP).

Read top to bottom: ``train`` builds the data, model, optimizer and schedule, then alternates
``train_one_epoch`` and ``evaluate``; rank 0 writes checkpoints, metrics.csv and curves.png.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .checkpoint import load_checkpoint, make_state, save_checkpoint
from .config import TrainConfig
from .data import ArrayDataset, build_data_config, build_transforms, cache_in_memory, load_data, set_transforms
from .errors import UsageError
from .head import MultiCenterHead, MultiCenterLoss, fuse_mc
from .margins import set_margin_target
from .model import classifier_path, create_model, get_mc_head
from .runlog import RunLog

_logger = logging.getLogger("mcc_train")


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


@dataclass
class Step:
    """What one optimizer step needs; ``ddp_model`` is ``model`` itself outside DDP."""

    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    updates_per_epoch: int


class LossWatch:
    """Reads each step's loss on the host one step late, so the host never waits for the step it has just queued.

    ``push(loss)`` queues a copy of this step's loss into a pinned host slot (non-blocking, an event behind it) and
    returns the previous step's value, waiting only for that older step's event: on CUDA the device always has
    the step just queued to run while the host checks and queues the next. A non-finite loss raises UsageError one
    step after it happens (``flush`` checks the last).
    """

    def __init__(self, device: torch.device, epoch: int):
        self.cuda = device.type == "cuda"
        self.slots = torch.zeros(2, dtype=torch.float32, pin_memory=self.cuda)  # double-buffered host copies
        self.pending: tuple[int, object] | None = None  # (step index, its copy's CUDA event)
        self.epoch = epoch
        self.last: float | None = None

    def push(self, loss: torch.Tensor, step: int) -> float | None:
        """Queue step ``step``'s loss; return the previous step's (None on the first), checked."""
        slot = self.slots[step % 2 : step % 2 + 1]
        slot.copy_(loss.detach().float().reshape(1), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        previous, self.pending = self.pending, (step, event)
        return self._read(previous) if previous is not None else None

    def flush(self) -> float | None:
        """Wait for and check the last queued loss."""
        previous, self.pending = self.pending, None
        return self._read(previous) if previous is not None else self.last

    def _read(self, pending: tuple[int, object]) -> float:
        step, event = pending
        if event is not None:
            event.synchronize()  # this older step only; later work stays queued on the device
        value = float(self.slots.numpy()[step % 2])
        if not math.isfinite(value):
            raise UsageError(f"training diverged at epoch {self.epoch + 1}, step {step + 1} (loss {value}); lower --lr")
        self.last = value
        return value


def train_one_epoch(step: Step, loader, cfg: TrainConfig, rt: Runtime, epoch: int, num_classes: int) -> float:
    """One pass over the training data, ``cfg.grad_accum_steps`` micro-batches per optimizer step; returns the mean
    training loss over all ranks.

    NOTE: no host sync on the step path: the loss reaches the host through ``LossWatch``, one step late.
    """
    step.ddp_model.train()
    steps, accum = len(loader), cfg.grad_accum_steps
    total, count = torch.zeros((), device=rt.device), 0
    watch = LossWatch(rt.device, epoch)
    disable = None if rt.is_main and cfg.progress else True  # tqdm's None: shown on a terminal only
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=disable, leave=False)
    step.optimizer.zero_grad(set_to_none=True)
    for i, (images, target) in enumerate(bar):
        images = images.to(rt.device, non_blocking=True)
        target = target.to(rt.device, non_blocking=True)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if step.mixup is not None:
            images, soft = step.mixup(images, target)  # soft: (B, C), label smoothing included
        else:
            soft = mixup_target(target, num_classes, smoothing=cfg.label_smoothing)  # (B, C)
        cycle_start = i - i % accum
        cycle_len = min(accum, steps - cycle_start)  # the epoch's last cycle may be shorter
        update = i + 1 == cycle_start + cycle_len
        sync = rt.distributed and not update  # DDP all-reduces gradients only on the cycle's last micro-batch
        done = epoch * step.updates_per_epoch + i // accum  # optimizer updates before this micro-batch's
        set_margin_target(step.model.get_classifier(), soft, done, cfg.epochs * step.updates_per_epoch)
        with step.ddp_model.no_sync() if sync else contextlib.nullcontext():
            with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
                logits = step.ddp_model(images)  # (B, C*(K+1)) for MC, (B, C) for linear
            loss = step.loss_fn(logits.float(), soft)
            step.scaler.scale(loss / cycle_len).backward()
        if update:
            if cfg.clip_grad is not None:
                step.scaler.unscale_(step.optimizer)
                torch.nn.utils.clip_grad_norm_(step.model.parameters(), cfg.clip_grad)
            step.scaler.step(step.optimizer)
            step.scaler.update()
            step.optimizer.zero_grad(set_to_none=True)
            step.scheduler.step_update(num_updates=done + 1)
            if step.ema is not None:
                step.ema.update(step.model, step=done + 1)
        total += loss.detach() * len(images)
        count += len(images)
        shown = watch.push(loss, i)  # the previous step's loss: this step stays queued on the device
        if shown is not None:
            bar.set_postfix(loss=f"{shown:.4f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    watch.flush()
    sums = all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=rt.device)]), rt)
    return (sums[0] / sums[1]).item()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(model, loader, rt: Runtime, head: MultiCenterHead | None = None, progress: bool = False) -> dict:
    """Eval-mode loss, top-1 and top-5 (percent; top-5 only where C > 5) over the whole val set, summed across ranks.

    Also the scale of the logits: ``logit_margin``, the mean of (target logit - best other logit), and for an MC
    ``head`` ``logit_spread``, the mean std of the target class's sub-center logits around its mean-center logit.
    """
    model.eval()
    features = []
    hook = head.register_forward_hook(lambda m, args, out: features.append(args[0])) if head is not None else None
    try:
        bar = tqdm(loader, desc="eval", disable=None if rt.is_main and progress else True, leave=False)
        sums, num_classes = eval_sums(model, bar, rt, head, features)
    finally:
        if hook is not None:
            hook.remove()
    loss, top1, top5, n, margin, spread = all_reduce_sum(sums, rt).tolist()
    metrics = {"eval_loss": loss / n, "top1": 100 * top1 / n, "logit_margin": margin / n}
    if num_classes > 5:
        metrics["top5"] = 100 * top5 / n
    if head is not None:
        metrics["logit_spread"] = spread / n
    return metrics


def eval_sums(model, loader, rt: Runtime, head: MultiCenterHead | None, features: list) -> tuple[torch.Tensor, int]:
    """Sums over this rank's val shard (loss, top-1 and top-5 hits, count, logit margin, sub-center spread), and C."""
    sums, num_classes = torch.zeros(6, dtype=torch.float64, device=rt.device), 0
    for images, target in loader:
        images = images.to(rt.device, non_blocking=True)
        target = target.to(rt.device, non_blocking=True)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            logits = model(images).float()  # (B, C): the mean centers only
        num_classes = logits.shape[-1]
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
    return sums, num_classes


def build_loaders(splits, cfg: TrainConfig, rt: Runtime):
    """Train loader (shuffled or class-balanced, sharded over ranks, whole batches) and val loader (sharded without
    padding)."""
    pin = rt.device.type == "cuda"
    if cfg.balanced_sampler:
        train_sampler = BalancedSampler(train_labels(splits.train), rt.world_size, rt.rank, seed=cfg.seed)
    else:
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


def train_labels(dataset) -> np.ndarray:
    """Labels of a training set, through a ``Subset`` (``--subset``)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return np.asarray(dataset.dataset.labels)[np.asarray(dataset.indices)]
    return np.asarray(dataset.labels)


class BalancedSampler(torch.utils.data.Sampler):
    """Each epoch draws ``len(labels)`` indices with replacement, every class equally likely (weights 1/count);
    the draw is the same on every rank (seeded by seed and epoch), each rank takes every world_size-th index."""

    def __init__(self, labels: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)  # (N,)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(labels) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(draw[self.rank :: self.num_replicas].tolist())


def check_out_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """(--out, whether it continues the resumed run in place). Refuses an --out that is a file, or that holds another
    run, unless --overwrite; creates nothing (the run creates it once everything is built: a failed start leaves no
    empty directory)."""
    out = Path(cfg.out)
    in_place = bool(cfg.resume) and out.resolve() == Path(cfg.resume).resolve().parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not in_place and not cfg.overwrite and (out / "last.pt").exists():
        raise UsageError(
            f"--out {out} already holds a run; continue it with --resume {out / 'last.pt'}, "
            "pick another --out, or pass --overwrite"
        )
    return out, in_place


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, classifier: str) -> torch.optim.Optimizer:
    """timm's optimizer and parameter groups (no weight decay on 1-d parameters; layer-wise lr decay with
    --layer-decay); with --head-lr-scale each group is split and the classifier's part gets ``lr_scale`` times it
    (timm's schedulers multiply a group's lr by its ``lr_scale``)."""
    kwargs = {"opt": cfg.opt, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum}
    if cfg.head_lr_scale == 1.0:
        return create_optimizer_v2(model, layer_decay=cfg.layer_decay, **kwargs)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_decay, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_decay)
    head = {id(p) for p in model.get_submodule(classifier).parameters()}
    split = []
    for group in groups:
        for in_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            if params:
                scale = group.get("lr_scale", 1.0) * (cfg.head_lr_scale if in_head else 1.0)
                split.append({**group, "params": params, "lr_scale": scale})
    return create_optimizer_v2(model, param_group_fn=lambda _: split, **kwargs)


def build_scheduler(optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm's scheduler by name, stepped per update, with linear warm-up."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        decay_epochs=cfg.decay_epochs or max(1.0, cfg.epochs / 3),
        decay_milestones=[round(cfg.epochs * f) for f in (1 / 3, 2 / 3)],
        decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1),
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def set_backbone_trainable(model: torch.nn.Module, classifier: str, trainable: bool) -> None:
    """--freeze-backbone-epochs: every parameter outside the classifier stops (or resumes) taking gradients.
    NOTE: BatchNorm running statistics still adapt while frozen; frozen parameters get no weight decay either."""
    head = {id(p) for p in model.get_submodule(classifier).parameters()}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)


def wrap_ddp(model: torch.nn.Module, rt: Runtime, compile_model: bool = False) -> torch.nn.Module:
    """DDP over the parameters that take gradients now (rebuilt when --freeze-backbone-epochs ends); with
    ``--compile model``, that through ``torch.compile``. ``model`` itself stays the plain module: checkpoints,
    EMA and export see the usual state dict."""
    if rt.distributed:
        model = DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


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
    out, in_place = check_out_dir(cfg)
    splits = load_data(cfg.data, cfg.subset, cfg.skip_bad_images)
    model, in_chans = build_model(cfg, splits, resume)
    data_config = build_data_config(model, cfg.img_size, in_chans, cfg.crop_pct, cfg.interpolation)
    hflip = cfg.hflip if cfg.hflip is not None else (0.0 if splits.name == "digits" else 0.5)
    set_transforms(splits, *build_transforms(data_config, hflip, cfg.scale), in_chans)
    train_loader, train_sampler, val_loader = build_loaders(splits, cfg, rt)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    classifier = classifier_path(model)
    step = build_step(model, cfg, rt, splits.num_classes, math.ceil(len(train_loader) / cfg.grad_accum_steps))
    schedule = {"epochs": cfg.epochs, "updates_per_epoch": step.updates_per_epoch, "sched": cfg.sched}
    start_epoch, best = restore(resume, step, cfg, schedule) if resume is not None else (0, (-1.0, 0))

    history = None if resume is None else Path(cfg.resume).parent  # the metrics.csv a resumed run continues
    log = RunLog(out, cfg, start_epoch, history, replace=not in_place) if rt.is_main else None
    if log is not None:
        channels = "--in-chans" if cfg.in_chans else "as the resumed run" if resume else splits.channels_note
        log.start(splits, model, rt, in_chans, channels, len(train_loader))
    metrics, epoch, trainable = {}, start_epoch, None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            epoch_start = time.time()
            random_seed(cfg.seed * 1000 + epoch, rt.rank)  # per epoch: a resumed run draws what the unbroken one would
            train_sampler.set_epoch(epoch)
            if trainable is not (epoch >= cfg.freeze_backbone_epochs):  # the first epoch, and when a freeze ends
                trainable = epoch >= cfg.freeze_backbone_epochs
                set_backbone_trainable(model, classifier, trainable)
                step.ddp_model = wrap_ddp(model, rt, compile_model=cfg.compile == "model")
            step.scheduler.step(epoch)
            train_loss = train_one_epoch(step, train_loader, cfg, rt, epoch, splits.num_classes)
            metrics = epoch_metrics(step, val_loader, rt, cfg, epoch, train_loss) | {
                "epoch_time_s": time.time() - epoch_start
            }
            score = metrics["ema_top1"] if step.ema is not None else metrics["top1"]  # as timm's train.py ranks
            is_best = score > best[0]
            best = (score, epoch + 1) if is_best else best
            stop = cfg.early_stop_patience is not None and epoch + 1 - best[1] >= cfg.early_stop_patience
            if log is not None:
                log.epoch(metrics)  # before the checkpoint: a resume trims rows past it
                state = make_state(
                    cfg=cfg,
                    data=(splits.class_names, in_chans, data_config),
                    model=model,
                    optimizer=step.optimizer,
                    scheduler=step.scheduler,
                    scaler=step.scaler,
                    ema=step.ema,
                    epoch=epoch + 1,
                    metrics=metrics,
                    best=best,
                    schedule=schedule,
                    early_stopped=stop,
                )
                save_checkpoint(state, out / "last.pt")
                if is_best:
                    save_checkpoint(state, out / "best.pt")
                log.saved()
            if stop:
                _logger.info(
                    "early stop: no better top-1 for %d epochs (best %.2f at epoch %d)", cfg.early_stop_patience, *best
                )
                break
    finally:
        if log is not None:
            log.close()
    summary = {"epochs": epoch + 1 if metrics else start_epoch, "best_top1": best[0], "best_epoch": best[1]}
    return summary | {"last": metrics, "out": str(out), "wall_time_s": time.time() - start_time}


def build_model(cfg: TrainConfig, splits, resume: dict | None) -> tuple[torch.nn.Module, int]:
    """The model the run trains and its input channels: a resumed run's channels and classes are the checkpoint's
    (other classes in the data: UsageError); a new run's come from the data, or --in-chans."""
    if resume is not None and splits.class_names != list(resume["class_names"]):
        raise UsageError(
            f"--resume {cfg.resume}: --data {cfg.data} has classes {splits.class_names[:5]}..., the run was trained "
            f"on {list(resume['class_names'])[:5]}...; resume on its own data"
        )
    in_chans = cfg.in_chans or (resume["in_chans"] if resume is not None else 1 if splits.grayscale else 3)
    random_seed(cfg.seed, 0)  # the same initial weights on every rank
    model = create_model(
        cfg.arch,
        splits.num_classes,
        head=cfg.head,
        in_chans=in_chans,
        mc=cfg.mc(),
        img_size=cfg.img_size,
        pretrained_file=cfg.pretrained_file if resume is None else None,  # a resumed run has its own weights
        loss=cfg.loss,
        margin=cfg.margin,
        margin_scale=cfg.margin_scale,
        drop_rate=cfg.drop_rate,
        **cfg.model_kwargs,
    )
    return model, in_chans


def build_step(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime, num_classes: int, updates_per_epoch: int):
    """Optimizer, schedule, grad scaler, loss, mixup and EMA for ``model`` (already on its device)."""
    head = get_mc_head(model)
    optimizer = build_optimizer(model, cfg, classifier_path(model))
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
        )
    loss_fn = MultiCenterLoss(head, cfg.kl_weight) if head is not None else SoftTargetCrossEntropy()
    if cfg.compile != "none" and head is not None:
        fuse_mc(model, loss_fn)  # the MC head's training math and loss compiled (also under --compile model)
    elif cfg.compile == "head":
        _logger.info(
            "--compile head: a linear head has no MC math to fuse; it trains eagerly (--compile model "
            "compiles the whole model)"
        )
    return Step(
        model=model,
        ddp_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, updates_per_epoch),
        scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16),
        loss_fn=loss_fn,
        mixup=mixup,
        ema=ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=True) if cfg.model_ema else None,
        updates_per_epoch=updates_per_epoch,
    )


def epoch_metrics(step: Step, val_loader, rt: Runtime, cfg: TrainConfig, epoch: int, train_loss: float) -> dict:
    """One metrics.csv row: the eval metrics (the EMA's too, prefixed ``ema_``), lr, and the MC head's scale."""
    head = get_mc_head(step.model)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        **evaluate(step.ddp_model, val_loader, rt, head, progress=cfg.progress),
        "lr": step.optimizer.param_groups[0]["lr"],  # at the epoch's last step
    }
    if step.ema is not None:
        ema_metrics = evaluate(step.ema.module, val_loader, rt, get_mc_head(step.ema.module), cfg.progress)
        metrics |= {f"ema_{k}": v for k, v in ema_metrics.items()}
    if head is not None:
        metrics["sub_center_std"] = head.std().mean().item()
        metrics["offset_ratio"] = head.offset_ratio().mean().item()
    return metrics


def restore(resume: dict, step: Step, cfg: TrainConfig, schedule: dict) -> tuple[int, tuple[float, int]]:
    """Continue a run: the checkpoint's weights, optimizer moments, grad scaler and EMA; the learning rates, weight
    decay and schedule come from ``cfg`` (the run's config with the flags given now), positioned at the epoch
    reached. Returns (epochs done, (best top-1, its epoch)).

    An unchanged config resumes exactly (tested against an unbroken run). Another --epochs, --sched or number of
    updates per epoch re-plans the schedule: the remaining epochs follow it as a run planned that way from the
    start would. Another optimizer layout (--opt, --head-lr-scale on or off, --layer-decay) starts the optimizer's
    moments afresh. Both are logged.
    """
    start_epoch, saved = resume["epoch"], resume["config"]
    if start_epoch >= cfg.epochs:
        raise UsageError(f"--resume {cfg.resume}: already trained {start_epoch} epochs; raise --epochs to go on")
    if resume.get("early_stopped") and cfg.early_stop_patience == saved.get("early_stop_patience"):
        raise UsageError(
            f"--resume {cfg.resume}: the run stopped early at epoch {start_epoch} (no better top-1 for "
            f"{cfg.early_stop_patience} epochs); raise --early-stop-patience or pass --early-stop-patience none"
        )
    try:
        step.model.load_state_dict(resume["model"])
        if step.ema is not None:
            step.ema.module.load_state_dict(resume.get("model_ema", resume["model"]))
    except RuntimeError as e:
        raise UsageError(
            f"--resume {cfg.resume}: its weights do not fit {cfg.arch} as configured now "
            f"({str(e).splitlines()[-1].strip()[:120]}); resume with the run's own --arch and --model-kwargs"
        ) from None
    if step.ema is not None and "model_ema" not in resume:
        _logger.info("resume: the checkpoint has no EMA weights; the EMA starts from its model weights")
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in step.optimizer.param_groups]  # as cfg says
    layout = [len(g["params"]) for g in step.optimizer.param_groups]
    if saved.get("opt", "adamw").lower() == cfg.opt.lower() and layout == [
        len(g["params"]) for g in resume["optimizer"]["param_groups"]
    ]:
        step.optimizer.load_state_dict(resume["optimizer"])
        for group, values in zip(step.optimizer.param_groups, hyper, strict=True):
            group.update(values)  # --lr, --weight-decay, --momentum, --head-lr-scale given now
    else:
        _logger.info(
            "resume: the optimizer's parameter groups changed (--opt, --head-lr-scale or --layer-decay); "
            "its moments start afresh"
        )
    if resume.get("scaler"):
        step.scaler.load_state_dict(resume["scaler"])
    step.scheduler.step_update(start_epoch * step.updates_per_epoch)  # the schedule cfg plans, where the run is
    old = resume.get("schedule") or {
        "epochs": saved.get("epochs"),
        "sched": saved.get("sched", "cosine"),
        "updates_per_epoch": step.updates_per_epoch,
    }
    if old != schedule:
        lr = step.optimizer.param_groups[0]["lr"]
        _logger.info(
            f"resume: schedule re-planned for {cfg.epochs} epochs of {step.updates_per_epoch} updates ({cfg.sched}; "
            f"was {old['epochs']} epochs of {old['updates_per_epoch']}, {old['sched']}); lr now {lr:.2e}"
        )
    return start_epoch, (resume["best_top1"], resume["best_epoch"])
