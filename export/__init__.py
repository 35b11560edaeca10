"""onnxpipe.export: checkpoint -> verified ONNX model folder. Needs the `export` extra (torch, transformers, optimum-onnx)."""
from .errors import ExportError
from .core import TASKS, export_model

__all__ = ["ExportError", "TASKS", "export_model"]
