"""Quantized twins of the exported graphs, written beside the fp32 files: dynamic int8 (encoders),
weight-only 8-bit blocks (decoders' int8) and weight-only 4-bit blocks (int4), both MatMulNBits."""
from __future__ import annotations

import contextlib
import io
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
        check_dynamic_int8_supported(src)
        with _quiet():
            # DefaultTensorType: fused graphs (com.microsoft ops) fail shape inference without it (STACK.md)
            quantize_dynamic(str(src), str(dst), weight_type=wt, per_channel=per_channel, reduce_range=reduce_range,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        int8[role] = dst.name
    return int8


DYNAMIC_ON_FUSED_DECODER = ("dynamic int8 of a decoder fused by --optimize (ONNX Attention, opset 23, or GroupQueryAttention) "
                            "comes out wrong: ONNX Runtime's dynamic quantizer breaks that graph (SmolLM2 perplexity x1e6 "
                            "with Attention, x2 with GroupQueryAttention); use the decoders' default weight-only int8, or "
                            "export without --optimize")


def check_dynamic_int8_supported(path) -> None:
    """Refuse dynamic int8 of a graph with ONNX-domain `Attention` or com.microsoft `GroupQueryAttention` nodes
    (--optimize on Llama decoders). The GroupQueryAttention graph loads and runs dynamically quantized, but
    SmolLM2's perplexity on a news article went 62.6 -> 134 (+115%, top-1 agreement 55%; the unfused graph's
    dynamic int8 costs +68%), so it is refused alike: the weight-only int8 costs +0.5%.

    ONNX Runtime's dynamic quantizer goes by op type alone and rewrites them as com.microsoft QAttention,
    which has no grouped-KV heads (the result does not load); with them left float the rest still comes
    out wrong (DYNAMIC_ON_FUSED_DECODER)."""
    import onnx

    from .errors import ExportError

    graph = onnx.load(str(path), load_external_data=False).graph
    if any((n.op_type == "Attention" and n.domain in ("", "ai.onnx")) or n.op_type == "GroupQueryAttention"
           for n in graph.node):
        raise ExportError(DYNAMIC_ON_FUSED_DECODER)


def quantize_weight_only(out_dir: Path, roles: dict, *, bits: int, block_size: int = 32, accuracy_level: int = 4,
                         suffix: str) -> dict[str, str]:
    """Weight-only block quantization of every constant-weight MatMul with ONNX Runtime's MatMulNBits
    (symmetric blocks of `block_size`, as onnxruntime-genai writes for CPU); writes `<name>.<suffix>.onnx`.

    GPT-2's Gemm layers become MatMul + Add first, and a tied LM head (MatMul on Transpose(embedding)) is untied,
    so every projection is quantized. `accuracy_level=4` lets the CPU kernel quantize activations to int8 and use
    integer dot products (level 0 dequantizes to fp32 and was ~10x slower here).
    """
    written = {}
    for role, name in roles.items():
        model = _matmuls_ready(out_dir / name)
        model = _nbits(model, bits, block_size, accuracy_level)
        written[role] = _save(model, out_dir, name, suffix)
    return written


# The manifest's word for each int4 method (quantization.int4, beside its fidelity): what quantize_int4 writes.
_INT4_METHOD_WORDS = {
    "asymmetric": {"method": "weight-only 4-bit asymmetric blocks with a float offset each (MatMulNBits + offsets "
                             "MatMul)", "symmetric": False},
    "symmetric": {"method": "weight-only 4-bit blocks (MatMulNBits)", "symmetric": True},
}
INT4_METHODS = tuple(_INT4_METHOD_WORDS)


def int4_info(method: str, block_size: int = 32, accuracy_level: int = 4) -> dict:
    """How quantize_int4(method) quantizes, as the manifest says it."""
    return {**_INT4_METHOD_WORDS[method], "block_size": block_size, "accuracy_level": accuracy_level,
            "lm_head": "8-bit blocks (MatMulNBits)", "embeddings": "4-bit blocks (GatherBlockQuantized)"}


def quantize_int4(out_dir: Path, roles: dict, method: str = "asymmetric", block_size: int = 32,
                  accuracy_level: int = 4) -> dict[str, str]:
    """Weight-only int4 (MatMulNBits; `accuracy_level=4` computes with int8 activations). Writes
    `<name>.int4.onnx` per role:
    - the projections, `method` "asymmetric": 4-bit blocks of `block_size` with a float offset each (int4_blocks.py:
      Q4_1's layout; SmolLM2's news-text perplexity +0.1% against fp32, all of this int4 together); "symmetric":
      MatMulNBits' own symmetric blocks (+24-26%, and 1.24-1.37x faster decode on SmolLM2: the offsets' three small
      ops per projection are ONNX Runtime kernel calls of a few microseconds each, 360 of them per step);
    - the LM head (a MatMul giving a graph output; a tied one untied first): 8-bit blocks, as the int8 export's.
      In fp32 it was 62% of an int4 decode step's weights (49,152 x 576 for SmolLM2); in 4 bits it cost +10%
      perplexity where 8 bits cost nothing measurable;
    - a MatMul whose K is not a multiple of `block_size`: symmetric 4-bit blocks (MatMulNBits pads them);
    - the token embedding table (a Gather of input_ids): symmetric 4-bit blocks along the hidden size
      (GatherBlockQuantized), as onnxruntime-genai's int4: SmolLM2's 113 MB fp32 table (227 -> 132 MB of int4
      weights), perplexity +0.2%, a step no slower (one row read per token)."""
    from .int4_blocks import quantize_asymmetric_blocks

    written = {}
    for role, name in roles.items():
        model = _matmuls_ready(out_dir / name)
        model = _nbits(model, 8, block_size, accuracy_level, only=lm_heads(model))
        offsets = quantize_asymmetric_blocks(model, block_size=block_size, accuracy_level=accuracy_level) \
            if method == "asymmetric" else []
        model = _nbits(model, 4, block_size, accuracy_level, nodes_to_exclude=offsets)  # what is left
        model = _nbits(model, 4, block_size, accuracy_level, only=embedding_gathers(model, block_size),
                       quant_axes=(("Gather", 1),))
        written[role] = _save(model, out_dir, name, "int4")
    return written


def _matmuls_ready(path: Path):
    """The graph with a tied LM head untied and Gemm layers as MatMul + Add: every projection a constant-weight
    MatMul, as MatMulNBits takes them."""
    import onnx

    from .graph import gemm_to_matmul, untie_transposed_weights

    model = onnx.load(str(path))
    untie_transposed_weights(model)
    gemm_to_matmul(model)
    return model


def _nbits(model, bits: int, block_size: int, accuracy_level: int, only: list[str] | None = None, **kw):
    """ONNX Runtime's MatMulNBitsQuantizer (symmetric blocks) over `model`, quietly: every MatMul (kw may exclude
    some), or with `only` just those nodes (none: `model` as it is)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if only is not None:
        if not only:
            return model
        kw.update(nodes_to_include=only, op_types_to_quantize=("NoSuchOp",))  # by name alone, not by op type
    with _quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, **kw)
        q.process()
    return q.model.model


def _save(model, out_dir: Path, name: str, suffix: str) -> str:
    import onnx

    dst = out_dir / name.replace(".onnx", f".{suffix}.onnx")
    onnx.save_model(model, str(dst))
    return dst.name


def embedding_gathers(model, block_size: int) -> list[str]:
    """Token embeddings: Gathers of the graph's token-id input (reshaped or cast on the way, or not) along axis 0 of a
    constant 2-D float table whose rows split into whole blocks (position and token-type tables, small, stay float)."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    token_ids = {i.name for i in model.graph.input} & {"input_ids", "decoder_input_ids"}

    def of_token_ids(name: str) -> bool:  # through reshapes and casts (GPT-2 flattens its ids first)
        while name not in token_ids:
            node = producers.get(name)
            if node is None or node.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"):
                return False
            name = node.input[0]
        return True

    out = []
    for n in model.graph.node:
        table = inits.get(n.input[0]) if n.op_type == "Gather" and of_token_ids(n.input[1]) else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if table is not None and axis == 0 and table.data_type == TensorProto.FLOAT and len(table.dims) == 2 \
                and table.dims[1] % block_size == 0:
            out.append(n.name)
    return out


def lm_heads(model) -> list[str]:
    """MatMuls with a constant weight whose output is a graph output (a decoder's logits)."""
    outputs = {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.output[0] in outputs and len(n.input) > 1 and n.input[1] in inits]


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
