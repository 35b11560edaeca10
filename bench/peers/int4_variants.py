"""int4 side by side (issue 26, "4-bit ... with perplexity within 5% of fp32"): onnxpipe's default int4
(asymmetric blocks with float offsets, export/int4_blocks.py), its `--int4-method symmetric` variant (MatMulNBits'
own blocks: fewer kernel calls, less faithful) and onnxruntime-genai's int4, their perplexity on the real news text
(bench/fidelity.py's corpus, all-position logits, the same articles) beside fp32's. The peers case times the
symmetric variant in its int4 group (`folder()`), so speed and fidelity are read side by side.

The registry's SmolLM2 is a Q4_1 GGUF dequantized (bench/artifacts.py): its weights lie on Q4_1's grid, which the
asymmetric blocks reproduce exactly and llama.cpp's Q4_1 requantizes exactly; other weights lose what Q4_1 loses.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import models

NAME = "onnxpipe int4 --int4-method symmetric"


def folder() -> Path:
    """A copy of onnxpipe's SmolLM2 export with its int4 made again with --int4-method symmetric, its manifest
    saying so."""
    src = models.smollm2_onnx()
    source = json.loads((src / "onnxpipe.json").read_text())
    out = models.MODELS / "smollm2-onnx-int4-symmetric"
    if (out / "onnxpipe.json").exists():  # current: made the same way from the same fp32 graph
        made = json.loads((out / "onnxpipe.json").read_text())
        if made["quantization"]["int4"] == _word() and \
                made["files"]["model"]["fp32"] == source["files"]["model"]["fp32"]:
            return out
    from onnxpipe.export.graph import externalize_weights
    from onnxpipe.export.quantize import quantize_int4
    from onnxpipe.folder_install import build_folder
    from onnxpipe.manifest_fields import file_entry

    def fill(tmp: Path) -> None:
        # copies, not hard links: onnx refuses external data reached through a second link (the quantizer loads
        # the fp32 graph, and so may anything that loads the export's graphs later)
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("model.int4") and f.name != "onnxpipe.json":
                shutil.copyfile(f, tmp / f.name)
        quantize_int4(tmp, {"model": "model.onnx"}, "symmetric")
        externalize_weights(tmp / "model.int4.onnx")
        manifest = json.loads((src / "onnxpipe.json").read_text())
        manifest["files"]["model"]["int4"] = file_entry(tmp, "model.int4.onnx")
        manifest["quantization"]["int4"] = _word()  # the export's fidelity entry was the other int4's
        (tmp / "onnxpipe.json").write_text(json.dumps(manifest, indent=1))  # last: a half-made folder has none

    print("bench peers: int4 with symmetric blocks (once)", flush=True)
    return build_folder(out, fill)


def _word() -> dict:
    from onnxpipe.export.quantize import int4_info

    return int4_info("symmetric")


def perplexity(threads: int, n_articles: int = 4, tokens: int = 256) -> dict:
    """Perplexity on the news articles of fp32, onnxpipe's int4, its symmetric variant and genai's int4."""
    import onnxpipe
    from transformers import AutoTokenizer

    from ..fidelity import _nll, _onnx_logits, _ppl, news_article_ids, news_articles

    tok = AutoTokenizer.from_pretrained(models.artifacts.smollm2_hf())
    ids = [tok(t, add_special_tokens=False)["input_ids"][:tokens] for t in news_articles(n_articles)]
    out = {"articles": news_article_ids(n_articles), "tokens_per_article": tokens, "perplexity": {},
           "weights_bytes": {}}
    for name, (path, precision) in {"onnxpipe fp32": (models.smollm2_onnx(), "fp32"),
                                    "onnxpipe int4": (models.smollm2_onnx(), "int4"),
                                    NAME: (folder(), "int4")}.items():
        md = onnxpipe.ModelDir(path, precision=precision, intra_op_num_threads=threads)
        sess = md.session()
        out["perplexity"][name] = _ppl([_nll(_onnx_logits(sess, md.manifest, x), np.array(x)) for x in ids])
        out["weights_bytes"][name] = _bytes(path, Path(md.manifest["files"]["model"][precision]["path"]).name)
        del sess, md
    genai = models.MODELS / "genai-smollm2-int4"
    if (genai / "model.onnx").exists():  # built by the decode workload (run.py's _genai_build)
        out["perplexity"]["onnxruntime-genai int4"] = _ppl([_nll(_genai_logits(genai, threads, x), np.array(x))
                                                            for x in ids])
        out["weights_bytes"]["onnxruntime-genai int4"] = _bytes(genai, "model.onnx")
    base = out["perplexity"]["onnxpipe fp32"]["ppl"]
    for p in out["perplexity"].values():
        p["vs_fp32"] = p["ppl"] / base - 1.0
    return out


def _genai_logits(folder: Path, threads: int, ids: list[int]) -> np.ndarray:
    """All-position logits of genai's graph (plain ONNX Runtime: its ops are ONNX Runtime's), empty KV cache."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    n = len(ids)
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([ids], np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(n, dtype=np.int64)[None]
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
        else:
            raise RuntimeError(f"genai's graph has an input this bench does not feed: {i.name}")
    return sess.run(["logits"], feeds)[0][0]


def _bytes(path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in path.glob(name + "*"))
