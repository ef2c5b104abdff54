"""export: collapse an MC checkpoint to its mean head, write a verified ONNX bundle (mcc-export), and use a bundle
or checkpoint offline (mcc-eval, mcc-predict).

The public names load on first use (PEP 562): ``mcc-predict`` on a bundle imports this package and must run
without torch, which the exporter imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_MODULE_OF = {
    "ExportConfig": ".exporter",
    "Report": ".verify",
    "VerificationError": ".exporter",
    "export_checkpoint": ".exporter",
    "read_model_json": ".bundle",
    "verify_bundle": ".verify",
}
__all__ = ["ExportConfig", "Report", "VerificationError", "export_checkpoint", "read_model_json", "verify_bundle"]

if TYPE_CHECKING:
    from .bundle import read_model_json
    from .exporter import ExportConfig, VerificationError, export_checkpoint
    from .verify import Report, verify_bundle


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
