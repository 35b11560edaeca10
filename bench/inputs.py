"""Benchmark inputs of an exact token length, the same strings for every contender.

Texts are cut from the corpus the benchmark tokenizers were trained on (so a word is about
one token) and padded with a one-token word until the tokenizer, special tokens included,
gives exactly the length asked for: every contender then runs the very same shapes.
"""
from __future__ import annotations

import random
from pathlib import Path


def corpus_words(seed: int = 0) -> list[str]:
    from onnxpipe.export.tiny import corpus_lines

    # English lines only: the corpus also holds other languages, which these vocabularies mostly map to [UNK].
    lines = [ln for ln in corpus_lines() if ln.isascii() and len(ln.split()) >= 5]
    random.Random(seed).shuffle(lines)
    return " ".join(lines).split()


def texts_of_length(tokenizer_json: Path, length: int, count: int, *, prefix_tokens: int = 0, seed: int = 0) -> list[str]:
    """`count` different texts that encode to exactly `length` tokens (minus `prefix_tokens` a pair's first
    part takes), special tokens included."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    words = corpus_words(seed)
    filler = _one_token_word(tok)
    target = length - prefix_tokens
    texts = []
    start = 0
    for _ in range(count):
        chosen: list[str] = []
        i = start
        while True:
            candidate = chosen + [words[i % len(words)]]
            if len(tok.encode(" ".join(candidate)).ids) > target:
                break
            chosen = candidate
            i += 1
        while len(tok.encode(" ".join(chosen)).ids) < target:
            chosen.append(filler)
        text = " ".join(chosen)
        got = len(tok.encode(text).ids)
        if got != target:
            raise RuntimeError(f"could not build a text of {target} tokens (got {got})")
        texts.append(text)
        start = i + 7  # a different window for the next text
    return texts


def qa_pairs(tokenizer_json: Path, length: int, count: int) -> list[dict]:
    """(question, context) pairs whose encoded pair is exactly `length` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    question = "what is the name of the city"
    q_only = len(tok.encode(question, "x").ids) - len(tok.encode("x").ids)  # the question + its [SEP]
    contexts = texts_of_length(tokenizer_json, length, count, prefix_tokens=q_only, seed=1)
    pairs = [{"question": question, "context": c} for c in contexts]
    for p in pairs:
        got = len(tok.encode(p["question"], p["context"]).ids)
        if got != length:
            raise RuntimeError(f"QA pair has {got} tokens, wanted {length}")
    return pairs


def _one_token_word(tok) -> str:
    for w in ("the", "a", "and", "of", "to"):
        if len(tok.encode(w, add_special_tokens=False).ids) == 1:
            return w
    raise RuntimeError("no one-token filler word in this tokenizer")
