"""Search strategies over a KV-cache stepper: greedy / multinomial sampling, and beam search (with or without sampling).

Both reproduce transformers 4.57's `_sample` and `_beam_search` step by step (the same processors,
stopping rules, padding of finished rows and beam bookkeeping), so greedy and beam outputs are
token-identical to `model.generate` on the same logits.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .logits_process import log_softmax, softmax


def sample_search(first_logits: np.ndarray, step: Callable, input_ids: np.ndarray, *, config, process, stopping,
                  pad_token_id, rng: np.random.Generator | None, on_tokens: Callable | None = None) -> np.ndarray:
    """Greedy (config.do_sample False) or multinomial sampling; returns [batch, prompt + new] ids.

    first_logits: [batch, vocab] after the prompt; step(next_tokens) -> next [batch, vocab] logits.
    Finished rows get `pad_token_id`, as transformers pads them.
    """
    batch = input_ids.shape[0]
    unfinished = np.ones(batch, dtype=bool)
    has_eos = bool(config.eos_token_ids)
    logits = first_logits
    while True:
        next_tokens = next_token(process(input_ids, logits), config.do_sample, rng)
        if has_eos:
            next_tokens = np.where(unfinished, next_tokens, pad_token_id)
        input_ids = np.concatenate([input_ids, next_tokens[:, None].astype(np.int64)], axis=1)
        if on_tokens is not None:
            on_tokens(next_tokens)
        unfinished &= ~stopping(input_ids)
        if not unfinished.any():
            return input_ids
        logits = step(next_tokens)


def next_token(scores: np.ndarray, do_sample: bool, rng: np.random.Generator | None) -> np.ndarray:
    """Each row's next token from its processed scores: drawn (multinomial) or the most likely (greedy)."""
    return _multinomial(softmax(scores), rng) if do_sample else np.argmax(scores, axis=-1)


def beam_search(first_logits: np.ndarray, step: Callable, reorder: Callable, input_ids: np.ndarray, *, config,
                process, stopping, pad_token_id, rng: np.random.Generator | None) -> np.ndarray:
    """transformers' vectorised `_beam_search` (4.57), in numpy. `input_ids` is [batch * num_beams, prompt]."""
    num_beams = config.num_beams
    eos = config.eos_token_ids
    flat_batch, cur_len = input_ids.shape
    batch = flat_batch // num_beams
    max_length = config.max_length
    early_stopping, length_penalty = config.early_stopping, config.length_penalty
    prompt_len = cur_len
    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = np.arange(beams_to_keep) < num_beams
    # transformers writes `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`: a pad id of 0
    # is falsy there, so it fills with EOS instead
    fill = (pad_token_id or eos[0]) if eos else -1

    running = np.full((batch, num_beams, max_length), fill, dtype=np.int64)
    running[:, :, :cur_len] = input_ids.reshape(batch, num_beams, cur_len)
    sequences = running.copy()
    running_scores = np.zeros((batch, num_beams), dtype=np.float32)
    running_scores[:, 1:] = -1e9
    beam_scores = np.full((batch, num_beams), -1e9, dtype=np.float32)
    is_finished = np.zeros((batch, num_beams), dtype=bool)
    heuristic_unsatisfied = np.ones((batch, 1), dtype=bool)
    running_beam_indices = np.full((batch, num_beams, max_length - cur_len), -1, dtype=np.int64)
    beam_indices = running_beam_indices.copy()
    logits = first_logits
    while True:
        flat_running = running[:, :, :cur_len].reshape(flat_batch, cur_len)
        log_probs = process(flat_running, log_softmax(logits))
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, num_beams, vocab) + running_scores[:, :, None]
        log_probs = log_probs.reshape(batch, num_beams * vocab)

        # c. top-K continuations over all beams
        if config.do_sample:
            topk_indices = _sample_without_replacement(softmax(log_probs), beams_to_keep, rng)
        else:
            topk_indices = _topk_indices(log_probs, beams_to_keep)
        topk_log_probs = np.take_along_axis(log_probs, topk_indices, axis=1)
        topk_beam = topk_indices // vocab
        topk_ids = topk_indices % vocab
        topk_running_beam_indices = np.take_along_axis(running_beam_indices, topk_beam[:, :, None], axis=1)
        topk_running = np.take_along_axis(running, topk_beam[:, :, None], axis=1)
        topk_running[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - prompt_len] = topk_beam + np.arange(batch)[:, None] * num_beams

        # d. which candidates hit a stopping criterion
        hits = stopping(topk_running[:, :, :cur_len + 1].reshape(batch * beams_to_keep, cur_len + 1))
        hits = hits.reshape(batch, beams_to_keep)

        # e. the best non-finished candidates keep running
        topk_running_log_probs = (topk_log_probs + hits.astype(np.float32) * np.float32(-1e9)).astype(np.float32)
        keep = _topk_indices(topk_running_log_probs, num_beams)
        running = np.take_along_axis(topk_running, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(topk_running_log_probs, keep, axis=1)
        running_beam_indices = np.take_along_axis(topk_running_beam_indices, keep[:, :, None], axis=1)

        # f. merge newly finished candidates into the finished set
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = (topk_log_probs / np.float32((cur_len + 1 - prompt_len) ** length_penalty)).astype(np.float32)
        batch_full = np.all(is_finished, axis=-1, keepdims=True) & (early_stopping is True)
        finished_scores += batch_full.astype(np.float32) * np.float32(-1e9)
        finished_scores += (~heuristic_unsatisfied).astype(np.float32) * np.float32(-1e9)
        finished_scores += (~just_finished).astype(np.float32) * np.float32(-1e9)
        merged_scores = np.concatenate([beam_scores, finished_scores], axis=1)
        best = _topk_indices(merged_scores, num_beams)
        sequences = np.take_along_axis(np.concatenate([sequences, topk_running], axis=1), best[:, :, None], axis=1)
        beam_scores = np.take_along_axis(merged_scores, best, axis=1)
        beam_indices = np.take_along_axis(np.concatenate([beam_indices, topk_running_beam_indices], axis=1),
                                          best[:, :, None], axis=1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, just_finished], axis=1), best, axis=1)

        # g. reorder the cache for the beams that continue, then decide whether to go on
        beam_idx = running_beam_indices[:, :, cur_len - prompt_len].reshape(-1)
        cur_len += 1
        heuristic_unsatisfied = _early_stop_heuristic(heuristic_unsatisfied, running_scores, beam_scores, is_finished,
                                                      cur_len, max_length, prompt_len, early_stopping, length_penalty)
        improvement_possible = heuristic_unsatisfied.any()
        open_beam = not (is_finished.all() and early_stopping is True)
        valid_continuations = not hits.all()
        if not (improvement_possible and open_beam and valid_continuations):
            break
        reorder(beam_idx)
        logits = step(running[:, :, cur_len - 1].reshape(-1))

    sequences = sequences[:, :config.num_return_sequences].reshape(batch * config.num_return_sequences, -1)
    beam_indices = beam_indices[:, :config.num_return_sequences].reshape(batch * config.num_return_sequences, -1)
    generated = int((beam_indices + 1).astype(bool).sum(axis=1).max())
    return sequences[:, :prompt_len + generated]


def _early_stop_heuristic(unsatisfied, running_scores, beam_scores, is_finished, cur_len, max_length, prompt_len,
                          early_stopping, length_penalty):
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_length - prompt_len
    else:
        best_length = cur_len - prompt_len
    best_running = running_scores[:, :1] / np.float32(best_length ** length_penalty)
    worst_finished = np.where(is_finished, beam_scores.min(axis=1, keepdims=True), np.float32(-1e9))
    return unsatisfied & np.any(best_running > worst_finished, axis=-1, keepdims=True)


def _topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, best first (ties: lower index first)."""
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def _multinomial(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    draws = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < draws[:, None]).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def _sample_without_replacement(probs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k draws per row without replacement, as torch.multinomial does it: the top k of p / Exp(1).

    Like torch, rows with fewer than k non-zero probabilities are filled with zero-probability ids
    instead of failing (beam sampling reaches this when ForcedEOS leaves one token per beam).
    """
    keys = probs.astype(np.float64) / rng.exponential(size=probs.shape)
    return np.argsort(-keys, axis=-1, kind="stable")[:, :k]
