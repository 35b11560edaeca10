"""The labelled data the defaults are trained and scored on, read out of the fetched package archives.

Each data set is split once, by a seeded shuffle of its items in file order, into train and
held-out parts; training never sees the held-out part. `heldout_digest` fingerprints the
held-out items so a reported figure can be tied to the exact sentences it was measured on.
"""
from __future__ import annotations

import hashlib
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Split:
    train: list
    heldout: list

    @property
    def heldout_digest(self) -> str:
        h = hashlib.sha256()
        for item in self.heldout:
            h.update(repr(item).encode())
        return h.hexdigest()[:16]


def rotten_tomatoes(source_dir: Path, source: dict) -> list[tuple[str, int]]:
    """(sentence, label) with label 1 for a positive mean valence, 0 for negative; zeros and repeats dropped."""
    with tarfile.open(source_dir / source["file"]) as tar:
        raw = tar.extractfile(source["member"]).read().decode("utf-8", errors="replace")
    seen, rows = set(), []
    for line in raw.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        valence, text = float(parts[1]), parts[2].strip()
        if valence == 0 or not text or text in seen:
            continue
        seen.add(text)
        rows.append((text, 1 if valence > 0 else 0))
    if len(rows) < 1000:
        raise ValueError(f"{source['member']} in {source['package']} yielded only {len(rows)} sentences: "
                         "the archive is not the one the registry describes")
    return rows


def wnut16(source_dir: Path, source: dict) -> list[tuple[list[str], list[str]]]:
    """(words, BIO tags) per tweet from the CoNLL two-column file; a blank line ends a tweet."""
    sentences, words, tags = [], [], []
    for line in (source_dir / source["file"]).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if not line.strip() or not parts[0].strip():
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        words.append(parts[0].strip())
        tags.append(parts[1].strip() if len(parts) > 1 and parts[1].strip() else "O")
    if words:
        sentences.append((words, tags))
    return sentences


def split(items: list, *, seed: int, heldout: int) -> Split:
    """Seeded shuffle of the items in file order; the first `heldout` are held out."""
    if not 0 < heldout < len(items):
        raise ValueError(f"heldout={heldout} must be between 1 and {len(items) - 1}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return Split(train=[items[i] for i in order[heldout:]], heldout=[items[i] for i in order[:heldout]])


def bio_labels(sentences: list[tuple[list[str], list[str]]]) -> list[str]:
    """O first, then B-/I- per entity type in alphabetical order (so the label ids do not depend on the split)."""
    types = sorted({t[2:] for _, tags in sentences for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) spans from BIO tags, as seqeval's default (non-strict) mode reads them.

    An I- tag that does not continue an entity of its own type starts a new one, as in conlleval.
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, t = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        if start is not None and (prefix in ("O", "B") or t != kind):
            spans.add((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and start is None:
            start, kind = i, t
    return spans


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro-averaged entity-level precision, recall and F1 (exact span and type), like seqeval."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        ge, pe = entities(g), entities(p)
        tp += len(ge & pe)
        n_gold += len(ge)
        n_pred += len(pe)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold_entities": n_gold, "predicted_entities": n_pred}
