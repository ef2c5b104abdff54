"""mcc_serve: a FastAPI + onnxruntime service for bundles written by mcc-export (no torch)."""

__version__ = "0.1.0"
