"""fill-mask: onnxpipe against transformers' pipeline on the same tiny masked-LM weights, option by option."""
from __future__ import annotations

import re

import pytest

import onnxpipe
from conftest import ENCODER_ARCHS, assert_results_close

WEIGHTS = {"initializer_range": 0.2}  # spread-out predictions, so a wrong token or order shows
TEXTS = {  # {mask} becomes the model's own mask token
    "ascii": "The capital of France is {mask}.",
    "accents": "Le café est {mask} à Zürich, déjà.",
    "cjk": "東京は{mask}の首都です。",
    "korean": "한국어 {mask} 문장입니다",
    "emoji": "so {mask} 🙂🎉 today",
    "whitespace": "   lots  {mask}\t of   white\n\n space  ",
    "two-masks": "{mask} is the {mask} of it.",
    "mask-only": "{mask}",
}
LONG = "{mask} was the word, and the story went on and on. " * 80  # > 512 tokens
OPTIONS = {
    "default": {},
    "top_k=1": {"top_k": 1},
    "top_k=3": {"top_k": 3},
    "top_k=12": {"top_k": 12},
    "targets-in-vocab": {"targets": ["the", "is", "of"]},
    "targets-missing": {"targets": ["zzzqqq", "Café", "東京"], "top_k": 2},
    "targets-str": {"targets": "the"},
    "targets-fewer-than-top_k": {"targets": ["the", "is"], "top_k": 10},
    "batch_size=3": {"batch_size": 3},
    "batch_size=2,top_k=2": {"batch_size": 2, "top_k": 2},
}


def _reference(ckpt):
    import transformers

    return transformers.pipeline("fill-mask", model=transformers.AutoModelForMaskedLM.from_pretrained(ckpt),
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(ckpt))


@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def pipes(request, tiny):
    arch = request.param
    ours = onnxpipe.pipeline("fill-mask", model=tiny.export(arch, "fill-mask", **WEIGHTS))
    return ours, _reference(tiny.checkpoint(arch, "fill-mask", **WEIGHTS))


def _masked(pipe, text: str) -> str:
    return text.format(mask=pipe.tokenizer.mask_token)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_single_text_matches_transformers(pipes, text):
    ours, ref = pipes
    assert_results_close(ours(_masked(ours, text)), ref(_masked(ours, text)))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", ["str", "list", "list-of-one"])
def test_options_match_transformers(pipes, options, kind):
    ours, ref = pipes
    texts = [_masked(ours, t) for t in TEXTS.values()]
    inputs = {"str": texts[0], "list": texts, "list-of-one": texts[:1]}[kind]
    assert_results_close(ours(inputs, **options), ref(inputs, **options))


def test_long_text_is_truncated_like_transformers_with_truncation(pipes):
    ours, ref = pipes
    inputs = [_masked(ours, LONG), _masked(ours, TEXTS["ascii"])]
    assert_results_close(ours(inputs), ref(inputs, tokenizer_kwargs={"truncation": True}))


def test_tokenizer_kwargs_match_transformers(pipes):
    ours, ref = pipes
    text = _masked(ours, "{mask} starts this sentence, which then goes on for a while.")
    kwargs = {"tokenizer_kwargs": {"truncation": True, "max_length": 6}}
    assert_results_close(ours(text, **kwargs), ref(text, **kwargs))


@pytest.mark.parametrize("text", ["no mask here", ""], ids=["no-mask", "empty"])
def test_text_without_mask_fails_like_transformers(pipes, text):
    ours, ref = pipes
    with pytest.raises(Exception, match="No mask_token"):
        ref(text)
    with pytest.raises(ValueError, match=re.escape(f"No mask_token ({ours.tokenizer.mask_token}) found on the input")):
        ours(text)


def test_targets_that_tokenize_to_nothing_fail_like_transformers(pipes):
    ours, ref = pipes
    text = _masked(ours, TEXTS["ascii"])
    with pytest.raises(ValueError, match="At least one target"):
        ref(text, targets=[""])
    with pytest.raises(ValueError, match="At least one target"):
        ours(text, targets=[""])


@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_int8_gives_well_formed_results(tiny, arch):
    fill = onnxpipe.pipeline("fill-mask", model=tiny.export(arch, "fill-mask", **WEIGHTS), precision="int8")
    results = fill(_masked(fill, TEXTS["ascii"]), top_k=4)
    assert len(results) == 4
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and 0.0 < sum(scores) <= 1.0
    for r in results:
        assert r["token_str"] == fill.tokenizer.decode([r["token"]])
        assert fill.tokenizer.mask_token not in r["sequence"]


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fill(tiny):
    return onnxpipe.pipeline("fill-mask", model=tiny.export("bert", "fill-mask"))


@pytest.mark.parametrize("inputs, error, match", [
    (3, TypeError, "got int"),
    (None, TypeError, "got NoneType"),
    (["a [MASK]", None], TypeError, r"inputs\[1\]"),
    ([], ValueError, "empty list"),
    ({"text": "a [MASK]"}, TypeError, "got dict"),
], ids=["int", "None", "list-with-None", "empty-list", "dict"])
def test_bad_inputs_raise_clear_errors(fill, inputs, error, match):
    with pytest.raises(error, match=match):
        fill(inputs)


@pytest.mark.parametrize("options, error, match", [
    ({"topk": 2}, TypeError, "topk"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"targets": 5}, TypeError, "targets"),
    ({"tokenizer_kwargs": {"truncate": True}}, TypeError, "truncate"),
    ({"tokenizer_kwargs": "truncation"}, TypeError, "tokenizer_kwargs"),
], ids=["unknown-kwarg", "top_k-zero", "targets-int", "unknown-tokenizer-kwarg", "tokenizer_kwargs-str"])
def test_bad_options_raise_clear_errors(fill, options, error, match):
    with pytest.raises(error, match=match):
        fill("a [MASK] b", **options)


def test_model_exported_for_another_task_is_refused(tiny):
    with pytest.raises(ValueError, match="exported for 'text-classification'"):
        onnxpipe.pipeline("fill-mask", model=tiny.export("bert", "text-classification"))
