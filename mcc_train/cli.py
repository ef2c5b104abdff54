"""mcc-train: parse flags (and an optional YAML file) into one TrainConfig, then train.

Precedence: TrainConfig defaults < the resumed checkpoint's config < --mc-preset < --config FILE.yaml < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from .config import RENAMED, TrainConfig, coerce, field_type, load_yaml, preset_values
from .errors import UsageError

EPILOG = """examples:
  mcc-train --data digits --img-size 32 --epochs 5 --out runs/demo/train   # what `make demo` runs
  mcc-train --data fashion-mnist --arch resnet10t --img-size 28 --epochs 5 --out runs/fm
  mcc-train --data imagefolder:/data/pets --img-size 128 --pretrained-file w.safetensors --head-lr-scale 10
  mcc-train --loss arcface --margin 0.3 --margin-scale 16    # MC + ArcFace (the paper's table 6); --head linear too
  mcc-train --config recipe.yaml --lr 5e-4                  # YAML keys are the flag names
  mcc-train --resume runs/demo/train/last.pt --epochs 8     # continue; the schedule is re-planned for 8 epochs
  torchrun --standalone --nproc_per_node=2 -m mcc_train --data fashion-mnist --out runs/ddp
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcc-train",
        description="Train a timm backbone with the multi-center classifier (MC) head, or the linear baseline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags override it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base, optional = field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if "default:" not in help_text and not (default is None and "(none: off)" in help_text):
            help_text += f" (default: {default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif base is dict:
            parser.add_argument(flag, dest=f.name, nargs="+", metavar="KEY=VALUE", help=help_text)
        elif f.metadata.get("nargs"):
            parser.add_argument(
                flag, dest=f.name, nargs=f.metadata["nargs"], type=base, metavar=("LO", "HI"), help=help_text
            )
        else:
            flags = [flag, *(f"--{old.replace('_', '-')}" for old, new in RENAMED.items() if new == f.name)]
            parser.add_argument(*flags, dest=f.name, type=_optional(base) if optional else base, help=help_text)
    return parser


def _optional(base):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "off") else base(text)

    parse.__name__ = base.__name__
    return parse


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags and files -> one validated TrainConfig (raises UsageError on bad values).

    Precedence: defaults < the resumed run's config < --mc-preset < --config FILE.yaml < flags.
    """
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    if "resume" in args and args["resume"]:
        from .checkpoint import load_checkpoint

        values.update(load_checkpoint(args["resume"])["config"])
        values.pop("overwrite", None)
        values["out"] = os.path.dirname(args["resume"]) or "."  # in place, also when the run was moved
    file_values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(preset_values(args.get("mc_preset", file_values.get("mc_preset"))))
    values.update(file_values)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values.update({k: coerce(fields[k], v) for k, v in args.items() if k in fields})
    return TrainConfig.from_dict(values).validate()


def one_line(e: UsageError) -> str:
    """The message itself; a DataLoader worker re-raises it wrapped in its traceback, whose last line it is."""
    return str(e).strip().splitlines()[-1].removeprefix(f"{UsageError.__module__}.{UsageError.__name__}: ")


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("timm").setLevel(logging.WARNING)  # its per-file loading notes; mcc logs what it did
    cfg = None
    try:
        from .train import train

        cfg = parse_config(argv)
        summary = train(cfg)
    except UsageError as e:
        print(f"mcc-train: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0 and cfg is not None:
            print(
                f"mcc-train: interrupted; the last complete epoch is in {cfg.out}/last.pt: continue with "
                f"--resume {cfg.out}/last.pt",
                file=sys.stderr,
            )
        return 130
    if rank == 0:
        print(
            f"mcc-train: done: {summary['epochs']} epochs of {cfg.arch} ({cfg.head} head) "
            f"in {summary['wall_time_s']:.0f}s, "
            f"best top-1 {summary['best_top1']:.2f}%{' (EMA weights)' if cfg.model_ema else ''} "
            f"at epoch {summary['best_epoch']}, "
            f"last top-1 {summary['last'].get('top1', float('nan')):.2f}%; checkpoints in {summary['out']}/"
        )
    return 0
