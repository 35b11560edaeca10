"""Held-out scores of a built model folder, measured on the ONNX graphs through the onnxpipe runtime.

Each score is computed for fp32 and int8 from the model's own outputs with numpy (argmax of
logits, entity spans from per-word tags, embedding centroids, token log-likelihoods), so it
measures the files that will be served, not the torch model they came from.
"""
from __future__ import annotations

import numpy as np

from onnxpipe import ModelDir
from onnxpipe.tokenizer import to_numpy

from .data import entity_f1

BATCH = 32


def classification_accuracy(path, precision: str, examples: list[tuple[str, int]]) -> float:
    md = ModelDir(path, precision=precision)
    correct = 0
    for batch in _by_length(examples, key=lambda e: len(e[0])):
        feeds = md.tokenizer([t for t, _ in batch])
        logits = md.session().run(feeds)["logits"]
        correct += int((logits.argmax(-1) == np.array([y for _, y in batch])).sum())
    return correct / len(examples)


def token_classification_f1(path, precision: str, sentences: list[tuple[list[str], list[str]]]) -> dict:
    """Entity-level F1 with each word tagged by its first sub-token's argmax (how the model was trained)."""
    md = ModelDir(path, precision=precision)
    id2label = {int(k): v for k, v in md.manifest["id2label"].items()}
    gold, pred = [], []
    for batch in _by_length(sentences, key=lambda s: len(s[0])):
        encs = md.tokenizer.encode_batch([w for w, _ in batch], is_pretokenized=True, padding=True)
        ids = md.session().run(to_numpy(encs))["logits"].argmax(-1)
        for enc, row, (words, tags) in zip(encs, ids, batch):
            tagged = ["O"] * len(words)
            seen = set()
            for pos, word in enumerate(enc.word_ids):
                if word is not None and word not in seen:
                    seen.add(word)
                    tagged[word] = id2label[int(row[pos])]
            gold.append(tags)
            pred.append(tagged)
    return entity_f1(gold, pred)


def centroid_probe_accuracy(path, precision: str, train: list[tuple[str, int]], heldout: list[tuple[str, int]]) -> float:
    """Sentiment accuracy of a nearest-centroid classifier on the sentence embeddings (no training of the model).

    A plain check that the embeddings carry meaning: class centroids come from the train
    sentences, each held-out sentence takes the class of the closer centroid (cosine).
    """
    md = ModelDir(path, precision=precision)
    tr = sentence_embeddings(md, [t for t, _ in train])
    labels = np.array([y for _, y in train])
    centroids = np.stack([tr[labels == c].mean(0) for c in (0, 1)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    he = sentence_embeddings(md, [t for t, _ in heldout])
    return float(((he @ centroids.T).argmax(-1) == np.array([y for _, y in heldout])).mean())


def sentence_embeddings(md: ModelDir, texts: list[str]) -> np.ndarray:
    """Mean pooling over real tokens, then L2 normalization, as the manifest's sentence_embedding says."""
    info = md.manifest.get("sentence_embedding") or {"pooling": "mean", "normalize": True}
    if info.get("pooling") != "mean":
        raise ValueError(f"model dir '{md.path}' pools with {info.get('pooling')!r}; this probe implements mean")
    rows = {}
    for batch in _by_length(list(enumerate(texts)), key=lambda e: len(e[1])):
        feeds = md.tokenizer([t for _, t in batch])
        hidden = md.session().run(feeds)[md.session().output_names[0]]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        if info.get("normalize", True):
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        rows.update({i: v for (i, _), v in zip(batch, pooled)})
    return np.stack([rows[i] for i in range(len(texts))])


def perplexity(path, precision: str, texts: list[str]) -> dict:
    """exp(mean negative log-likelihood) of each text's tokens 2..n given the ones before (no special tokens)."""
    md = ModelDir(path, precision=precision)
    kv = md.manifest["kv_cache"]
    session = md.session()
    nll, count = 0.0, 0
    for text in texts:
        ids = np.array([md.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids], dtype=np.int64)
        if ids.shape[1] < 2:
            continue
        # logits_to_keep=0 keeps every position (Session.run drops it for exports without that input)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_to_keep": np.array([0], np.int64),
                 "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
        for name in kv["past_names"]:
            feeds[name] = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), dtype=np.float32)
        logits = session.run(feeds, ["logits"])["logits"][0, :-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(len(logits)), ids[0, 1:]]).sum())
        count += len(logits)
    return {"perplexity": float(np.exp(nll / count)), "tokens": count}


def _by_length(items: list, key) -> list[list]:
    """Batches of similar length (less padding); the order of the results does not matter to the scores."""
    ordered = sorted(items, key=key)
    return [ordered[i:i + BATCH] for i in range(0, len(ordered), BATCH)]
