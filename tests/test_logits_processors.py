"""The numpy logits processors equal transformers' LogitsProcessor/LogitsWarper classes on random logits."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

from onnxpipe import top_k_top_p_filtering  # noqa: E402
from onnxpipe.generation import (GenerationConfig, build_logits_processor, force_token_at_length,  # noqa: E402
                                 model_generation_config, no_repeat_ngram, repetition_penalty, softmax,
                                 suppress_eos_below_min_length, suppress_eos_below_min_new_tokens, temperature_warp,
                                 top_k_warp, top_p_warp)

VOCAB = 300


def _logits(seed, batch=4, vocab=VOCAB, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def _ids(seed, batch=4, length=12, vocab=VOCAB):
    # a small id range so rows repeat tokens and n-grams
    return np.random.default_rng(seed + 100).integers(0, min(vocab, 15), size=(batch, length)).astype(np.int64)


def _torch(processor, scores, input_ids=None):
    ids = torch.from_numpy(input_ids) if input_ids is not None else None
    return processor(ids, torch.from_numpy(scores.copy())).numpy()


def _same(ours, ref):
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = ~np.isneginf(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k, top_p, keep", [(0, 1.0, 1), (10, 1.0, 1), (0, 0.9, 1), (50, 0.95, 1), (5, 0.5, 3),
                                                (1, 0.3, 1), (400, 0.99, 2), (0, 0.0, 1)],
                         ids=lambda v: str(v))
def test_top_k_top_p_filtering_equals_topk_then_topp_warper(top_k, top_p, keep, seed):
    logits = _logits(seed)
    ref = torch.from_numpy(logits.copy())
    if top_k > 0:
        ref = lp.TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=keep)(None, ref)
    ref = lp.TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=keep)(None, ref)
    _same(top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p, min_tokens_to_keep=keep), ref.numpy())


def test_top_k_top_p_filtering_on_one_row_and_custom_filter_value():
    logits = _logits(5, batch=1)[0]
    out = top_k_top_p_filtering(logits, top_k=7, filter_value=-1000.0)
    assert out.shape == logits.shape and int((out != -1000.0).sum()) == 7


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
def test_temperature_equals_warper(temperature, seed):
    logits = _logits(seed)
    np.testing.assert_allclose(temperature_warp(logits, temperature),
                               _torch(lp.TemperatureLogitsWarper(temperature), logits), rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k", [1, 5, 50, 299, 1000])
def test_top_k_equals_warper(top_k, seed):
    logits = _logits(seed)
    _same(top_k_warp(logits, top_k), _torch(lp.TopKLogitsWarper(top_k), logits))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 1.0])
def test_top_p_equals_warper(top_p, seed):
    logits = _logits(seed)
    _same(top_p_warp(logits, top_p), _torch(lp.TopPLogitsWarper(top_p), logits))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
def test_repetition_penalty_equals_processor(penalty, seed):
    logits, ids = _logits(seed), _ids(seed)
    np.testing.assert_allclose(repetition_penalty(ids, logits, penalty),
                               _torch(lp.RepetitionPenaltyLogitsProcessor(penalty), logits, ids), rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ngram", [1, 2, 3, 13])
def test_no_repeat_ngram_equals_processor(ngram, seed):
    logits, ids = _logits(seed), _ids(seed)
    ours = no_repeat_ngram(ids, logits, ngram)
    _same(ours, _torch(lp.NoRepeatNGramLogitsProcessor(ngram), logits, ids))
    if ngram <= 2:
        assert np.isneginf(ours).any()


@pytest.mark.parametrize("min_length", [5, 12, 13, 20])
def test_min_length_equals_processor(min_length):
    logits, ids = _logits(0), _ids(0)
    _same(suppress_eos_below_min_length(ids, logits, min_length, [3, 7]),
          _torch(lp.MinLengthLogitsProcessor(min_length, [3, 7]), logits, ids))


@pytest.mark.parametrize("min_new_tokens", [0, 3, 4, 9])
def test_min_new_tokens_equals_processor(min_new_tokens):
    logits, ids = _logits(1), _ids(1)
    _same(suppress_eos_below_min_new_tokens(ids, logits, 8, min_new_tokens, 5),
          _torch(lp.MinNewTokensLengthLogitsProcessor(8, min_new_tokens, 5), logits, ids))


@pytest.mark.parametrize("max_length", [12, 13, 14])
def test_forced_eos_equals_processor(max_length):
    logits, ids = _logits(2), _ids(2)
    _same(force_token_at_length(ids, logits, max_length - 1, 9),
          _torch(lp.ForcedEOSTokenLogitsProcessor(max_length, 9), logits, ids))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("options", [
    dict(temperature=0.7, top_k=40, top_p=0.9),
    dict(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.3),
    dict(top_k=10, no_repeat_ngram_size=2, min_new_tokens=10),
    dict(temperature=0.5, top_p=0.8, num_beams=3),
], ids=["t0.7-k40-p0.9", "t1.3-p0.5-rep1.3", "k10-ngram2-min_new", "beam-sample-t0.5-p0.8"])
def test_sampling_distribution_equals_transformers_chain(options, seed):
    """The whole chain `generate` builds for sampling: the final next-token distribution is the same."""
    from transformers import GenerationConfig as HFConfig

    eos = [4]
    logits, ids = _logits(seed), _ids(seed)
    prompt_len = 5
    hf_config = HFConfig(do_sample=True, eos_token_id=eos, **options)
    ref_chain = lp.LogitsProcessorList()
    if hf_config.repetition_penalty != 1.0:
        ref_chain.append(lp.RepetitionPenaltyLogitsProcessor(hf_config.repetition_penalty))
    if hf_config.no_repeat_ngram_size:
        ref_chain.append(lp.NoRepeatNGramLogitsProcessor(hf_config.no_repeat_ngram_size))
    if hf_config.min_new_tokens:
        ref_chain.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, hf_config.min_new_tokens, eos))
    keep = 2 if hf_config.num_beams > 1 else 1
    if hf_config.temperature != 1.0:
        ref_chain.append(lp.TemperatureLogitsWarper(hf_config.temperature))
    if hf_config.top_k:
        ref_chain.append(lp.TopKLogitsWarper(hf_config.top_k, min_tokens_to_keep=keep))
    if hf_config.top_p < 1.0:
        ref_chain.append(lp.TopPLogitsWarper(hf_config.top_p, min_tokens_to_keep=keep))
    ref = torch.softmax(ref_chain(torch.from_numpy(ids), torch.from_numpy(logits.copy())), dim=-1).numpy()

    config = model_generation_config({"eos_token_id": eos, "do_sample": True, **options})
    ours = softmax(build_logits_processor(config, prompt_len)(ids, logits))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call, error", [
    (lambda x: temperature_warp(x, 0.0), "temperature"),
    (lambda x: temperature_warp(x, -1.0), "temperature"),
    (lambda x: top_p_warp(x, 1.5), "top_p"),
    (lambda x: top_p_warp(x, -0.1), "top_p"),
    (lambda x: top_k_warp(x, 0), "top_k"),
    (lambda x: repetition_penalty(np.zeros((4, 1), np.int64), x, 0.0), "repetition_penalty"),
    (lambda x: no_repeat_ngram(np.zeros((4, 1), np.int64), x, 0), "no_repeat_ngram_size"),
], ids=["temperature-0", "temperature-neg", "top_p-1.5", "top_p-neg", "top_k-0", "penalty-0", "ngram-0"])
def test_bad_processor_arguments_raise_value_error(call, error):
    with pytest.raises(ValueError, match=error):
        call(_logits(0))


def test_generation_config_rejects_unknown_option():
    with pytest.raises(TypeError, match="unexpected arguments: top_q"):
        GenerationConfig({"top_k": 1}).update(top_q=0.5)
    assert math.isinf(top_k_top_p_filtering(np.array([1.0, 2.0, 3.0]), top_k=1)[0])
