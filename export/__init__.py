"""onnxpipe.export: checkpoint -> verified ONNX model folder.

Needs the `export` extra (torch, transformers, optimum-onnx, onnx); serving never imports this package.
"""
import importlib.util as _util

_missing = [m for m in ("torch", "transformers", "optimum.exporters.onnx", "onnx") if _util.find_spec(m.split(".")[0]) is None
            or (m == "optimum.exporters.onnx" and _util.find_spec("optimum.exporters") is None)]
if _missing:
    raise ImportError(f"onnxpipe.export needs the export extra ({', '.join(_missing)} not installed): "
                      "pip install 'onnxpipe[cpu,export]'", name=_missing[0])

from .errors import ExportError  # noqa: E402
from .core import TASKS, export_model  # noqa: E402

__all__ = ["ExportError", "TASKS", "export_model"]
