"""token-classification (ner): onnxpipe against transformers' pipeline on the same tiny weights, option by option."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnxpipe
from conftest import ENCODER_ARCHS, assert_results_close, reference_pipeline
from onnxpipe.export.tiny import NER_LABELS

# The default init (std 0.02) gives every token nearly the same label scores; larger weights make
# labels differ from token to token, so a wrong label, group or span shows.
WEIGHTS = {"initializer_range": 0.2}
TEXTS = {
    "ascii": "My name is Wolfgang and I live in Berlin with Sarah from Microsoft.",
    "accents": "Élodie Dupré habite à Montréal, près de l'Université Laval; ça va très bien.",
    "cjk": "東京は日本の首都です。北京大学",
    "korean": "서울은 한국의 수도입니다. 김민수 씨",
    "emoji": "Wolfgang 🙂 loves 🍕 in Berlin 🇩🇪 #NYC @sarah",
    "whitespace": "   Wolfgang \t lives   in\n\n Berlin   ",
    "empty": "",
}
# More than 512 tokens for every tokenizer: cut at the model's limit, or windows with stride.
LONG = " ".join(f"Wolfgang met Sarah in Berlin on day {i} near the Microsoft office." for i in range(70))
STRATEGIES = ("none", "simple", "first", "average", "max")
ATOL = 1e-5


@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def pipes(request, tiny):
    """(onnxpipe pipeline, transformers pipeline) for one architecture."""
    arch = request.param
    ours = onnxpipe.pipeline("ner", model=tiny.export(arch, "token-classification", **WEIGHTS))
    return ours, reference_pipeline("token-classification", tiny.checkpoint(arch, "token-classification", **WEIGHTS))


def _both(pipes, inputs, **kwargs):
    ours, ref = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the word-heuristic and deprecation warnings, from both
        return ours(inputs, **kwargs), _python_scores(ref(inputs, **kwargs))


def _python_scores(result):
    """transformers gives numpy float32 scores; onnxpipe gives python floats of the same value."""
    if isinstance(result, list):
        return [_python_scores(r) for r in result]
    return {**result, "score": float(result["score"])}


def assert_well_formed(entities, text, grouped: bool):
    keys = {"entity_group", "score", "word", "start", "end"} if grouped else \
        {"entity", "score", "index", "word", "start", "end"}
    labels = {label.split("-", 1)[-1] for label in NER_LABELS} if grouped else set(NER_LABELS)
    for e in entities:
        assert set(e) == keys
        assert e["entity_group" if grouped else "entity"] in labels
        assert isinstance(e["score"], float) and 0.0 < e["score"] <= 1.0
        # a lone byte-level space token has an empty span once offsets are trimmed
        assert 0 <= e["start"] <= e["end"] <= len(text) and isinstance(e["start"], int)
    starts = [e["start"] for e in entities]
    assert starts == sorted(starts)


# --- against transformers -----------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_match_transformers(pipes, strategy, text):
    ours, ref = _both(pipes, text, aggregation_strategy=strategy)
    assert_results_close(ours, ref, ATOL)
    assert_well_formed(ours, text, grouped=strategy != "none")



def test_inputs_have_no_near_tie_between_labels(pipes):
    # The comparisons above are exact on labels: they rely on no token of these inputs having two
    # labels within fp32 noise (~1e-7 between ONNX Runtime and torch). Should new weights or texts
    # bring such a tie, this says so instead of a label mismatch somewhere above.
    from onnxpipe.tasks._common import softmax

    ours = pipes[0]
    for text in list(TEXTS.values()) + [LONG]:
        for chunk in ours.preprocess(text, stride=16):
            scores = np.sort(softmax(ours._forward(chunk)["logits"][0]), axis=-1)
            margins = (scores[:, -1] - scores[:, -2])[chunk["special_tokens_mask"][0] == 0]
            assert margins.size == 0 or margins.min() > 1e-6, f"near-tie between labels in {text[:30]!r}"

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_long_text_is_cut_at_the_model_limit_like_transformers(pipes, strategy):
    ours, ref = _both(pipes, LONG, aggregation_strategy=strategy)
    assert_results_close(ours, ref, ATOL)
    assert ours and ours[-1]["end"] < len(LONG) // 2  # only the first 512 tokens are tagged


@pytest.mark.parametrize("stride", [0, 16, 128, 400])
@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_long_text_with_stride_matches_transformers(pipes, strategy, stride):
    ours, ref = _both(pipes, LONG, aggregation_strategy=strategy, stride=stride, ignore_labels=[])
    assert_results_close(ours, ref, ATOL)
    assert ours[-1]["end"] > len(LONG) - 20  # the whole text is tagged


def test_stride_without_an_aggregation_strategy_runs_like_transformers(pipes):
    # transformers refuses stride only with aggregation_strategy="none" passed in the same call.
    ours, ref = _both(pipes, LONG, stride=64, ignore_labels=[])
    assert_results_close(ours, ref, ATOL)


@pytest.mark.parametrize("ignore_labels", [[], ["O", "B-PER", "I-LOC"], ["PER", "MISC"]],
                         ids=["keep-all", "drop-some-tags", "drop-some-groups"])
@pytest.mark.parametrize("strategy", ["none", "simple", "average"])
def test_ignore_labels_match_transformers(pipes, strategy, ignore_labels):
    ours, ref = _both(pipes, TEXTS["ascii"], aggregation_strategy=strategy, ignore_labels=ignore_labels)
    assert_results_close(ours, ref, ATOL)
    if not ignore_labels and strategy == "none":
        assert len(ours) >= len(TEXTS["ascii"].split())  # every token is reported


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("strategy", ["none", "max"])
def test_lists_and_batch_size_match_transformers(pipes, strategy, batch_size):
    texts = list(TEXTS.values()) + [LONG]
    options = {"aggregation_strategy": strategy, "batch_size": batch_size}
    if strategy != "none":
        options["stride"] = 32
    ours, ref = _both(pipes, texts, **options)
    assert_results_close(ours, ref, ATOL)


@pytest.mark.parametrize("strategy", ["none", "first"])
def test_pre_split_words_match_transformers(pipes, strategy):
    ours_pipe, ref_pipe = pipes
    words = ["Wolfgang", "lives", "in", "Berlin", "🙂", "Montréal"]
    if getattr(ours_pipe.tokenizer.backend.pre_tokenizer, "add_prefix_space", None) is False:
        # byte-level BPE saved without add_prefix_space: both refuse word lists
        with pytest.raises(ValueError, match="add_prefix_space"):
            ours_pipe(words, is_split_into_words=True)
        with pytest.raises(AssertionError, match="add_prefix_space"):
            ref_pipe(words, is_split_into_words=True)
        return
    for inputs in (words, [words, ["Sarah", "from", "Microsoft"]]):
        ours, ref = _both(pipes, inputs, is_split_into_words=True, aggregation_strategy=strategy)
        assert_results_close(ours, ref, ATOL)
    ours, ref = _both(pipes, words, is_split_into_words=True, delimiter="  ")
    assert_results_close(ours, ref, ATOL)


@pytest.mark.parametrize("legacy, strategy", [
    ({"grouped_entities": True}, "simple"),
    ({"grouped_entities": True, "ignore_subwords": True}, "first"),
    ({"grouped_entities": False}, "none"),
], ids=["grouped", "grouped+ignore_subwords", "not-grouped"])
def test_deprecated_grouping_flags_map_to_strategies(pipes, legacy, strategy):
    ours_pipe = pipes[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy_result = ours_pipe(TEXTS["ascii"], **legacy)
    assert any(issubclass(w.category, UserWarning) and "deprecated" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roberta's word-heuristic warning under 'first'
        assert legacy_result == ours_pipe(TEXTS["ascii"], aggregation_strategy=strategy)
    ours, ref = _both(pipes, TEXTS["ascii"], **legacy)
    assert_results_close(ours, ref, ATOL)


def test_options_given_at_construction_match_transformers(tiny):
    init = {"aggregation_strategy": "average", "ignore_labels": []}
    ours = onnxpipe.pipeline("ner", model=tiny.export("roberta", "token-classification", **WEIGHTS), **init)
    ref = reference_pipeline("token-classification", tiny.checkpoint("roberta", "token-classification", **WEIGHTS),
                             **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_results_close(ours(TEXTS["accents"]), _python_scores(ref(TEXTS["accents"])), ATOL)
        assert_results_close(ours(TEXTS["accents"], aggregation_strategy="simple"),
                             _python_scores(ref(TEXTS["accents"], aggregation_strategy="simple")), ATOL)


@pytest.mark.parametrize("strategy", ["first", "average", "max"])
def test_word_strategies_warn_like_transformers_without_word_aware_tokenizer(pipes, strategy):
    ours, ref = pipes
    word_aware = bool(getattr(ours.tokenizer.backend.model, "continuing_subword_prefix", None))
    with warnings.catch_warnings(record=True) as ours_warnings:
        warnings.simplefilter("always")
        ours(TEXTS["ascii"], aggregation_strategy=strategy)
    with warnings.catch_warnings(record=True) as ref_warnings:
        warnings.simplefilter("always")
        ref(TEXTS["ascii"], aggregation_strategy=strategy)

    def heuristic(ws):
        return any("does not support real words" in str(w.message) for w in ws)

    assert heuristic(ours_warnings) == heuristic(ref_warnings) == (not word_aware)


def test_int8_gives_well_formed_entities(tiny):
    ner = onnxpipe.pipeline("ner", model=tiny.export("bert", "token-classification", **WEIGHTS), precision="int8")
    texts = list(TEXTS.values()) + [LONG]
    for strategy in STRATEGIES:
        options = {"aggregation_strategy": strategy, "ignore_labels": []}
        if strategy != "none":
            options["stride"] = 64
        results = ner(texts, **options)
        assert len(results) == len(texts)
        for entities, text in zip(results, texts):
            assert_well_formed(entities, text, grouped=strategy != "none")
            assert bool(entities) == bool(text.strip())


def test_postprocess_is_pure_on_hand_made_logits(tiny):
    ner = onnxpipe.pipeline("ner", model=tiny.export("bert", "token-classification", **WEIGHTS))
    text = "Wolfgang lives in Berlin"
    chunk = ner.preprocess(text)[0]
    enc = ner.tokenizer.encode_batch([text])[0]
    # Each word's first token gets its tag; the sub-word tokens of 'Berlin' disagree (I-ORG), which
    # 'simple' keeps as a separate group and the word strategies overrule.
    first_label = {0: "B-PER", 1: "O", 2: "O", 3: "B-LOC"}
    rest_label = {0: "I-PER", 1: "O", 2: "O", 3: "I-ORG"}
    logits = np.full((1, len(enc.ids), len(NER_LABELS)), -5.0, dtype=np.float32)
    previous = None
    for i, word in enumerate(enc.word_ids):
        if word is not None:
            label = first_label[word] if word != previous else rest_label[word]
            logits[0, i, NER_LABELS.index(label)] = 5.0
        previous = word
    chunk = {**chunk, "logits": logits}
    assert len({w for w in enc.word_ids if w == 3}) == 1 and enc.word_ids.count(3) > 1  # 'Berlin' is split

    tokens = ner.postprocess([chunk])
    assert {e["entity"] for e in tokens} == {"B-PER", "I-PER", "B-LOC", "I-ORG"}
    assert all(0 <= e["start"] < e["end"] <= 8 or 18 <= e["start"] < e["end"] <= 24 for e in tokens)  # no 'O' words
    berlin = [enc.offsets[i] for i, w in enumerate(enc.word_ids) if w == 3]
    simple = ner.postprocess([chunk], aggregation_strategy="simple")
    assert [(g["entity_group"], g["start"], g["end"]) for g in simple] == \
        [("PER", 0, 8), ("LOC", *berlin[0]), ("ORG", berlin[1][0], berlin[-1][1])]
    for strategy in ("first", "average", "max"):
        words = ner.postprocess([chunk], aggregation_strategy=strategy)
        found = [(g["entity_group"], g["word"], text[g["start"]:g["end"]]) for g in words]
        # first: the first token's B-LOC; max: every token is equally sure, the first wins;
        # average: the I-ORG tokens outnumber it.
        expected_berlin = "ORG" if strategy == "average" else "LOC"
        assert found == [("PER", "wolfgang", "Wolfgang"), (expected_berlin, "berlin", "Berlin")], strategy


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ner(tiny):
    return onnxpipe.pipeline("ner", model=tiny.export("bert", "token-classification", **WEIGHTS))


@pytest.mark.parametrize("inputs, error, match", [
    (3, TypeError, "got int"),
    (None, TypeError, "got NoneType"),
    (["fine", 7], TypeError, r"inputs\[1\]"),
    ([], ValueError, "empty list"),
    ([["pre", "split"]], TypeError, "is_split_into_words"),
], ids=["int", "None", "list-with-int", "empty-list", "word-list-without-flag"])
def test_bad_inputs_raise_clear_errors(ner, inputs, error, match):
    with pytest.raises(error, match=match):
        ner(inputs)


@pytest.mark.parametrize("options, error, match", [
    ({"aggregation_strategy": "longest"}, ValueError, "aggregation_strategy='longest'"),
    ({"aggregation_strategy": 1}, ValueError, "aggregation_strategy"),
    ({"aggregation_strategy": "none", "stride": 16}, ValueError, "stride"),
    ({"aggregation_strategy": "simple", "stride": 512}, ValueError, "stride"),
    ({"aggregation_strategy": "simple", "stride": 510}, ValueError, "stride"),
    ({"aggregation_strategy": "simple", "stride": -1}, ValueError, "stride"),
    ({"ignore_labels": "O"}, TypeError, "ignore_labels"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"is_split_into_words": "yes"}, TypeError, "is_split_into_words"),
    ({"agregation_strategy": "simple"}, TypeError, "agregation_strategy"),
], ids=["unknown-strategy", "strategy-not-str", "stride-with-none", "stride-at-max-length",
        "stride-over-window-room", "stride-negative", "ignore_labels-str", "batch_size-zero", "split-flag-str",
        "misspelled-option"])
def test_bad_options_raise_clear_errors(ner, options, error, match):
    with pytest.raises(error, match=match):
        ner(LONG, **options)


def test_word_lists_need_the_flag_and_lists_of_words(ner):
    with pytest.raises(TypeError, match="is_split_into_words=True"):
        ner("not a list", is_split_into_words=True)
    with pytest.raises(TypeError, match=r"inputs\[1\]"):
        ner([["ok"], []], is_split_into_words=True)


def test_strategies_transformers_rejects_are_rejected_too(pipes):
    ours, ref = pipes
    for options in ({"aggregation_strategy": "longest"}, {"aggregation_strategy": "none", "stride": 16},
                    {"aggregation_strategy": "simple", "stride": 512}):
        with pytest.raises(ValueError):
            ours(TEXTS["ascii"], **options)
        with pytest.raises((ValueError, KeyError)):
            ref(TEXTS["ascii"], **options)


def test_model_exported_for_another_task_is_refused(tiny):
    with pytest.raises(ValueError, match="exported for 'question-answering'"):
        onnxpipe.pipeline("ner", model=tiny.export("bert", "question-answering"))
