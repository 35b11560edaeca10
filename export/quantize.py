"""Dynamic int8 quantization of the exported graphs, written beside the fp32 files."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger("onnxpipe.export")


def quantize_int8(out_dir: Path, roles: dict, weight_type: str = "quint8", per_channel: bool = False,
                  reduce_range: bool = False) -> dict[str, str]:
    """Write `<name>.int8.onnx` for each role; return role -> int8 file name."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wt = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}[weight_type.lower()]
    int8 = {}
    for role, name in roles.items():
        src = out_dir / name
        dst = out_dir / name.replace(".onnx", ".int8.onnx")
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
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
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level)
            quant = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
            quant.process()
            quant.model.save_model_to_file(str(dst), use_external_data_format=False)
        int4[role] = dst.name
    return int4


class _quiet_root_logger:
    """quantize_dynamic logs a pre-processing hint on the root logger at every call."""

    def __enter__(self):
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.root.setLevel(self.level)
