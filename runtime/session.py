"""One ONNX Runtime session: provider choice (CPU/CUDA) with a checked fallback, threads, named IO."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

_warned: set[str] = set()


def parse_device(device) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 1 (as transformers' device=) -> (kind, index)."""
    if device is None or device == -1:
        return "cpu", 0
    if isinstance(device, int):
        return "cuda", device
    text = str(device).lower()
    if text == "cpu":
        return "cpu", 0
    if text == "cuda" or text == "gpu":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"device={device!r} is not understood: use 'cpu', 'cuda' or 'cuda:N'")


class Session:
    """Wraps `onnxruntime.InferenceSession`.

    Asking for CUDA where it cannot load (no GPU, CPU-only onnxruntime, missing CUDA
    libraries) warns once, saying why, and runs on CPU: `self.provider` tells which runs.
    """

    def __init__(self, path: str | os.PathLike, device="cpu", intra_op_num_threads: int | None = None,
                 inter_op_num_threads: int | None = None, session_options=None):
        import onnxruntime as ort

        self.path = Path(path)
        kind, index = parse_device(device)
        so = session_options or ort.SessionOptions()
        if session_options is None:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            if intra_op_num_threads:
                so.intra_op_num_threads = int(intra_op_num_threads)
            if inter_op_num_threads:
                so.inter_op_num_threads = int(inter_op_num_threads)
        providers: list = ["CPUExecutionProvider"]
        if kind == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                self._warn_cpu(f"this onnxruntime build has no CUDAExecutionProvider (providers: {', '.join(available)}); "
                               "install onnxpipe[gpu] (onnxruntime-gpu) instead of onnxpipe[cpu]")
            else:
                providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # a corrupt or truncated file
            raise ValueError(f"cannot load ONNX model {self.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                             "export the model again") from None
        self.provider = self._sess.get_providers()[0]
        if kind == "cuda" and self.provider != "CUDAExecutionProvider" and "CUDAExecutionProvider" in ort.get_available_providers():
            self._warn_cpu("onnxruntime could not create the CUDAExecutionProvider (no GPU visible, or CUDA/cuDNN "
                           "libraries missing: install onnxruntime-gpu[cuda,cudnn])")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.device_index = index if self.device == "cuda" else 0
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.inputs = {i.name: i for i in self._sess.get_inputs()}

    def _warn_cpu(self, why: str) -> None:
        if why not in _warned:
            _warned.add(why)
            warnings.warn(f"CUDA was asked for but is not available: {why}. Running on CPU.", RuntimeWarning, stacklevel=4)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run with the graph's own input names; extra feeds are dropped, missing ones are an error."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name} needs inputs {', '.join(missing)} (got {', '.join(feeds)}); "
                             "the manifest's io section lists them (docs/MANIFEST.md)")
        names = output_names or self.output_names
        values = self._sess.run(names, {n: feeds[n] for n in self.input_names})
        return dict(zip(names, values))

    def io_binding(self):
        """ONNX Runtime IO binding, for keeping tensors (e.g. a KV cache) on the device between runs."""
        return self._sess.io_binding()

    def run_with_iobinding(self, binding) -> None:
        self._sess.run_with_iobinding(binding)

    @property
    def ort_session(self):
        return self._sess
