"""int4 with the LM head in 4 bits too (issue 26, "speed where we lose"): a bench-side variant of onnxpipe's int4.

onnxpipe's int4 keeps a tied LM head in fp32 (49,152 x 576 floats streamed every step); onnxruntime-genai's int4
quantizes it. This builds the same 4-bit MatMulNBits graph with the head untied and quantized (the export's own
quantize_weight_only, untie_lm_head=True) into a copy of the folder, so the peers case times it beside the default
int4, and measures the perplexity of fp32, int4 and this variant on the real news text (bench/fidelity.py's corpus,
all-position logits, the same articles) so speed and fidelity are read side by side.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from . import models

NAME = "onnxpipe int4 (LM head 4-bit too)"


def folder() -> Path:
    out = models.MODELS / "smollm2-onnx-int4-head"
    if (out / "model.int4.onnx").exists():
        return out
    from onnxpipe.export.graph import externalize_weights
    from onnxpipe.export.quantize import quantize_weight_only

    src = models.smollm2_onnx()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith("model.int4"):  # the manifest lists the int8 files too: they are copied
            continue
        shutil.copy2(f, tmp / f.name) if f.is_file() else shutil.copytree(f, tmp / f.name)
    print("bench peers: int4 with the LM head quantized too (once)", flush=True)
    quantize_weight_only(tmp, {"model": "model.onnx"}, bits=4, block_size=32, accuracy_level=4, suffix="int4",
                         untie_lm_head=True)
    externalize_weights(tmp / "model.int4.onnx")  # the manifest names model.int4.onnx.data, as the export writes it
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def perplexity(threads: int, n_articles: int = 4, tokens: int = 256) -> dict:
    """Perplexity on the news articles of fp32, onnxpipe's int4 (fp32 head) and the 4-bit-head variant."""
    import onnxpipe
    from transformers import AutoTokenizer

    from ..fidelity import _nll, _onnx_logits, _ppl, news_article_ids, news_articles

    tok = AutoTokenizer.from_pretrained(models.artifacts.smollm2_hf())
    ids = [tok(t, add_special_tokens=False)["input_ids"][:tokens] for t in news_articles(n_articles)]
    variants = {"onnxpipe fp32": (models.smollm2_onnx(), "fp32"), "onnxpipe int4": (models.smollm2_onnx(), "int4"),
                NAME: (folder(), "int4")}
    out = {"articles": news_article_ids(n_articles), "tokens_per_article": tokens, "perplexity": {}}
    for name, (path, precision) in variants.items():
        md = onnxpipe.ModelDir(path, precision=precision, intra_op_num_threads=threads)
        sess = md.session()
        out["perplexity"][name] = _ppl([_nll(_onnx_logits(sess, md.manifest, x), np.array(x)) for x in ids])
        del sess, md
    base = out["perplexity"]["onnxpipe fp32"]["ppl"]
    for p in out["perplexity"].values():
        p["vs_fp32"] = p["ppl"] / base - 1.0
    out["weights_bytes"] = {"onnxpipe int4": _bytes(models.smollm2_onnx(), "model.int4.onnx"),
                            NAME: _bytes(folder(), "model.int4.onnx")}
    return out


def _bytes(path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in path.glob(name + "*"))
