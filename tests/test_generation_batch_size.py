"""batch_size for text-generation and text2text pipelines: prompts padded together as transformers' pipelines pad
them (the tokenizer's side, its pad id), generated as one batch, and the texts equal transformers' with the same
batch_size, greedy and beam, per call and at construction."""
from __future__ import annotations

import functools
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import onnxpipe  # noqa: E402
from conftest import tiny_checkpoint, tiny_export  # noqa: E402

# name -> (arch, task, export options, padding side; None: the tokenizer's own)
MODELS = {
    "llama": ("llama", "text-generation", {}, None),                       # right padding, as its tokenizer says
    "llama-left": ("llama", "text-generation", {}, "left"),
    "llama-gqa-left": ("llama", "text-generation", dict(optimize=True, hidden_size=64, head_dim=16), "left"),
    "t5": ("t5", "text2text-generation", {}, None),
    "bart": ("bart", "text2text-generation", {}, None),
}
OPTIONS = {"greedy": dict(do_sample=False, max_new_tokens=6),
           "beams-return2": dict(do_sample=False, max_new_tokens=5, num_beams=3, num_return_sequences=2)}
TEXTS = ["hello there", "once upon a time in a land", "a", "the quick brown fox jumps over"]


@functools.lru_cache(maxsize=None)
def _pipes(name, construction_batch_size=None):
    arch, task, export_options, side = MODELS[name]
    overrides = {k: v for k, v in export_options.items() if k != "optimize"}
    kw = {} if construction_batch_size is None else {"batch_size": construction_batch_size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.pipeline(task, model=str(tiny_checkpoint(arch, task, **overrides)), **kw)
    ours = onnxpipe.pipeline(task, model=tiny_export(arch, task, **export_options), **kw)
    if side is not None:
        ref.tokenizer.padding_side = ours.tokenizer.padding_side = side
    return ref, ours


@pytest.mark.parametrize("batch_size", [2, 3])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_generation_equals_transformers(name, options, batch_size):
    ref, ours = _pipes(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(TEXTS, batch_size=batch_size, **OPTIONS[options])
    assert ours(TEXTS, batch_size=batch_size, **OPTIONS[options]) == expected


def test_batch_size_at_construction(tmp_path):
    ref, ours = _pipes("t5", construction_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours(TEXTS, max_new_tokens=4) == ref(TEXTS, max_new_tokens=4)


def test_batched_chats_equal_transformers():
    ref, ours = _pipes("llama-left")
    chats = [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "What is two plus two?"}]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(chats, batch_size=2, do_sample=False, max_new_tokens=5)
    assert ours(chats, batch_size=2, do_sample=False, max_new_tokens=5) == expected


def test_batched_sampling_with_a_seed_is_reproducible():
    _, ours = _pipes("llama-left")
    kw = dict(batch_size=2, do_sample=True, temperature=1.0, max_new_tokens=6, seed=3)
    assert ours(TEXTS, **kw) == ours(TEXTS, **kw)


def test_a_tokenizer_without_pad_cannot_batch_as_in_transformers():
    gpt2 = onnxpipe.pipeline("text-generation", model=tiny_export("gpt2", "text-generation"))
    assert gpt2.tokenizer.pad_token_id is None
    with pytest.raises(ValueError, match="without pad_token cannot do batching"):
        gpt2(TEXTS, batch_size=2, max_new_tokens=2)
    assert len(gpt2(TEXTS[:2], batch_size=1, do_sample=False, max_new_tokens=2)) == 2


def test_group_query_attention_refuses_right_padding_clearly():
    ours = onnxpipe.pipeline("text-generation", model=tiny_export("llama", "text-generation", optimize=True,
                                                                  hidden_size=64, head_dim=16))
    ours.tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        ours(TEXTS, batch_size=2, max_new_tokens=2)
