"""mcc_train: the multi-center classifier head on any timm backbone, and the mcc-train command."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import UsageError
from .head import MC_DEFAULTS, MC_PRESETS, MCSettings, MultiCenterHead, MultiCenterLoss, multi_center_target
from .model import classifier_path, create_model, get_mc_head

__all__ = [
    "MC_DEFAULTS",
    "MC_PRESETS",
    "MCSettings",
    "MultiCenterHead",
    "MultiCenterLoss",
    "TrainConfig",
    "UsageError",
    "classifier_path",
    "create_model",
    "get_mc_head",
    "load_checkpoint",
    "multi_center_target",
    "save_checkpoint",
]
__version__ = "0.1.0"
