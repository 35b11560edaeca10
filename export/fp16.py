"""float16 twins of the exported graphs (`export --dtype fp16`), written beside the fp32 files as `<name>.fp16.onnx`.

The conversion is ONNX Runtime's own (onnxruntime.transformers: OnnxModel.convert_float_to_float16, symbolic shape
inference so com.microsoft ops such as GroupQueryAttention get their types), as Optimum's fp16 optimization and ORT's
generation scripts run it:

- inputs and outputs keep the model's usual types (logits, hidden states, encoder_hidden_states: float32), except the
  KV cache (past_key_values.* / present.*), which is float16: it is the largest thing fed back every step, and a
  float32 cache would be cast to float16 and back around every layer on every step (and GroupQueryAttention's
  shared past/present buffer, which it appends to in place, must be the kernel's own type);
- ORT's DEFAULT_OP_BLOCK_LIST stays float32 (Range, CumSum, Min/Max, TopK, ...: no float16 kernels), plus the
  statistics of every decomposed normalization (the Pow -> ReduceMean -> Add eps -> Sqrt -> Div/Reciprocal chain
  of an unfused RMSNorm/LayerNorm, and the Mul that applies it): x^2 overflows float16 once |x| > 256, which
  Llama-family and T5 residual streams reach. Fused norms (LayerNormalization, SimplifiedLayerNormalization and
  their Skip variants) and Softmax stay float16: their ORT kernels accumulate in float32;
- T5-family models also keep Add and Relu in float32, as ORT's T5 helper does (T5's residual stream overflows
  float16 in the feed-forward blocks).

Then every graph is run by `validate_fp16` against torch fp32 (export/validate.py). ONNX Runtime's CPU provider has
float16 kernels for few compute ops on x86 (it inserts casts and computes MatMul, GroupQueryAttention, the norms
and most elementwise ops in float32, with float16 tensors between them); `cpu_float32_ops` finds which, so the
manifest says plainly what a CPU-only export did not run in float16.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from pathlib import Path

# Validation tolerances of the fp16 files against torch fp32, per output: atol + rtol * max|output| (export/validate.py).
# fp16 carries 11 significant bits (~5e-4 relative per rounding); on the tiny test models here the rounded weights
# and stored activations moved outputs by 0.1-0.5% of their range (BERT, GPT-2, Llama logits) and up to 2.4% (T5's
# encoder output: its attention scores are not scaled by 1/sqrt(d), so rounding them moves the softmax most).
# 3% of the output's range leaves room for that without letting a wrong graph (a swapped, overflowed or NaN tensor
# moves by O(range)) through; labels/top-1 agreement are recorded beside it.
FP16_ATOL = 1e-2
FP16_RTOL = 3e-2
# The KV cache's element type in the fp16 files (see above); every other float input and output stays float32.
KV_CACHE_DTYPE = "float16"
KV_CACHE_PREFIXES = ("past_key_values.", "present.")
# The additive attention mask's "masked" value in the fp16 graphs. The exports use -inf or float32's lowest
# (converted to float16's, -65504): a row masked everywhere (a left-padded prompt's pad positions, causal mask and
# padding together) then sums to -inf, and the float16 attention kernels' softmax of an all -inf row is NaN, which
# reaches the real rows through their (zero-weighted) values: the tiny Llama's left-padded rows came out NaN.
# -10000 is ONNX Runtime's own default mask_filter_value (com.microsoft Attention): exp(-10000) is 0 in float16 and
# a score plus it stays finite.
MASK_FILTER_VALUE = -10000.0
# Model types whose residual stream overflows float16 (ORT's T5 helper keeps Add/Relu in float32 for them).
FP32_RESIDUAL_MODEL_TYPES = {"t5", "mt5", "umt5", "longt5"}
FP32_RESIDUAL_OPS = ("Add", "Relu")
# The chain a decomposed norm computes its statistics with, after the Pow(x, 2) that starts it.
_NORM_STATISTICS_OPS = ("ReduceMean", "Add", "Sqrt", "Div", "Reciprocal")


def convert_fp16(out_dir: Path, roles: dict, model_type: str) -> tuple[dict[str, str], dict]:
    """Write `<name>.fp16.onnx` for each role (weights inline; externalized later with the rest); return
    (role -> fp16 file name, the manifest's fp16 section less its validation)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    op_block_list = list(DEFAULT_OP_BLOCK_LIST)
    if model_type in FP32_RESIDUAL_MODEL_TYPES:
        op_block_list += list(FP32_RESIDUAL_OPS)
    written, blocked_nodes, kept, mask_constants = {}, {}, {}, {}
    for role, name in roles.items():
        model = onnx.load(str(out_dir / name))
        keep_io = [v.name for v in (*model.graph.input, *model.graph.output)
                   if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and not v.name.startswith(KV_CACHE_PREFIXES)]
        norm_nodes = norm_statistics_nodes(model.graph)
        blocked_nodes[role] = len(norm_nodes)
        kept[role] = keep_io
        onnx_model = OnnxModel(model)
        with _quiet():
            onnx_model.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=keep_io,
                                                op_block_list=op_block_list, node_block_list=norm_nodes)
        onnx_model.topological_sort()  # the converter appends the input Casts last
        mask_constants[role] = finite_mask_constants(onnx_model.model.graph)
        dst = out_dir / name.replace(".onnx", ".fp16.onnx")
        onnx.save(onnx_model.model, str(dst))
        written[role] = dst.name
    info = {
        "method": "onnxruntime.transformers convert_float_to_float16 (weights and activations float16)",
        "kv_cache_dtype": KV_CACHE_DTYPE if any(_has_cache(out_dir / f) for f in written.values()) else None,
        "float32_io": kept,
        "op_block_list": sorted(set(op_block_list) - set(DEFAULT_OP_BLOCK_LIST)) or None,
        "default_op_block_list": "onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST",
        "norm_statistics_nodes_float32": blocked_nodes,
        "mask_fill_value": MASK_FILTER_VALUE, "mask_constants_replaced": mask_constants,
    }
    return written, info


def norm_statistics_nodes(graph) -> list[str]:
    """The nodes of each decomposed normalization's statistics: a Pow(x, 2) and the single-consumer chain after it
    (ReduceMean, Add eps, Sqrt, Div/Reciprocal) up to and with the Mul or Div that applies it to x."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def constant(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    names: list[str] = []
    for pow_node in (n for n in graph.node if n.op_type == "Pow"):
        exponent = constant(pow_node.input[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
            continue
        chain, node = [pow_node], pow_node
        while True:
            readers = consumers.get(node.output[0], [])
            if len(readers) != 1:
                break
            node = readers[0]
            if node.op_type in ("Mul",) or (node.op_type == "Div" and node.input[1] == chain[-1].output[0]
                                             and chain[-1].op_type == "Sqrt"):
                chain.append(node)  # applies the statistics to x: its output is normalized, safe in float16
                break
            if node.op_type not in _NORM_STATISTICS_OPS:
                break
            chain.append(node)
        if any(n.op_type == "ReduceMean" for n in chain):
            names += [n.name for n in chain if n.name]
    return names


def finite_mask_constants(graph) -> int:
    """Set the float16 scalar constants that hold -inf or float16's lowest (-65504, what float32's lowest converts
    to) to MASK_FILTER_VALUE; returns how many. Such constants are the exports' attention-mask fill values."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    tensors = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
    tensors += [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT16]
    changed = 0
    for t in tensors:
        if int(np.prod(t.dims)) != 1:
            continue
        value = numpy_helper.to_array(t)
        if float(value.reshape(-1)[0]) <= float(np.finfo(np.float16).min):
            t.CopyFrom(numpy_helper.from_array(np.full(value.shape, MASK_FILTER_VALUE, np.float16), t.name))
            changed += 1
    return changed


def cpu_float32_ops(path: Path) -> dict[str, int]:
    """Op types (with node counts) of the fp16 graph that ONNX Runtime's CPU provider computes in float32: it has
    no float16 kernel for them and inserts Casts around them (InsertCastTransformer, whose Casts it names
    InsertedPrecisionFreeCast_*). Read from the graph as the CPU provider optimized it for this machine."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxpipe-fp16-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False).graph
    inserted = {o for n in graph.node if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast")
                for o in n.output}
    counts = Counter(n.op_type for n in graph.node if n.op_type != "Cast" and any(i in inserted for i in n.input))
    return dict(sorted(counts.items()))


def _has_cache(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(v.name.startswith(KV_CACHE_PREFIXES) for v in graph.input)


@contextlib.contextmanager
def _quiet():
    """The converter and its shape inference log warnings (and print) for every com.microsoft op they meet."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "onnx_model", "float16", "shape_infer_helper",
                                              "symbolic_shape_infer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.root.setLevel(level)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
