"""Graph edits applied after optimum's export, one module a pass.

`fuse_llama_decoder` runs the Llama-family decoder fusions of `export --optimize` in the one order they work in
(LLAMA_DECODER_PASSES); the other passes are called on their own: `add_logits_to_keep` and
`externalize_weights` on every decoder / graph, `retie_transposed_weights` after ONNX Runtime's optimizer,
`gemm_to_matmul` and `untie_transposed_weights` before quantization.
"""
from __future__ import annotations

from ._util import ATTENTION_OPSET
from .attention_layout import fold_attention_layout
from .decoder_attention import fuse_decoder_attention
from .external_data import externalize_weights
from .gemm_to_matmul import gemm_to_matmul
from .group_query_attention import fuse_group_query_attention
from .logits_to_keep import LOGITS_TO_KEEP, add_logits_to_keep
from .rotary_embedding import fuse_rotary_embeddings
from .shared_kv_buffer import prepare_shared_kv_buffer
from .sibling_matmuls import fuse_sibling_matmuls
from .tied_weights import retie_transposed_weights, untie_transposed_weights

__all__ = [
    "ATTENTION_OPSET", "LLAMA_DECODER_PASSES", "LOGITS_TO_KEEP", "add_logits_to_keep", "externalize_weights",
    "fold_attention_layout", "fuse_decoder_attention", "fuse_group_query_attention", "fuse_llama_decoder",
    "fuse_rotary_embeddings", "fuse_sibling_matmuls", "gemm_to_matmul", "prepare_shared_kv_buffer",
    "retie_transposed_weights", "untie_transposed_weights",
]

# The Llama-family decoder fusions (after ONNX Runtime's GPT-2 optimizer has fused RMSNorm + residual), in the
# order they must run: each pass matches the graph the passes before it leave. A row: the key its result is
# recorded under, the pass, the fuse_llama_decoder arguments it takes after the model, and when it runs
# (None: always; else a test of the attention kind and the results so far).
LLAMA_DECODER_PASSES = (
    ("RotaryEmbedding", fuse_rotary_embeddings, (), None),
    ("Attention", fuse_decoder_attention, ("num_heads", "num_kv_heads"), None),
    ("AttentionLayout", fold_attention_layout, (), None),  # 3D Q/K/V, cache inside Attention
    ("MergedMatMul", fuse_sibling_matmuls, (), None),  # q/k/v and gate/up: one MatMul each
    # packed QKV, RoPE inside: com.microsoft GroupQueryAttention (CPU)
    ("GroupQueryAttention", fuse_group_query_attention, ("max_positions",),
     lambda attention, done: attention == "gqa"),
    # the cache appended in place, where GroupQueryAttention holds it
    ("kv_shared_buffer", prepare_shared_kv_buffer, (), lambda attention, done: bool(done.get("GroupQueryAttention"))),
)


def fuse_llama_decoder(model, *, num_heads: int, num_kv_heads: int, attention: str,
                       max_positions: int) -> tuple[dict, dict]:
    """Run LLAMA_DECODER_PASSES on `model` (a ModelProto, edited in place) for attention kind `attention`
    ("gqa": GroupQueryAttention; "onnx": ONNX Attention + RotaryEmbedding). max_positions: the positions
    GroupQueryAttention's RoPE tables hold.

    Returns (fused_ops, extra): how many each fusion fused, by its key; and for the manifest's optimization
    section, when GroupQueryAttention fused a layer, the positions of its tables (rotary_table_positions) and
    whether the KV cache may be one buffer per tensor (kv_shared_buffer), else nothing.
    """
    args = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "max_positions": max_positions}
    fused_ops: dict = {}
    for key, run, names, when in LLAMA_DECODER_PASSES:
        if when is None or when(attention, fused_ops):
            fused_ops[key] = run(model, *(args[n] for n in names))
    shared = fused_ops.pop("kv_shared_buffer", None)
    if not fused_ops.get("GroupQueryAttention"):
        return fused_ops, {}
    return fused_ops, {"rotary_table_positions": max_positions, "kv_shared_buffer": shared}
