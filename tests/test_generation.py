"""Generated token ids equal transformers' `model.generate` on the same tiny checkpoints (GPT-2, Llama, T5, BART,
and a Llama fused by --optimize into GroupQueryAttention: "llama-gqa").

Greedy and beam search, one prompt and a batch (left padding for decoders, right padding for the
encoder of seq2seq models), with each deterministic option; EOS handling uses an EOS id picked from
what the model actually generates, so rows really stop early. Also: the KV cache is really used,
stop strings, sampling reproducibility, and bad input.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxpipe import ModelDir  # noqa: E402
from onnxpipe.generation import Generator  # noqa: E402

ARCHS = {"gpt2": "text-generation", "llama": "text-generation", "t5": "text2text-generation",
         "bart": "text2text-generation", "llama-gqa": "text-generation"}
# arch -> (tiny architecture, config overrides, --optimize): GroupQueryAttention's CPU kernel wants head_dim % 16 == 0
VARIANTS = {"llama-gqa": ("llama", {"hidden_size": 64, "head_dim": 16}, True)}


def _variant(arch):
    return VARIANTS.get(arch, (arch, {}, False))


def tiny_export_of(arch):
    from conftest import tiny_export

    base, overrides, optimize = _variant(arch)
    return tiny_export(base, ARCHS[arch], optimize=optimize, **overrides)
PROMPTS = ["the quick brown fox jumps over", "hello"]
CASES = {
    "greedy": dict(max_new_tokens=12),
    "greedy-max_length": dict(max_length="prompt+8"),
    "greedy-repetition_penalty": dict(max_new_tokens=12, repetition_penalty=1.5),
    "greedy-no_repeat_ngram_size": dict(max_new_tokens=12, no_repeat_ngram_size=2),
    "beam4": dict(max_new_tokens=10, num_beams=4),
    "beam3-return3": dict(max_new_tokens=10, num_beams=3, num_return_sequences=3),
    "beam4-length_penalty-2": dict(max_new_tokens=10, num_beams=4, length_penalty=2.0, num_return_sequences=2),
    "beam4-length_penalty-neg": dict(max_new_tokens=10, num_beams=4, length_penalty=-1.0),
    "beam4-early_stopping": dict(max_new_tokens=10, num_beams=4, early_stopping=True),
    "beam4-early_stopping-never": dict(max_new_tokens=10, num_beams=4, early_stopping="never"),
    "beam3-repetition-ngram": dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=3),
}
# options that need an EOS the model really produces: {eos} is replaced by such a token id
EOS_CASES = {
    "eos-greedy": dict(max_new_tokens=12),
    "eos-list-greedy": dict(max_new_tokens=12, eos_token_id=["{eos}", "{eos2}"]),
    "eos-min_new_tokens": dict(max_new_tokens=12, min_new_tokens=8),
    "eos-min_length": dict(max_new_tokens=12, min_length=10),
    "eos-pad_token_id": dict(max_new_tokens=12, pad_token_id=3),
    "eos-beam4": dict(max_new_tokens=12, num_beams=4, num_return_sequences=2),
    "eos-beam4-early_stopping": dict(max_new_tokens=12, num_beams=4, early_stopping=True),
    "eos-beam4-length_penalty": dict(max_new_tokens=12, num_beams=4, length_penalty=0.3, early_stopping="never"),
    "eos-beam3-min_new_tokens": dict(max_new_tokens=12, num_beams=3, min_new_tokens=6),
}


@functools.lru_cache(maxsize=None)
def _hf(arch):
    from conftest import tiny_checkpoint

    base, overrides, _ = _variant(arch)
    ckpt = tiny_checkpoint(base, ARCHS[arch], **overrides)
    cls = transformers.AutoModelForCausalLM if ARCHS[arch] == "text-generation" else transformers.AutoModelForSeq2SeqLM
    model = cls.from_pretrained(ckpt).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    if ARCHS[arch] == "text-generation":
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return model, tok


@functools.lru_cache(maxsize=None)
def _generator(arch):
    return Generator(ModelDir(tiny_export_of(arch)))


def _inputs(arch, batched):
    _, tok = _hf(arch)
    enc = tok(PROMPTS if batched else PROMPTS[:1], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _reference(arch, input_ids, attention_mask, **kwargs):
    model, tok = _hf(arch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              **kwargs).numpy()


def _ours(arch, input_ids, attention_mask, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _generator(arch).generate(input_ids.numpy(), attention_mask.numpy(), do_sample=False, **kwargs)


def _assert_same(ours, ref):
    assert ours.shape == ref.shape, f"shape {ours.shape} != transformers {ref.shape}\nours {ours}\nref  {ref}"
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("batched", [False, True], ids=["batch1", "left-padded-batch2"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_matches_transformers(arch, case, batched):
    input_ids, attention_mask = _inputs(arch, batched)
    kwargs = dict(CASES[case])
    if kwargs.get("max_length") == "prompt+8":  # max_length counts the (decoder) prompt
        kwargs["max_length"] = (input_ids.shape[1] if ARCHS[arch] == "text-generation" else 1) + 8
    ref = _reference(arch, input_ids, attention_mask, **kwargs)
    _assert_same(_ours(arch, input_ids, attention_mask, **kwargs), ref)


@functools.lru_cache(maxsize=None)
def _frequent_tokens(arch, batched):
    """Two ids the greedy continuation of row 0 produces early (at new positions 2 and 4)."""
    input_ids, attention_mask = _inputs(arch, batched)
    free = _reference(arch, input_ids, attention_mask, max_new_tokens=12, eos_token_id=None, forced_eos_token_id=None)
    start = input_ids.shape[1] if ARCHS[arch] == "text-generation" else 1
    row = free[0, start:].tolist()
    return row[2], next((t for t in row[4:] if t != row[2]), row[2])


@pytest.mark.parametrize("batched", [False, True], ids=["batch1", "left-padded-batch2"])
@pytest.mark.parametrize("case", list(EOS_CASES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_eos_handling_matches_transformers(arch, case, batched):
    input_ids, attention_mask = _inputs(arch, batched)
    eos, eos2 = _frequent_tokens(arch, batched)
    kwargs = dict(EOS_CASES[case])
    kwargs["eos_token_id"] = [eos, eos2] if "eos_token_id" in kwargs else eos
    ref = _reference(arch, input_ids, attention_mask, **kwargs)
    if case == "eos-greedy":  # the chosen EOS really ends row 0 before max_new_tokens
        start = input_ids.shape[1] if ARCHS[arch] == "text-generation" else 1
        assert ref[0, start:].tolist().index(eos) < 11
    _assert_same(_ours(arch, input_ids, attention_mask, **kwargs), ref)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kv_cache_feeds_one_token_per_step_after_the_prompt(arch):
    input_ids, attention_mask = _inputs(arch, batched=True)
    gen = _generator(arch)
    out = gen.generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=9, eos_token_id=None,
                       forced_eos_token_id=None)
    prompt_len = input_ids.shape[1] if ARCHS[arch] == "text-generation" else 1
    assert out.shape[1] == prompt_len + 9
    assert gen.step_input_lengths == [prompt_len] + [1] * 8


def _stop_string(arch, input_ids, attention_mask):
    """A short piece of text the model generates at new positions 3-4 (and the free-running ids)."""
    _, tok = _hf(arch)
    free = _reference(arch, input_ids, attention_mask, max_new_tokens=12, eos_token_id=None, forced_eos_token_id=None)
    start = input_ids.shape[1] if ARCHS[arch] == "text-generation" else 1
    text = tok.decode(free[0, start + 3:start + 5], skip_special_tokens=True)
    stop = text.strip()[:4] or text[:4]
    assert stop, "the tiny model generated no text to stop on"
    return stop, free


@pytest.mark.parametrize("batched", [False, True], ids=["batch1", "left-padded-batch2"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-gqa"])
def test_stop_strings_match_transformers(arch, batched):
    _, tok = _hf(arch)
    input_ids, attention_mask = _inputs(arch, batched)
    stop, free = _stop_string(arch, input_ids, attention_mask)
    kwargs = dict(max_new_tokens=12, stop_strings=[stop, "never-generated-zzz"])
    ref = _reference(arch, input_ids, attention_mask, tokenizer=tok, **kwargs)
    if not batched:
        assert ref.shape[1] < free.shape[1]
    _assert_same(_ours(arch, input_ids, attention_mask, **kwargs), ref)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_stop_strings_stop_seq2seq_at_the_completing_token(arch):
    # transformers 4.57 cannot take stop strings for encoder-decoder models (it passes `tokenizer` on to
    # forward()), so this checks the rule itself: the last token completes the first occurrence
    _, tok = _hf(arch)
    input_ids, attention_mask = _inputs(arch, batched=False)
    stop, free = _stop_string(arch, input_ids, attention_mask)
    ours = _ours(arch, input_ids, attention_mask, max_new_tokens=12, stop_strings=stop, eos_token_id=None,
                 forced_eos_token_id=None)
    assert ours.shape[1] < free.shape[1]
    np.testing.assert_array_equal(ours[0], free[0, :ours.shape[1]])
    assert stop in tok.decode(ours[0, 1:]) and stop not in tok.decode(ours[0, 1:-1])


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_sampling_with_top_k_1_equals_greedy(arch):
    input_ids, attention_mask = _inputs(arch, batched=True)
    gen = _generator(arch)
    greedy = gen.generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=10)
    sampled = gen.generate(input_ids.numpy(), attention_mask.numpy(), max_new_tokens=10, do_sample=True, top_k=1,
                           seed=123)
    np.testing.assert_array_equal(sampled, greedy)


@pytest.mark.parametrize("options", [dict(), dict(top_k=20, top_p=0.9, temperature=0.8), dict(num_beams=3)],
                         ids=["multinomial", "top_k-top_p-temperature", "beam-sample"])
@pytest.mark.parametrize("arch", ["llama", "bart", "llama-gqa"])
def test_sampling_same_seed_same_tokens(arch, options):
    input_ids, attention_mask = _inputs(arch, batched=True)
    gen = _generator(arch)
    run = functools.partial(gen.generate, input_ids.numpy(), attention_mask.numpy(), max_new_tokens=16, do_sample=True,
                            **options)
    first, again, other = run(seed=7), run(seed=7), run(seed=8)
    np.testing.assert_array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_empty_prompt_starts_from_bos_as_transformers():
    model, tok = _hf("gpt2")
    with torch.no_grad():
        ref = model.generate(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id).numpy()
    _assert_same(_generator("gpt2").generate(None, max_new_tokens=8), ref)


@pytest.mark.parametrize("kwargs, error", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(early_stopping="sometimes", num_beams=2), "early_stopping"),
    (dict(max_length=3), "max_length"),
    (dict(typical_p=0.5), "typical_p"),
], ids=["max_new_tokens-0", "max_new_tokens-neg", "top_p-0", "top_p-1.5", "temperature-0", "temperature-neg",
        "beams-lt-return", "greedy-return2", "early_stopping-bad", "max_length-le-prompt", "unsupported-typical_p"])
def test_bad_generation_options_raise_value_error(kwargs, error):
    input_ids, attention_mask = _inputs("gpt2", batched=False)
    with pytest.raises(ValueError, match=error):
        _generator("gpt2").generate(input_ids.numpy(), attention_mask.numpy(), **kwargs)


def test_bad_generate_inputs():
    gen = _generator("llama")
    with pytest.raises(TypeError, match="unexpected arguments: colour"):
        gen.generate(np.array([[1, 2]]), colour="red")
    with pytest.raises(TypeError, match="input_ids"):
        gen.generate(np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        gen.generate(np.array([[1, 2, 3]]), np.array([[1, 1]]))
    with pytest.raises(ValueError, match="context window of 256"):
        gen.generate(np.ones((1, 300), dtype=np.int64))
    with pytest.raises(ValueError, match="bos_token_id"):
        gen.generate(None, bos_token_id=None, max_new_tokens=3)


@pytest.mark.cuda
def test_cuda_io_binding_matches_cpu():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime build")
    for arch in ARCHS:
        gpu = Generator(ModelDir(tiny_export_of(arch), device="cuda"))
        if gpu.model.session("model" if ARCHS[arch] == "text-generation" else "decoder").device != "cuda":
            pytest.skip("CUDA provider could not be created on this machine")
        input_ids, attention_mask = _inputs(arch, batched=True)
        for kwargs in (dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3)):
            _assert_same(gpu.generate(input_ids.numpy(), attention_mask.numpy(), **kwargs),
                         _reference(arch, input_ids, attention_mask, **kwargs))


@pytest.mark.parametrize("case", ["greedy", "beam4", "beam3-return3"])
def test_shared_kv_buffer_grows_and_reorders_as_transformers(case, monkeypatch):
    """llama-gqa's cache lives in one buffer per tensor bound as past and present (kv_cache.shared_buffer): with
    1 position of headroom it is grown (doubled) and reordered by beams, and the tokens still
    equal transformers'."""
    from onnxpipe.generation import kv_cache

    assert _generator("llama-gqa").manifest["kv_cache"]["shared_buffer"]
    monkeypatch.setattr(kv_cache, "SHARED_HEADROOM", 1)
    grown = []
    ensure = kv_cache._SharedBuffers.ensure

    def spy(self, length):
        before = next(iter(self.buffers.values())).shape[2]
        ensure(self, length)
        grown.append(next(iter(self.buffers.values())).shape[2] > before)

    monkeypatch.setattr(kv_cache._SharedBuffers, "ensure", spy)
    input_ids, attention_mask = _inputs("llama-gqa", batched=True)
    ref = _reference("llama-gqa", input_ids, attention_mask, **CASES[case])
    _assert_same(_ours("llama-gqa", input_ids, attention_mask, **CASES[case]), ref)
    assert any(grown)
