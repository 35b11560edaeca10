"""pipeline("text-generation") returns what transformers' TextGenerationPipeline returns on the same checkpoint:
texts, return types, chats, defaults, streaming, and clear errors for bad input."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import onnxpipe  # noqa: E402
from onnxpipe.generation import TextStreamer  # noqa: E402

ARCHS = ["gpt2", "llama"]
OPTIONS = {
    "greedy": dict(do_sample=False, max_new_tokens=10),
    "new-text-only": dict(do_sample=False, max_new_tokens=8, return_full_text=False),
    "tensors": dict(do_sample=False, max_new_tokens=6, return_tensors=True),
    "beams-return2": dict(do_sample=False, max_new_tokens=8, num_beams=3, num_return_sequences=2),
    "penalties": dict(do_sample=False, max_new_tokens=10, repetition_penalty=1.4, no_repeat_ngram_size=2),
    # the pipeline's default max_new_tokens=256 would win over max_length: unset it
    "max_length": dict(do_sample=False, max_length=20, max_new_tokens=None),
    "keep-special-tokens": dict(do_sample=False, max_new_tokens=6, skip_special_tokens=False),
}
INPUTS = {"one-prompt": "the quick brown fox", "two-prompts": ["hello there", "once upon a time"],
          "empty-prompt": ""}


@functools.lru_cache(maxsize=None)
def _pipes(arch):
    from conftest import tiny_checkpoint, tiny_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.pipeline("text-generation", model=str(tiny_checkpoint(arch, "text-generation")))
    return ref, onnxpipe.pipeline("text-generation", model=tiny_export(arch, "text-generation"))


def _run_both(arch, inputs, **kwargs):
    ref, ours = _pipes(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ours(inputs, **kwargs), ref(inputs, **kwargs)


@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_matches_transformers(arch, options, inputs):
    ours, ref = _run_both(arch, INPUTS[inputs], **OPTIONS[options])
    assert ours == ref


def test_pipeline_defaults_follow_transformers():
    """max_new_tokens=256, do_sample=True, temperature=0.7 unless the model's generation config says otherwise."""
    for arch in ARCHS:
        ref, ours = _pipes(arch)
        for key in ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                    "eos_token_id", "pad_token_id", "bos_token_id", "repetition_penalty"):
            assert getattr(ours.generation_config, key) == getattr(ref.generation_config, key), key


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_pipeline_same_seed_same_text(arch):
    _, ours = _pipes(arch)
    first = ours("the quick brown fox", max_new_tokens=20, seed=11)
    assert first == ours("the quick brown fox", max_new_tokens=20, seed=11)
    assert first != ours("the quick brown fox", max_new_tokens=20, seed=12)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_method_matches_model_generate(arch):
    from conftest import tiny_checkpoint

    ref, ours = _pipes(arch)
    tok = ref.tokenizer
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(["hello there", "the quick brown fox jumps"], return_tensors="pt", padding=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch, "text-generation"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.generate(**enc, max_new_tokens=7, num_beams=2).numpy()
    np.testing.assert_array_equal(ours.generate(enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                                                max_new_tokens=7, num_beams=2), expected)


# --- streaming ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_stream_pieces_join_to_the_generated_text(arch):
    _, ours = _pipes(arch)
    pieces = list(ours.stream("the quick brown fox", do_sample=False, max_new_tokens=24))
    assert "".join(pieces) == ours("the quick brown fox", do_sample=False, max_new_tokens=24,
                                   return_full_text=False)[0]["generated_text"]


@pytest.mark.parametrize("arch", ARCHS)
def test_streamer_callback_gets_the_new_text(arch):
    _, ours = _pipes(arch)
    pieces = []
    out = ours("once upon a time", do_sample=False, max_new_tokens=16, streamer=pieces.append, return_full_text=False)
    assert "".join(pieces) == out[0]["generated_text"]


def test_streamer_never_yields_half_a_multibyte_character():
    """Byte-level BPE splits 'ï', '日' and '😀' over several tokens: pieces wait until a character is whole."""
    _, ours = _pipes("llama")
    text = "naïve café 日本語 😀 ok\nnext línea 🙂 end"
    ids = ours.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
    assert any("\ufffd" in ours.tokenizer.decode(ids[:i]) for i in range(1, len(ids)))  # the hazard is real
    pieces = []
    streamer = TextStreamer(ours.tokenizer, callback=pieces.append)
    for i in ids:
        streamer.put(np.array([i]))
    streamer.end()
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p.endswith("\n") for p in pieces)


def test_a_token_by_token_streamer_releases_each_word_at_once_and_the_same_text():
    """word_boundaries=False (the server's streams): a token's text as soon as it decodes whole, never half a
    character, trailing spaces held; the pieces join to the same text as the word-boundary streamer's."""
    _, ours = _pipes("llama")
    text = "Hello world, naïve café 日本語 😀 ok\nnext línea 🙂 end"
    ids = ours.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
    by_token, by_word, released = [], [], []
    token_stream = TextStreamer(ours.tokenizer, callback=by_token.append, word_boundaries=False)
    word_stream = TextStreamer(ours.tokenizer, callback=by_word.append)
    for i in ids:
        token_stream.put(np.array([i]))
        word_stream.put(np.array([i]))
        released.append(len("".join(by_token)) - len("".join(by_word)))
    token_stream.end()
    word_stream.end()
    assert "".join(by_token) == "".join(by_word) == text
    assert not any("\ufffd" in p for p in by_token)
    assert by_token[0] == ours.tokenizer.decode(ids[:1])  # the first token's text, before the next token came
    assert max(released) > 0 and min(released) >= -1  # often ahead, behind only by a held trailing space
    assert not any(p.endswith(" ") for p in by_token[:-1])


def test_breaking_out_of_a_stream_stops_the_generation():
    _, ours = _pipes("gpt2")
    stream = ours.stream("the quick brown fox", do_sample=False, max_new_tokens=200, min_new_tokens=200)
    next(stream)
    stream.close()  # what `break` in a for loop does
    assert len(ours.generator.step_input_lengths) < 200


def test_stream_errors_surface_in_the_caller():
    _, ours = _pipes("gpt2")
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(ours.stream("hello", max_new_tokens=0))
    with pytest.raises(ValueError, match="single"):
        list(ours.stream("hello", num_beams=2, do_sample=False, max_new_tokens=3))


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inputs, kwargs, error, match", [
    (42, {}, TypeError, "text_inputs must be a string"),
    (["ok", 3], {}, TypeError, r"text_inputs\[1\]"),
    ([], {}, ValueError, "empty list"),
    ([{"role": "user"}], {}, ValueError, "'role' and 'content'"),
    ("hello", dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("hello", dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    ("hello", dict(top_p=0.0), ValueError, "top_p"),
    ("hello", dict(top_p=1.01), ValueError, "top_p"),
    ("hello", dict(temperature=0.0, do_sample=True), ValueError, "temperature"),
    ("hello", dict(num_beams=2, num_return_sequences=4, do_sample=False), ValueError, "num_return_sequences"),
    ("hello", dict(max_new_token=5), TypeError, "max_new_token"),
    ("hello", dict(return_full_text=False, return_tensors=True), ValueError, "mutually exclusive"),
    ("word " * 300, dict(max_new_tokens=3), ValueError, "context window"),
    ("", dict(bos_token_id=None, max_new_tokens=3), ValueError, "bos_token_id"),
], ids=["int", "list-with-int", "empty-list", "message-without-content", "max_new_tokens-0", "max_new_tokens-neg",
        "top_p-0", "top_p-above-1", "temperature-0-sampling", "beams-lt-return", "misspelt-option",
        "full-text-and-tensors", "prompt-longer-than-window", "empty-prompt-without-bos"])
def test_bad_input_raises_clear_error(inputs, kwargs, error, match):
    _, ours = _pipes("llama")
    with pytest.raises(error, match=match):
        ours(inputs, **kwargs)


def test_handle_long_generation_hole_matches_transformers():
    prompt = "the quick brown fox jumps over the lazy dog " * 30  # longer than the 256 positions
    ours, ref = _run_both("gpt2", prompt, do_sample=False, max_new_tokens=10, handle_long_generation="hole")
    assert ours == ref


def test_empty_prompt_behaves_as_transformers_with_bos():
    ours, ref = _run_both("gpt2", "", do_sample=False, max_new_tokens=5)
    assert ours == ref and ours[0]["generated_text"]
