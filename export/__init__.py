"""export: collapse an MC checkpoint to its mean head, write a verified ONNX bundle (mcc-export), and evaluate a
bundle or checkpoint offline (mcc-eval)."""

from .bundle import read_model_json
from .exporter import ExportConfig, VerificationError, export_checkpoint
from .proof import Report, verify_bundle

__all__ = ["ExportConfig", "Report", "VerificationError", "export_checkpoint", "read_model_json", "verify_bundle"]
