"""Dynamic int8 quantization of the exported graphs, written beside the fp32 files."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path


def quantize_int8(out_dir: Path, roles: dict, *, weight_type: str, per_channel: bool, reduce_range: bool) -> dict[str, str]:
    """Write `<name>.int8.onnx` for each role; return role -> int8 file name."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wt = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}[weight_type.lower()]
    int8 = {}
    for role, name in roles.items():
        src = out_dir / name
        dst = out_dir / name.replace(".onnx", ".int8.onnx")
        with _quiet():
            # DefaultTensorType: fused graphs (com.microsoft ops) fail shape inference without it (STACK.md)
            quantize_dynamic(str(src), str(dst), weight_type=wt, per_channel=per_channel, reduce_range=reduce_range,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        int8[role] = dst.name
    return int8


def quantize_int4(out_dir: Path, roles: dict, block_size: int = 32, accuracy_level: int = 4) -> dict[str, str]:
    """Weight-only 4-bit block quantization of MatMul weights (ONNX Runtime's MatMulNBits, as onnxruntime-genai
    uses on CPU); `accuracy_level=4` computes with int8 activations. Writes `<name>.int4.onnx` per role."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    int4 = {}
    for role, name in roles.items():
        src = out_dir / name
        dst = out_dir / name.replace(".onnx", ".int4.onnx")
        with _quiet():
            cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
            quant = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
            quant.process()
            quant.model.save_model_to_file(str(dst), use_external_data_format=False)
        int4[role] = dst.name
    return int4


@contextlib.contextmanager
def _quiet():
    """ORT's quantizers warn, and log a pre-processing hint on the root logger, at every call."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.root.setLevel(level)
