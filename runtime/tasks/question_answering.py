"""question-answering: transformers' QuestionAnsweringPipeline (fast-tokenizer path) on ONNX Runtime.

    qa(question="Where?", context="... Berlin ...")      -> {'score', 'start', 'end', 'answer'}
    qa({"question": q, "context": c})                     -> the same
    qa(question=[q1, q2], context=c)                      -> [{...}, {...}]   (one context for every question)
    qa(question=[q1, q2], context=[c1, c2])               -> [{...}, {...}]
    qa([{"question": q1, "context": c1}, ...])            -> [{...}, ...]
    qa(..., top_k=3)                                      -> [{...}, {...}, {...}]   (a dict if only one answer)

As in transformers, a single example gives a dict even when passed in a list of one, and
top_k>1 gives a list unless only one distinct answer was found. `start`/`end` are character
offsets into the context. A context longer than `max_seq_len` tokens is split into windows
that overlap by `doc_stride` tokens; answers found in several windows add up their scores.
"""
from __future__ import annotations

import warnings

import numpy as np

from ._common import ChunkPipeline, UnwrapsOneItemList, check_positive_int

_PADDING = ("do_not_pad", "longest", "max_length", True, False)
_MIN_NULL_SCORE = 1000000  # transformers' starting value: "large and positive"


class QuestionAnsweringPipeline(UnwrapsOneItemList, ChunkPipeline):
    """Extractive QA with a question-answering export (start/end logits).

    top_k (1), doc_stride (min(max_seq_len // 2, 128)), max_answer_len (15), max_seq_len
    (min(model max length, 384)), handle_impossible_answer (False), align_to_words (True),
    padding ('do_not_pad'), batch_size (1: windows run one at a time, as in transformers).
    max_question_len is accepted and, as in transformers' fast-tokenizer path, has no effect.
    """

    task = "question-answering"
    model_tasks = ("question-answering",)

    input_description = "{'question': str, 'context': str} or a list of those"

    def __call__(self, *args, question=None, context=None, **kwargs):
        options = self.check_parameters(kwargs)
        return self._answer_examples(parse_examples(args, question, context), options, None)

    def run(self, inputs, options, *, batch_size=None):
        return self._answer_examples(parse_examples((inputs,), None, None), options, batch_size)

    def _answer_examples(self, examples: list, options, batch_size):
        results = self.run_examples(examples, options, batch_size)
        return results[0] if len(results) == 1 else results

    # -- the request contract: long contexts run as doc_stride windows, so any length is fine ----------------------

    def accepts_item(self, item) -> bool:
        return isinstance(item, dict) and set(item) == {"question", "context"} and all(
            isinstance(v, str) for v in item.values())

    def texts_to_measure(self, item, options):
        return None

    def _sanitize_parameters(self, top_k=None, topk=None, doc_stride=None, max_answer_len=None, max_seq_len=None,
                             max_question_len=None, handle_impossible_answer=None, align_to_words=None, padding=None):
        preprocess_params, postprocess_params = {}, {}
        if padding is not None:
            if padding not in _PADDING:
                raise ValueError(f"padding={padding!r} is not understood: use one of {_PADDING}")
            preprocess_params["padding"] = padding
        if doc_stride is not None:
            if isinstance(doc_stride, bool) or not isinstance(doc_stride, (int, np.integer)) or doc_stride < 0:
                raise ValueError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
            preprocess_params["doc_stride"] = int(doc_stride)
        if max_seq_len is not None:
            preprocess_params["max_seq_len"] = check_positive_int(max_seq_len, "max_seq_len")
        if max_question_len is not None:
            preprocess_params["max_question_len"] = check_positive_int(max_question_len, "max_question_len")
        if topk is not None and top_k is None:
            warnings.warn("topk parameter is deprecated, use top_k instead", UserWarning, stacklevel=4)
            top_k = topk
        if top_k is not None:
            postprocess_params["top_k"] = check_positive_int(top_k, "top_k")
        if max_answer_len is not None:
            postprocess_params["max_answer_len"] = check_positive_int(max_answer_len, "max_answer_len")
        for name, value in (("handle_impossible_answer", handle_impossible_answer), ("align_to_words", align_to_words)):
            if value is not None:
                if not isinstance(value, (bool, np.bool_)):
                    raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
                postprocess_params[name] = bool(value)
        return preprocess_params, {}, postprocess_params

    def preprocess(self, example: tuple[str, str], padding="do_not_pad", doc_stride=None, max_question_len=64,
                   max_seq_len=None) -> list[dict]:
        """(question, context) -> one item per window: feeds [1, seq], p_mask, the window's Encoding."""
        question, context = example
        if max_seq_len is None:
            max_seq_len = min(self.tokenizer.model_max_length or 384, 384)
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise ValueError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len}): "
                             "pass a smaller doc_stride or a larger max_seq_len")
        # The Rust tokenizer refuses a stride above max_length minus one sequence's special tokens.
        most = max_seq_len - self.tokenizer.backend.num_special_tokens_to_add(False)
        if doc_stride > most:
            raise ValueError(f"doc_stride ({doc_stride}) must be at most {most} with max_seq_len={max_seq_len} "
                             "(less the special tokens): pass a smaller doc_stride or a larger max_seq_len")
        # transformers puts the question first unless the tokenizer pads on the left.
        question_first = self.tokenizer.padding_side == "right"
        first, second = (question, context) if question_first else (context, question)
        self._check_windows(question, context, max_seq_len, doc_stride)
        padding = False if padding == "do_not_pad" else padding
        encoding = self.tokenizer.encode_batch(
            [first], [second], truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len, stride=doc_stride, padding=padding)[0]
        windows = [encoding] + list(encoding.overflowing)
        limit = self.manifest.get("max_positions")
        if limit is not None and len(encoding.ids) > limit:
            raise ValueError(f"max_seq_len={max_seq_len} makes windows of {len(encoding.ids)} tokens; the model takes "
                             f"at most {limit}: pass max_seq_len <= {limit}")
        cls_id = self.tokenizer.cls_token_id
        items = []
        for window in windows:
            # p_mask: 1 where a token cannot be part of the answer (question, special tokens),
            # except the CLS token, which some models use to say "no answer".
            p_mask = np.array([[int(s != 1) if question_first else 0 for s in window.sequence_ids]], dtype=np.int64)
            ids = np.array([window.ids], dtype=np.int64)
            if cls_id is not None:
                p_mask[ids == cls_id] = 0
            items.append({
                "input_ids": ids,
                "attention_mask": np.array([window.attention_mask], dtype=np.int64),
                "token_type_ids": np.array([window.type_ids], dtype=np.int64),
                "p_mask": p_mask,
                "encoding": window,
                "context": context,
            })
        return items

    def _check_windows(self, question: str, context: str, max_seq_len: int, doc_stride: int) -> None:
        """Refuse, with the argument to change, what the Rust tokenizer would fail on (or panic on)."""
        specials = self.tokenizer.backend.num_special_tokens_to_add(True)
        n_question, n_context = (len(e.ids) for e in
                                 self.tokenizer.encode_batch([question, context], add_special_tokens=False))
        room = max_seq_len - n_question - specials  # context tokens one window can hold
        if n_question + n_context + specials <= max_seq_len:
            return
        if room <= 0:
            raise ValueError(f"the question is {n_question} tokens long, which leaves no room for the context in "
                             f"max_seq_len={max_seq_len} tokens: pass a larger max_seq_len or a shorter question")
        if doc_stride >= room:
            raise ValueError(f"doc_stride={doc_stride} must be smaller than the {room} context tokens a window holds "
                             f"(max_seq_len={max_seq_len} minus the question and special tokens): pass a smaller "
                             "doc_stride or a larger max_seq_len")

    def _forward(self, model_inputs: dict) -> dict:
        out = self.model.session().run(model_inputs)
        return {"start": out["start_logits"], "end": out["end_logits"]}

    def postprocess(self, windows: list[dict], top_k=1, handle_impossible_answer=False, max_answer_len=15,
                    align_to_words=True):
        min_null_score = _MIN_NULL_SCORE
        answers: list[dict] = []
        question_first = self.tokenizer.padding_side == "right"
        sequence_index = 1 if question_first else 0
        # Some candidates may be dropped when aligned to words, so more are drawn.
        pre_topk = top_k * 2 + 10 if align_to_words else top_k
        for window in windows:
            starts, ends, scores, min_null_score = select_starts_ends(
                window["start"], window["end"], window["p_mask"], window["attention_mask"], min_null_score, pre_topk,
                handle_impossible_answer, max_answer_len)
            # The Encoding is not padded but a left-padded batch row is: shift back.
            offset = 0
            if self.tokenizer.padding_side == "left":
                offset = int((window["input_ids"] == self.tokenizer.pad_token_id).sum())
            context = window["context"]
            for s, e, score in zip(starts, ends, scores):
                start_index, end_index = char_span(window["encoding"], int(s) - offset, int(e) - offset,
                                                   sequence_index, align_to_words)
                target = context[start_index:end_index]
                same = next((a for a in answers if a["answer"].lower() == target.lower()), None)
                if same is not None:
                    same["score"] += score.item()
                else:
                    answers.append({"score": score.item(), "start": start_index, "end": end_index, "answer": target})
        if handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def parse_examples(args: tuple, question, context) -> list[tuple[str, str]]:
    """Every input form transformers' QuestionAnsweringArgumentHandler takes -> [(question, context)]."""
    if args:
        if question is not None or context is not None:
            raise TypeError("pass the question and context either positionally or as question=/context=, not both")
        if len(args) == 1:
            inputs = args[0]
        elif len(args) == 2 and all(isinstance(a, str) for a in args):
            inputs = [{"question": args[0], "context": args[1]}]
        else:
            inputs = list(args)
    elif question is not None and context is not None:
        if isinstance(question, list) and isinstance(context, str):
            inputs = [{"question": q, "context": context} for q in question]
        elif isinstance(question, list) and isinstance(context, list):
            if len(question) != len(context):
                raise ValueError(f"question and context lists have different lengths ({len(question)} and "
                                 f"{len(context)}): pass one context per question, or a single context string")
            inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
        elif isinstance(question, str) and isinstance(context, str):
            inputs = [{"question": question, "context": context}]
        else:
            raise TypeError(f"question must be a string or a list of strings and context a string or a list of "
                            f"strings (a list only with a list of questions); got question: {type(question).__name__}, "
                            f"context: {type(context).__name__}")
    elif question is None and context is None:
        raise ValueError("question-answering needs a question and a context: pass question=... and context=..., "
                         "or a {'question': ..., 'context': ...} dict")
    else:
        missing = "context" if context is None else "question"
        raise ValueError(f"question-answering got no {missing}: pass both question=... and context=...")
    if isinstance(inputs, dict):
        inputs = [inputs]
    elif isinstance(inputs, (list, tuple)):
        inputs = list(inputs)
    else:
        raise TypeError(f"question-answering inputs must be a {{'question', 'context'}} dict or a list of them, "
                        f"got {type(inputs).__name__}")
    if not inputs:
        raise ValueError("question-answering got an empty list: pass at least one {'question', 'context'} dict")
    return [_normalize(item) for item in inputs]


def _normalize(item) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise TypeError(f"each question-answering input must be a {{'question', 'context'}} dict, "
                        f"got {type(item).__name__}")
    values = []
    for key in ("question", "context"):
        if key not in item:
            raise ValueError(f"the input dict has no '{key}' key: pass {{'question': ..., 'context': ...}}")
        value = item[key]
        if value is None:
            raise ValueError(f"`{key}` cannot be None")
        if not isinstance(value, str):
            raise TypeError(f"`{key}` must be a string, got {type(value).__name__}")
        if not value:
            raise ValueError(f"`{key}` cannot be empty")
        values.append(value)
    return values[0], values[1]


def char_span(encoding, s: int, e: int, sequence_index: int, align_to_words: bool) -> tuple[int, int]:
    """Token span -> character span in the context; widened to whole words when the tokenizer knows words."""
    if align_to_words:
        start_word, end_word = encoding.token_to_word(s), encoding.token_to_word(e)
        if start_word is not None and end_word is not None:
            start_chars = encoding.word_to_chars(start_word, sequence_index=sequence_index)
            end_chars = encoding.word_to_chars(end_word, sequence_index=sequence_index)
            if start_chars is not None and end_chars is not None:
                return start_chars[0], end_chars[1]
    # Tokens outside any word (special tokens) keep their own offsets, as transformers falls back.
    return encoding.offsets[s][0], encoding.offsets[e][1]


def select_starts_ends(start: np.ndarray, end: np.ndarray, p_mask: np.ndarray, attention_mask: np.ndarray | None,
                       min_null_score=_MIN_NULL_SCORE, top_k: int = 1, handle_impossible_answer: bool = False,
                       max_answer_len: int = 15):
    """transformers' select_starts_ends: mask non-context tokens, softmax, then `decode_spans`.

    start, end: logits [1, seq]; p_mask: 1 where a token cannot be in the answer.
    Returns (starts, ends, scores, min_null_score).
    """
    undesired_tokens = np.abs(np.asarray(p_mask) - 1)
    if attention_mask is not None:
        undesired_tokens = undesired_tokens & attention_mask
    undesired_tokens_mask = undesired_tokens == 0.0
    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0  # the CLS position scores "no answer", never a span
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def decode_spans(start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int, undesired_tokens: np.ndarray):
    """transformers' decode_spans: the top-k (start, end) pairs by start*end probability.

    Spans with end < start or longer than max_answer_len score 0. Kept as transformers writes
    it, quirks included: `undesired_tokens.nonzero()` of the [1, seq] mask also holds the row
    index 0, so position 0 always counts as a desired token.
    """
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores
