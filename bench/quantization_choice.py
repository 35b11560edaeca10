"""How the export's int8 defaults were chosen: fidelity of each quantization variant on the real models.

    python -m bench.quantization_choice            # MiniLM sentence embeddings + SmolLM2 perplexity

Needs the real exports (built by `onnxpipe build` / the tests): MiniLM feature-extraction and SmolLM2
text-generation, fp32. For each of QUInt8/QInt8 x per-tensor/per-channel (dynamic, ONNX Runtime's
quantize_dynamic) and int4 weight-only blocks (MatMulNBits), it prints MiniLM's min/mean cosine of
mean-pooled sentence embeddings against fp32 on fixed sentences, and SmolLM2's teacher-forced top-1
agreement and perplexity on a fixed English paragraph.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

SENTENCES = [
    "Hello world", "Hugging Face is based in DUMBO, New York City, and is very close to the Manhattan Bridge.",
    "Café crème brûlée — 서울은 대한민국의 수도입니다 😀 東京", "The quick brown fox jumps over the lazy dog. " * 12,
    "I love you", "The weather is lovely today.", "Stocks fell sharply on Monday after the report.",
]
PARAGRAPH = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the World's Fair. "
    "Hugging Face is based in DUMBO, New York City, and it builds tools for machine learning. Many researchers use its "
    "libraries to train and share models. The weather today is sunny with a light breeze from the west, and the market "
    "opened higher after the central bank kept interest rates unchanged.")
VARIANTS = [("QUInt8", False), ("QUInt8", True), ("QInt8", False), ("QInt8", True)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", default=None, help="MiniLM feature-extraction model dir")
    parser.add_argument("--smollm2", default=None, help="SmolLM2 text-generation model dir")
    args = parser.parse_args(argv)
    logging.root.setLevel(logging.ERROR)
    if args.minilm:
        _minilm(Path(args.minilm))
    if args.smollm2:
        _smollm2(Path(args.smollm2))


def _quantized(src: Path, tmp: str, weight_type: str, per_channel: bool) -> str:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = os.path.join(tmp, f"{weight_type}-{per_channel}.onnx")
    quantize_dynamic(str(src), out, weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


def _int4(src: Path, tmp: str) -> str:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, accuracy_level=4))
    q.process()
    out = os.path.join(tmp, "int4.onnx")
    q.model.save_model_to_file(out, use_external_data_format=False)
    return out


def _minilm(model_dir: Path) -> None:
    import onnxruntime as ort
    import onnxpipe

    md = onnxpipe.ModelDir(model_dir)
    feeds = md.tokenizer(SENTENCES, truncation=True, max_length=128)

    def embed(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        h = s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})[0]
        m = feeds["attention_mask"][..., None]
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    ref = embed(model_dir / "model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        for wt, pc in VARIANTS:
            cos = (embed(_quantized(model_dir / "model.onnx", tmp, wt, pc)) * ref).sum(1)
            print(f"MiniLM  {wt:6s} per_channel={pc!s:5s}  sentence cosine min {cos.min():.4f} mean {cos.mean():.4f}")


def _smollm2(model_dir: Path) -> None:
    import onnxruntime as ort
    import onnxpipe

    md = onnxpipe.ModelDir(model_dir)
    ids = np.array([md.tokenizer.backend.encode(PARAGRAPH).ids], np.int64)
    kv = md.manifest["kv_cache"]

    def logits(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(n)[None],
                 "logits_to_keep": np.array([0])}
        for p in kv["past_names"]:
            feeds[p] = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
        return s.run(["logits"], {i.name: feeds[i.name] for i in s.get_inputs()})[0][0]

    def perplexity(lg):
        lg = lg[:-1] - lg[:-1].max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        return float(np.exp(-lp[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean()))

    ref = logits(model_dir / "model.onnx")
    print(f"SmolLM2 fp32  perplexity {perplexity(ref):.2f} on {ids.shape[1]} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(f"{wt:6s} per_channel={pc!s:5s}", _quantized(model_dir / "model.onnx", tmp, wt, pc)) for wt, pc in VARIANTS]
        rows.append(("int4 block=32 (MatMulNBits)", _int4(model_dir / "model.onnx", tmp)))
        for name, path in rows:
            lg = logits(path)
            print(f"SmolLM2 {name}  top-1 agreement {(lg.argmax(-1) == ref.argmax(-1)).mean():.3f}  "
                  f"perplexity {perplexity(lg):.2f}")


if __name__ == "__main__":
    main()
