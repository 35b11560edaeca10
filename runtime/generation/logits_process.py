"""Logits processors as plain numpy functions, each the twin of a transformers `LogitsProcessor`/`LogitsWarper`.

Every function takes `scores` [batch, vocab] (float32) and returns a new array; the ones that look at
history also take `input_ids` [batch, length]. `build_logits_processor(config, prompt_length)` chains
them in the order transformers' `_get_logits_processor` does, so a search strategy only calls one thing.

    >>> filtered = top_k_top_p_filtering(logits[:, -1, :], top_k=50, top_p=0.9)   # doctest: +SKIP
    >>> probs = softmax(filtered); next_id = rng.choice(len(probs[0]), p=probs[0])  # doctest: +SKIP
"""
from __future__ import annotations

import math

import numpy as np

NEG_INF = -math.inf


def top_k_top_p_filtering(logits, top_k: int = 0, top_p: float = 1.0, filter_value: float = -math.inf,
                          min_tokens_to_keep: int = 1) -> np.ndarray:
    """Filter a [batch, vocab] (or [vocab]) logits array with top-k and then nucleus (top-p) filtering.

    The transformers reference (removed in 4.40) was exactly TopKLogitsWarper when top_k > 0,
    then TopPLogitsWarper when 0 <= top_p <= 1, with the same filter_value and min_tokens_to_keep.
    """
    logits = np.asarray(logits)
    squeeze = logits.ndim == 1
    scores = logits[None, :] if squeeze else logits
    if top_k > 0:
        scores = top_k_warp(scores, top_k, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)
    if 0 <= top_p <= 1.0:
        scores = top_p_warp(scores, top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)
    return scores[0] if squeeze else scores


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    shifted = scores - np.max(scores, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def log_softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    shifted = scores - np.max(scores, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


# --- warpers (sampling only) -------------------------------------------------------------------------------------

def temperature_warp(scores: np.ndarray, temperature: float) -> np.ndarray:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be a strictly positive float when sampling; "
                         "for greedy decoding use do_sample=False")
    return (scores / np.float32(temperature)).astype(scores.dtype, copy=False)


def top_k_warp(scores: np.ndarray, top_k: int, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1) -> np.ndarray:
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k <= 0:
        raise ValueError(f"top_k={top_k!r} must be a strictly positive integer")
    k = min(max(int(top_k), min_tokens_to_keep), scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[..., k - 1:k]
    # ties with the k-th value are kept, as `scores < topk[..., -1]` does
    return np.where(scores < kth, np.float32(filter_value), scores).astype(scores.dtype, copy=False)


def top_p_warp(scores: np.ndarray, top_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1) -> np.ndarray:
    top_p = float(top_p)
    if top_p < 0 or top_p > 1.0:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as TopPLogitsWarper sorts
    sorted_logits = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_logits), axis=-1, dtype=np.float32)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -min_tokens_to_keep:] = False
    remove = np.zeros_like(sorted_remove)
    np.put_along_axis(remove, order, sorted_remove, axis=-1)
    return np.where(remove, np.float32(filter_value), scores).astype(scores.dtype, copy=False)


def min_p_warp(scores: np.ndarray, min_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1) -> np.ndarray:
    if not 0 <= float(min_p) <= 1.0:
        raise ValueError(f"min_p={min_p!r} must be in [0, 1]")
    probs = softmax(scores)
    threshold = float(min_p) * probs.max(axis=-1, keepdims=True)
    remove = probs < threshold
    order = np.argsort(-scores, axis=-1, kind="stable")
    sorted_remove = np.take_along_axis(remove, order, axis=-1)
    sorted_remove[..., :min_tokens_to_keep] = False
    np.put_along_axis(remove, order, sorted_remove, axis=-1)
    return np.where(remove, np.float32(filter_value), scores).astype(scores.dtype, copy=False)


# --- processors (every strategy) --------------------------------------------------------------------------------

def repetition_penalty(input_ids: np.ndarray, scores: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive / multiply negative scores of tokens already in each row of `input_ids` (CTRL's penalty)."""
    if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not penalty > 0:
        raise ValueError(f"repetition_penalty={penalty!r} must be a strictly positive float")
    out = scores.copy()
    penalty = np.float32(penalty)
    for row, ids in enumerate(input_ids):
        seen = np.unique(ids)
        values = out[row, seen]
        out[row, seen] = np.where(values < 0, values * penalty, values / penalty)
    return out


def no_repeat_ngram(input_ids: np.ndarray, scores: np.ndarray, ngram_size: int) -> np.ndarray:
    """Ban every token that would complete an n-gram already present in the row (prompt included)."""
    if not isinstance(ngram_size, (int, np.integer)) or ngram_size <= 0:
        raise ValueError(f"no_repeat_ngram_size={ngram_size!r} must be a strictly positive integer")
    out = scores.copy()
    cur_len = input_ids.shape[-1]
    if cur_len + 1 < ngram_size:
        return out
    for row, ids in enumerate(input_ids.tolist()):
        prefix = tuple(ids[cur_len + 1 - ngram_size:cur_len])
        banned = [ids[i + ngram_size - 1] for i in range(cur_len - ngram_size + 1)
                  if tuple(ids[i:i + ngram_size - 1]) == prefix]
        if banned:
            out[row, banned] = NEG_INF
    return out


def suppress_eos_below_min_length(input_ids: np.ndarray, scores: np.ndarray, min_length: int, eos_token_id) -> np.ndarray:
    """MinLengthLogitsProcessor: no EOS while the whole sequence (prompt included) is shorter than min_length."""
    if input_ids.shape[-1] >= min_length:
        return scores.copy()
    return _suppress(scores, eos_token_id)


def suppress_eos_below_min_new_tokens(input_ids: np.ndarray, scores: np.ndarray, prompt_length: int,
                                      min_new_tokens: int, eos_token_id) -> np.ndarray:
    """MinNewTokensLengthLogitsProcessor: no EOS until `min_new_tokens` tokens follow the prompt."""
    if input_ids.shape[-1] - prompt_length >= min_new_tokens:
        return scores.copy()
    return _suppress(scores, eos_token_id)


def force_token_at_length(input_ids: np.ndarray, scores: np.ndarray, length: int, token_ids) -> np.ndarray:
    """ForcedBOS (length 1) / ForcedEOS (length max_length - 1): every other token gets -inf at that length."""
    if input_ids.shape[-1] != length:
        return scores
    out = np.full_like(scores, NEG_INF)
    out[:, np.atleast_1d(np.asarray(token_ids, dtype=np.int64))] = 0
    return out


def suppress_tokens(scores: np.ndarray, token_ids) -> np.ndarray:
    return _suppress(scores, token_ids)


def _suppress(scores, token_ids):
    out = scores.copy()
    ids = np.atleast_1d(np.asarray(token_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < scores.shape[-1])]
    out[:, ids] = NEG_INF
    return out


# --- the chain ---------------------------------------------------------------------------------------------------

def build_logits_processor(config, prompt_length: int):
    """The processors `config` (a resolved GenerationConfig) asks for, in transformers' order, as one callable.

    Returns `process(input_ids, scores) -> scores`.
    """
    steps = []
    eos = config.eos_token_ids
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        steps.append(lambda ids, s: repetition_penalty(ids, s, config.repetition_penalty))
    if config.no_repeat_ngram_size:
        steps.append(lambda ids, s: no_repeat_ngram(ids, s, config.no_repeat_ngram_size))
    if config.min_length and eos:
        steps.append(lambda ids, s: suppress_eos_below_min_length(ids, s, config.min_length, eos))
    if config.min_new_tokens and eos:
        steps.append(lambda ids, s: suppress_eos_below_min_new_tokens(ids, s, prompt_length, config.min_new_tokens, eos))
    if config.forced_bos_token_id is not None:
        steps.append(lambda ids, s: force_token_at_length(ids, s, 1, config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        steps.append(lambda ids, s: force_token_at_length(ids, s, config.max_length - 1, config.forced_eos_token_id))
    if config.suppress_tokens:
        steps.append(lambda ids, s: suppress_tokens(s, config.suppress_tokens))
    if config.begin_suppress_tokens:
        begin = prompt_length if (prompt_length > 1 or config.forced_bos_token_id is None) else prompt_length + 1
        steps.append(lambda ids, s: suppress_tokens(s, config.begin_suppress_tokens) if ids.shape[-1] == begin else s)
    if config.do_sample:
        # beams keep one non-EOS candidate more, as transformers does
        keep = len(eos) + 1 if (config.num_beams > 1 and eos) else (2 if config.num_beams > 1 else 1)
        if config.temperature is not None and config.temperature != 1.0:
            steps.append(lambda ids, s: temperature_warp(s, config.temperature))
        if config.top_k is not None and config.top_k != 0:
            steps.append(lambda ids, s: top_k_warp(s, config.top_k, min_tokens_to_keep=keep))
        if config.top_p is not None and config.top_p < 1.0:
            steps.append(lambda ids, s: top_p_warp(s, config.top_p, min_tokens_to_keep=keep))
        if config.min_p is not None:
            steps.append(lambda ids, s: min_p_warp(s, config.min_p, min_tokens_to_keep=keep))

    def process(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for step in steps:
            scores = step(input_ids, scores)
        return scores

    return process
