"""question-answering: onnxpipe against transformers' pipeline on the same tiny weights, option by option."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnxpipe
from conftest import ENCODER_ARCHS, reference_pipeline
from onnxpipe.tasks.question_answering import decode_spans, select_starts_ends

# The default init (std 0.02) gives near-uniform start/end logits, so hundreds of spans score
# about the same; larger weights spread them, so a wrong span or window shows.
WEIGHTS = {"initializer_range": 0.2}
QUESTION = "Where does Wolfgang live?"
CONTEXTS = {
    "ascii": "My name is Wolfgang and I live in Berlin. I work at the museum near the river.",
    "accents": "Élodie habite à Montréal depuis 2019; elle étudie à l'Université de Québec, près du café.",
    "cjk-korean": "東京は日本の首都です。 서울은 한국의 수도입니다. Wolfgang lives in 北京.",
    "emoji": "Wolfgang 🙂 lives in Berlin 🇩🇪 and loves 🍕 pizza 🎉 very much.",
    "whitespace": "   Wolfgang \t lives   in\n\n Berlin   with  his   cat.   ",
    "no-answer-in-it": "The weather was cold and the trains were late all week.",
}
# More than 512 tokens for every tokenizer: several windows even at the default max_seq_len.
LONG = " ".join(f"Sentence {i} says that the river runs through town number {i}." for i in range(80)) + \
    " Wolfgang lives in Berlin."
OPTIONS = {
    "default": {},
    "top_k=3": {"top_k": 3},
    "top_k=20": {"top_k": 20},
    "max_answer_len=2": {"max_answer_len": 2, "top_k": 3},
    "handle_impossible_answer": {"handle_impossible_answer": True, "top_k": 3},
    "align_to_words=False": {"align_to_words": False, "top_k": 3},
    "max_seq_len=32,doc_stride=4": {"max_seq_len": 32, "doc_stride": 4, "top_k": 3},
    "padding=max_length": {"padding": "max_length", "max_seq_len": 48, "doc_stride": 10},
}
LONG_OPTIONS = {
    "default": {},
    "top_k=5": {"top_k": 5},
    "doc_stride=32": {"doc_stride": 32, "top_k": 3},
    "max_seq_len=64,doc_stride=16": {"max_seq_len": 64, "doc_stride": 16, "top_k": 3},
    "max_seq_len=512": {"max_seq_len": 512, "doc_stride": 100},
    "handle_impossible_answer": {"handle_impossible_answer": True},
    "batch_size=4": {"batch_size": 4, "max_seq_len": 64, "doc_stride": 16, "top_k": 3},
}
REL = 1e-4  # scores are products of two probabilities (often ~1e-3): compare relatively
TIE = 1e-5  # spans whose scores differ less than this (relatively) may come out in either order


@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def pipes(request, tiny):
    """(onnxpipe pipeline, transformers pipeline) for one architecture."""
    arch = request.param
    ours = onnxpipe.pipeline("question-answering", model=tiny.export(arch, "question-answering", **WEIGHTS))
    return ours, reference_pipeline("question-answering", tiny.checkpoint(arch, "question-answering", **WEIGHTS))


def _both(pipes, *args, **kwargs):
    ours, ref = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' FutureWarning on positional inputs
        return ours(*args, **kwargs), ref(*args, **kwargs)


def assert_answers_match(ours, ref, where="result"):
    """Same shape (dict or list), same spans in the same order, scores within REL.

    Spans whose transformers scores tie within TIE may be ordered either way, and where such a
    tie straddles the top_k cut, either may be the one kept; everything else must be equal.
    """
    if isinstance(ref, dict):
        assert isinstance(ours, dict), f"{where}: expected a dict, got {ours!r}"
        ours, ref = [ours], [ref]
    assert isinstance(ours, list) and len(ours) == len(ref), f"{where}: {ours!r} != {ref!r}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert set(a) == {"score", "start", "end", "answer"} and set(a) == set(b), f"{where}[{i}]: keys of {a!r}"
        assert isinstance(a["score"], float) and isinstance(a["start"], int) and isinstance(a["end"], int)
        assert abs(a["score"] - b["score"]) <= REL * abs(b["score"]) + 1e-12, f"{where}[{i}]: {a!r} != {b!r}"
        if (a["start"], a["end"], a["answer"]) != (b["start"], b["end"], b["answer"]):
            tied = [(r["start"], r["end"], r["answer"]) for r in ref
                    if abs(r["score"] - b["score"]) <= TIE * abs(b["score"])]
            cut = abs(ref[-1]["score"] - b["score"]) <= TIE * abs(b["score"])
            assert (a["start"], a["end"], a["answer"]) in tied or cut, f"{where}[{i}]: {a!r} != {b!r}"


def assert_well_formed(result, context):
    for answer in result if isinstance(result, list) else [result]:
        assert set(answer) == {"score", "start", "end", "answer"}
        assert isinstance(answer["score"], float) and answer["score"] >= 0.0
        assert 0 <= answer["start"] <= answer["end"] <= len(context)
        assert answer["answer"] == context[answer["start"]:answer["end"]]


# --- against transformers -----------------------------------------------------------------------

@pytest.mark.parametrize("context", CONTEXTS.values(), ids=CONTEXTS.keys())
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_answers_match_transformers(pipes, context, options):
    ours, ref = _both(pipes, question=QUESTION, context=context, **options)
    assert_answers_match(ours, ref)
    assert_well_formed(ours, context)


@pytest.mark.parametrize("options", LONG_OPTIONS.values(), ids=LONG_OPTIONS.keys())
def test_long_context_windows_match_transformers(pipes, options):
    ours, ref = _both(pipes, question=QUESTION, context=LONG, **options)
    assert_answers_match(ours, ref)
    assert_well_formed(ours, LONG)


def test_long_context_is_split_into_overlapping_windows(pipes):
    qa = pipes[0]
    windows = qa.preprocess((QUESTION, LONG), max_seq_len=64, doc_stride=16)
    assert len(windows) > 10
    for window in windows:
        assert window["input_ids"].shape[1] <= 64
    # consecutive windows share doc_stride context tokens
    first, second = (w["encoding"] for w in windows[:2])
    context_of = [[o for o, s in zip(e.offsets, e.sequence_ids) if s == 1] for e in (first, second)]
    assert context_of[0][-16:] == context_of[1][:16]


@pytest.mark.parametrize("form", ["kwargs", "dict", "positional", "list-of-dicts", "question-list", "both-lists",
                                  "one-item-lists"])
def test_input_forms_match_transformers(pipes, form):
    c1, c2 = CONTEXTS["ascii"], CONTEXTS["emoji"]
    q2 = "What does he love?"
    calls = {
        "kwargs": ((), {"question": QUESTION, "context": c1}),
        "dict": (({"question": QUESTION, "context": c1},), {}),
        "positional": ((QUESTION, c1), {}),
        "list-of-dicts": (([{"question": QUESTION, "context": c1}, {"question": q2, "context": c2}],), {}),
        "question-list": ((), {"question": [QUESTION, q2], "context": c1}),
        "both-lists": ((), {"question": [QUESTION, q2], "context": [c1, c2]}),
        # transformers answers a single example with a dict, even when it came in a list
        "one-item-lists": ((), {"question": [QUESTION], "context": [c1]}),
    }
    args, kwargs = calls[form]
    ours, ref = _both(pipes, *args, **kwargs, top_k=2)
    if isinstance(ref, list) and ref and isinstance(ref[0], list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_answers_match(a, b, f"result[{i}]")
    else:
        assert_answers_match(ours, ref)


def test_batch_size_gives_the_same_answers(pipes):
    qa = pipes[0]
    questions = [QUESTION, "What is it?", "Who?"]
    contexts = [LONG, CONTEXTS["accents"], CONTEXTS["cjk-korean"]]
    one = qa(question=questions, context=contexts, max_seq_len=64, doc_stride=16, top_k=2)
    batched = qa(question=questions, context=contexts, max_seq_len=64, doc_stride=16, top_k=2, batch_size=5)
    for i, (a, b) in enumerate(zip(batched, one)):
        assert_answers_match(a, b, f"result[{i}]")


def test_context_without_the_answer_gives_a_well_formed_span(pipes):
    ours, ref = _both(pipes, question="What is the capital of Peru?", context=CONTEXTS["no-answer-in-it"])
    assert_well_formed(ours, CONTEXTS["no-answer-in-it"])
    assert ours["answer"] != ""
    assert_answers_match(ours, ref)


def test_context_of_only_whitespace_matches_transformers(pipes):
    # No context token at all: transformers answers '' at (0, 0) with score 0, and so do we.
    ours, ref = _both(pipes, question=QUESTION, context="   \n ")
    assert_answers_match(ours, ref)



@pytest.mark.parametrize("options", [{}, {"top_k": 3, "max_seq_len": 64, "doc_stride": 16, "batch_size": 4},
                                     {"padding": "max_length", "top_k": 2}], ids=["default", "windows", "padded"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_left_padding_tokenizer_puts_the_context_first_like_transformers(tiny, arch, options):
    # transformers puts the context first (and masks nothing but padding) when the tokenizer pads left.
    ours = onnxpipe.pipeline("question-answering", model=tiny.export(arch, "question-answering", **WEIGHTS))
    ref = reference_pipeline("question-answering", tiny.checkpoint(arch, "question-answering", **WEIGHTS))
    ours.tokenizer.padding_side = ref.tokenizer.padding_side = "left"
    assert_answers_match(*_both((ours, ref), question=QUESTION, context=LONG[:2000], **options))

def test_int8_gives_well_formed_answers(tiny):
    qa = onnxpipe.pipeline("question-answering", model=tiny.export("bert", "question-answering", **WEIGHTS),
                           precision="int8")
    contexts = list(CONTEXTS.values()) + [LONG]
    results = qa(question=[QUESTION] * len(contexts), context=contexts, top_k=3)
    assert len(results) == len(contexts)
    for result, context in zip(results, contexts):
        assert_well_formed(result, context)
        scores = [a["score"] for a in result]
        assert scores == sorted(scores, reverse=True)


# --- span selection, unit-tested against transformers' own functions --------------------------------

@pytest.mark.parametrize("top_k", [1, 3, 40, 400])
@pytest.mark.parametrize("handle_impossible", [False, True], ids=["possible", "impossible"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_starts_ends_equals_transformers(top_k, handle_impossible, seed):
    from transformers.pipelines.question_answering import select_starts_ends as ref_select

    rng = np.random.default_rng(seed)
    n = 17
    start, end = (rng.normal(size=(1, n)).astype(np.float32) for _ in range(2))
    if seed == 2:  # exact ties: every span of the same length scores the same
        start[:], end[:] = 0.5, 0.5
    p_mask = np.array([[0] + [1] * 5 + [0] * (n - 7) + [1]])
    attention_mask = np.ones((1, n), dtype=np.int64)
    attention_mask[0, -2:] = 0
    ours = select_starts_ends(start, end, p_mask, attention_mask, 1000000, top_k, handle_impossible, 4)
    ref = ref_select(start, end, p_mask, attention_mask, 1000000, top_k, handle_impossible, 4)
    for a, b in zip(ours[:3], ref[:3]):
        np.testing.assert_array_equal(a, b)
    assert ours[3] == ref[3]


def test_decode_spans_keeps_position_zero_like_transformers():
    # transformers tests membership against undesired_tokens.nonzero() of a [1, seq] mask,
    # whose row indices (all 0) make position 0 count as desired.
    from transformers.pipelines.question_answering import decode_spans as ref_decode

    start = np.array([[0.5, 0.1, 0.4]], dtype=np.float32)
    end = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)
    undesired = np.array([[0, 0, 1]])
    ours, ref = decode_spans(start, end, 3, 5, undesired), ref_decode(start, end, 3, 5, undesired)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    assert 0 in ours[0]


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qa(tiny):
    return onnxpipe.pipeline("question-answering", model=tiny.export("bert", "question-answering", **WEIGHTS))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"question": QUESTION}, ValueError, "no context"),
    ({"context": "Berlin"}, ValueError, "no question"),
    ({}, ValueError, "question and a context"),
    ({"question": "", "context": "Berlin"}, ValueError, "`question` cannot be empty"),
    ({"question": QUESTION, "context": ""}, ValueError, "`context` cannot be empty"),
    ({"question": 5, "context": "Berlin"}, TypeError, "question must be a string"),
    ({"question": QUESTION, "context": 5}, TypeError, "context: int"),
    ({"question": QUESTION, "context": ["a", "b"]}, TypeError, "question must be a string or a list"),
    ({"question": ["a", "b"], "context": ["c"]}, ValueError, "different lengths"),
    ({"question": ["a", 3], "context": "c"}, TypeError, "`question` must be a string"),
    ({"question": [], "context": "c"}, ValueError, "empty list"),
], ids=["no-context", "no-question", "nothing", "empty-question", "empty-context", "int-question", "int-context",
        "context-list-for-one-question", "length-mismatch", "int-in-question-list", "empty-question-list"])
def test_bad_question_or_context_raise_clear_errors(qa, kwargs, error, match):
    with pytest.raises(error, match=match):
        qa(**kwargs)


@pytest.mark.parametrize("inputs, error, match", [
    ({"question": QUESTION}, ValueError, "'context' key"),
    ({"question": None, "context": "x"}, ValueError, "`question` cannot be None"),
    ({"question": QUESTION, "context": b"bytes"}, TypeError, "`context` must be a string"),
    ("just a string", TypeError, "dict"),
    ([{"question": QUESTION, "context": "x"}, "y"], TypeError, "dict"),
], ids=["dict-without-context", "dict-None-question", "dict-bytes-context", "plain-string", "list-with-string"])
def test_bad_dict_inputs_raise_clear_errors(qa, inputs, error, match):
    with pytest.raises(error, match=match):
        qa(inputs)


@pytest.mark.parametrize("options, match", [
    ({"top_k": 0}, "top_k"),
    ({"top_k": "3"}, "top_k"),
    ({"max_answer_len": 0}, "max_answer_len"),
    ({"doc_stride": 500}, r"doc_stride \(500\) is larger than max_seq_len \(384\)"),
    ({"doc_stride": -1}, "doc_stride"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"max_seq_len": 16, "doc_stride": 15}, "doc_stride"),
    ({"padding": "sideways"}, "padding"),
], ids=["top_k-zero", "top_k-str", "max_answer_len-zero", "doc_stride-over-max_seq_len", "doc_stride-negative",
        "max_seq_len-zero", "doc_stride-near-max_seq_len", "bad-padding"])
def test_bad_options_raise_clear_errors(qa, options, match):
    with pytest.raises(ValueError, match=match):
        qa(question=QUESTION, context=CONTEXTS["ascii"], **options)


@pytest.mark.parametrize("options, match", [
    ({"max_seq_len": 40, "doc_stride": 37}, "doc_stride=37"),
    ({"max_seq_len": 6}, "question is"),
    ({"max_seq_len": 600, "doc_stride": 100}, "max_seq_len <= 512"),
], ids=["doc_stride-over-window-room", "question-fills-max_seq_len", "max_seq_len-over-model-limit"])
def test_windows_the_tokenizer_or_model_cannot_make_are_refused(pipes, options, match):
    # transformers fails on these too (a Rust panic, a tokenizer exception, a position index error).
    ours, ref = pipes
    with pytest.raises(ValueError, match=match):
        ours(question=QUESTION, context=LONG, **options)
    with pytest.raises(BaseException):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref(question=QUESTION, context=LONG, **options)


def test_bad_flags_and_unknown_options_are_named(qa):
    with pytest.raises(TypeError, match="handle_impossible_answer"):
        qa(question=QUESTION, context="x y", handle_impossible_answer="yes")
    with pytest.raises(TypeError, match="max_anwser_len"):
        qa(question=QUESTION, context="x y", max_anwser_len=3)
    with pytest.raises(ValueError, match="batch_size"):
        qa(question=QUESTION, context="x y", batch_size=0)


def test_model_exported_for_another_task_is_refused(tiny):
    with pytest.raises(ValueError, match="exported for 'token-classification'"):
        onnxpipe.pipeline("question-answering", model=tiny.export("bert", "token-classification"))
