"""text-classification: onnxpipe against transformers' pipeline on the same tiny weights, option by option."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnxpipe
from conftest import ENCODER_ARCHS, assert_results_close

# The default init (std 0.02) gives logits near 0 and every score near 0.5; larger weights make the
# labels and scores differ from text to text, so a swapped label or score would show.
WEIGHTS = {"initializer_range": 0.2}
TEXTS = {
    "ascii": "I really enjoyed this movie, it was great!",
    "accents": "Café déjà vu: a naïve résumé from Zürich.",
    "cjk": "東京は日本の首都です。",
    "korean": "한국어 문장도 분류합니다",
    "emoji": "so good 🙂🎉👍 honestly",
    "whitespace": "   lots \t of   white\n\nspace   ",
    "empty": "",
}
LONG = "the movie was long and the story went on and on " * 60  # > 512 tokens for every tokenizer
OPTIONS = {
    "default": {},
    "top_k=None": {"top_k": None},
    "top_k=1": {"top_k": 1},
    "top_k=2": {"top_k": 2},
    "top_k=5": {"top_k": 5},
    "return_all_scores=True": {"return_all_scores": True},
    "return_all_scores=False": {"return_all_scores": False},
    "sigmoid": {"function_to_apply": "sigmoid"},
    "none": {"function_to_apply": "none", "top_k": None},
    "SOFTMAX": {"function_to_apply": "SOFTMAX", "top_k": None},
    "batch_size=3": {"batch_size": 3},
    "batch_size=2,top_k=None": {"batch_size": 2, "top_k": None},
    "max_length=4": {"truncation": True, "max_length": 4},
}


def _reference(ckpt, **kwargs):
    import transformers

    return transformers.pipeline("text-classification",
                                 model=transformers.AutoModelForSequenceClassification.from_pretrained(ckpt),
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(ckpt), **kwargs)


@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def pipes(request, tiny):
    """(onnxpipe pipeline, transformers pipeline) for one architecture."""
    arch = request.param
    ours = onnxpipe.pipeline("sentiment-analysis", model=tiny.export(arch, "text-classification", **WEIGHTS))
    return ours, _reference(tiny.checkpoint(arch, "text-classification", **WEIGHTS))


def _both(pipes, inputs, **kwargs):
    ours, ref = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # return_all_scores' deprecation warning, from both
        return ours(inputs, **kwargs), ref(inputs, **kwargs)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_single_text_matches_transformers(pipes, text):
    assert_results_close(*_both(pipes, text))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", ["str", "list"])
def test_options_match_transformers(pipes, options, kind):
    inputs = TEXTS["ascii"] if kind == "str" else list(TEXTS.values())
    assert_results_close(*_both(pipes, inputs, **options))


@pytest.mark.parametrize("inputs", [
    {"text": "the plot", "text_pair": "was predictable"},
    [{"text": "the plot", "text_pair": "was predictable"}, {"text": "東京", "text_pair": "🙂"}, {"text": "alone"}],
    [[["the plot", "was predictable"]]],
], ids=["dict", "list-of-dicts", "legacy-nested-list"])
@pytest.mark.parametrize("options", [{}, {"top_k": None}], ids=["default", "top_k=None"])
def test_text_pairs_match_transformers(pipes, inputs, options):
    assert_results_close(*_both(pipes, inputs, **options))


def test_long_text_is_truncated_like_transformers_with_truncation(pipes):
    ours, ref = pipes
    assert_results_close(ours([LONG, "short"], top_k=None), ref([LONG, "short"], top_k=None, truncation=True))
    pair = {"text": LONG, "text_pair": LONG[:300]}
    assert_results_close(ours(pair), ref(pair, truncation=True))


def test_long_text_with_truncation_false_names_the_fix(pipes):
    with pytest.raises(ValueError, match="truncation=True"):
        pipes[0](LONG, truncation=False)


@pytest.mark.parametrize("init", [{"top_k": None}, {"top_k": 2, "function_to_apply": "sigmoid"},
                                  {"return_all_scores": True}], ids=["top_k=None", "top_k=2,sigmoid", "return_all_scores"])
def test_options_given_at_construction_match_transformers(tiny, init):
    # transformers wraps a str's result in a list when top_k is not given to the call: [[...]] here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification", **WEIGHTS), **init)
        ref = _reference(tiny.checkpoint("bert", "text-classification", **WEIGHTS), **init)
        for inputs in (TEXTS["ascii"], [TEXTS["ascii"], TEXTS["cjk"]]):
            assert_results_close(ours(inputs), ref(inputs))
            assert_results_close(ours(inputs, top_k=1), ref(inputs, top_k=1))


@pytest.mark.parametrize("config", [
    {"problem_type": "multi_label_classification"},
    {"num_labels": 1},
    {"num_labels": 1, "problem_type": "regression"},
    {"num_labels": 3, "problem_type": "single_label_classification"},
], ids=["multi-label->sigmoid", "one-label->sigmoid", "regression->none", "single-label->softmax"])
def test_default_function_follows_the_manifest_like_transformers(tiny, config):
    ours = onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification", **WEIGHTS, **config))
    ref = _reference(tiny.checkpoint("bert", "text-classification", **WEIGHTS, **config))
    texts = [TEXTS["ascii"], TEXTS["korean"]]
    for options in ({}, {"top_k": None}):
        assert_results_close(ours(texts, **options), ref(texts, **options))


@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_int8_gives_well_formed_results(tiny, arch):
    clf = onnxpipe.pipeline("text-classification", model=tiny.export(arch, "text-classification", **WEIGHTS),
                            precision="int8")
    results = clf(list(TEXTS.values()) + [LONG], top_k=None)
    assert len(results) == len(TEXTS) + 1
    for per_text in results:
        assert sorted(r["label"] for r in per_text) == ["NEGATIVE", "POSITIVE"]
        scores = [r["score"] for r in per_text]
        assert scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1.0) < 1e-5 and all(0.0 <= s <= 1.0 for s in scores)


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clf(tiny):
    return onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification"))


@pytest.mark.parametrize("inputs, error, match", [
    (3, TypeError, "got int"),
    (None, TypeError, "got NoneType"),
    (["fine", 7], TypeError, "got int"),
    ([], ValueError, "empty list"),
    ({"txt": "typo"}, ValueError, "'text'"),
    ({"text": 5}, TypeError, r"inputs\['text'\]"),
    ({"text": "a", "text_pair": 5}, TypeError, r"inputs\['text_pair'\]"),
    (["a", ["b", "c"]], ValueError, "text pairs"),
], ids=["int", "None", "list-with-int", "empty-list", "dict-without-text", "dict-text-int", "dict-pair-int",
        "pair-as-list"])
def test_bad_inputs_raise_clear_errors(clf, inputs, error, match):
    with pytest.raises(error, match=match):
        clf(inputs)


@pytest.mark.parametrize("options, error, match", [
    ({"topk": 2}, TypeError, "topk"),
    ({"top_k": "2"}, TypeError, "top_k"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"function_to_apply": "relu"}, ValueError, "function_to_apply"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"truncation": "sideways"}, ValueError, "truncation"),
], ids=["unknown-kwarg", "top_k-str", "top_k-zero", "unknown-function", "batch_size-zero", "bad-truncation"])
def test_bad_options_raise_clear_errors(clf, options, error, match):
    with pytest.raises(error, match=match):
        clf("fine", **options)


def test_unknown_construction_kwargs_are_named(tiny):
    with pytest.raises(TypeError, match="retrun_all_scores"):
        onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification"),
                          retrun_all_scores=True)


def test_model_exported_for_another_task_is_refused(tiny):
    with pytest.raises(ValueError, match="exported for 'fill-mask'"):
        onnxpipe.pipeline("sentiment-analysis", model=tiny.export("bert", "fill-mask"))


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnxpipe.pipeline("text-classification", model=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="onnxpipe.json"):
        onnxpipe.pipeline("text-classification", model=tmp_path)


def test_postprocess_is_pure_on_hand_made_logits(clf):
    logits = np.array([[2.0, -1.0]], dtype=np.float32)
    best = clf.postprocess({"logits": logits})
    assert best["label"] == "NEGATIVE" and best["score"] == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-6)
    raw = clf.postprocess({"logits": logits}, function_to_apply="none", top_k=None, _legacy=False)
    assert raw == [{"label": "NEGATIVE", "score": 2.0}, {"label": "POSITIVE", "score": -1.0}]
