"""What a request may carry for each task, how long its texts may be, and how batched results go back to requests.

The server runs several requests as one list call, `pipe([a, b, c], batch_size=3)`, and must
hand each request exactly what `pipe(its_inputs)` would have returned. transformers' pipelines
(and so onnxpipe's) shape single and list results differently per task; the rules are here,
read from transformers 4.57's `__call__` methods:

    text-classification   pipe("a") -> [r]  unless top_k is given (then r)
    question-answering    pipe([x]) -> r    (a one-item list is unwrapped)
    fill-mask             pipe([x]) -> r    (same)
    text2text-generation  pipe(["a", "b"]) flattens each [r] to r when one sequence comes back
    text-generation       a list of {"role", "content"} dicts is one chat, not a batch
    feature-extraction    results keep the padded length of their batch: never batched across requests
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RequestError

TEXT2TEXT_TASKS = ("text2text-generation", "summarization", "translation")
_UNWRAP_ONE_ITEM_LIST = ("question-answering", "fill-mask")
# Results that keep their batch's padded length (as transformers' do): batching requests together
# would change what each one gets back, so these run as sent.
PADDING_SHOWS_TASKS = ("feature-extraction",)


@dataclass
class ParsedInputs:
    items: list           # one entry per pipeline input
    is_list: bool         # the request sent a list (a batch) rather than one input
    lengths: list | None = None   # tokens per item, where measured (for grouping similar lengths)

    @property
    def value(self):
        return self.items if self.is_list else self.items[0]


def parse_inputs(task: str, inputs) -> ParsedInputs:
    """Split a request's `inputs` into pipeline inputs, checking their JSON types for `task`."""
    if inputs is None:
        raise RequestError(422, "the request body needs 'inputs': " + describe_inputs(task))
    single_chat = task == "text-generation" and isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], dict)
    if isinstance(inputs, list) and not single_chat:
        if not inputs:
            raise RequestError(422, "'inputs' is an empty list: " + describe_inputs(task))
        for i, item in enumerate(inputs):
            _check_item(task, item, f"inputs[{i}]")
        return ParsedInputs(list(inputs), True)
    _check_item(task, inputs, "inputs")
    return ParsedInputs([inputs], False)


def describe_inputs(task: str) -> str:
    if task == "question-answering":
        return "pass {'question': str, 'context': str} or a list of those"
    if task == "text-classification":
        return "pass a string, a {'text': str, 'text_pair': str} object, or a list of those"
    if task == "text-generation":
        return "pass a prompt string, a chat (a list of {'role', 'content'} objects), or a list of those"
    return "pass a string or a list of strings"


def _check_item(task: str, item, where: str) -> None:
    if task == "question-answering":
        ok = isinstance(item, dict) and set(item) == {"question", "context"} and all(isinstance(v, str) for v in item.values())
    elif task == "text-classification":
        ok = isinstance(item, str) or (isinstance(item, dict) and isinstance(item.get("text"), str)
                                       and set(item) <= {"text", "text_pair"}
                                       and isinstance(item.get("text_pair", ""), str))
    elif task == "text-generation":
        ok = isinstance(item, str) or (isinstance(item, list) and bool(item) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in item))
    else:
        ok = isinstance(item, str)
    if not ok:
        raise RequestError(422, f"{where} has the wrong type ({_json_type(item)}) for a {task} model: "
                           + describe_inputs(task))


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def answer_for(task: str, parameters: dict, parsed: ParsedInputs, results: list):
    """The answer `pipe(parsed.value, **parameters)` gives, from each item's result in a list call."""
    if parsed.is_list:
        if len(results) == 1 and task in _UNWRAP_ONE_ITEM_LIST:
            return results[0]
        return list(results)
    (result,) = results
    if task == "text-classification" and isinstance(parsed.items[0], str) and "top_k" not in parameters:
        return [result]
    if task in TEXT2TEXT_TASKS and isinstance(result, dict):
        return [result]
    return result


def item_results(task: str, output, n: int) -> list:
    """One result per input from `pipe(list_of_n_inputs)`, undoing the one-item-list unwrapping."""
    if n == 1 and task in _UNWRAP_ONE_ITEM_LIST:
        return [output]
    return list(output)


def length_limit(manifest: dict) -> int | None:
    """The most tokens one input may have: the tokenizer's model_max_length and the model's max_positions."""
    limits = [v for v in (manifest.get("tokenizer", {}).get("model_max_length"), manifest.get("max_positions"))
              if isinstance(v, int) and v > 0]
    return min(limits) if limits else None


def texts_to_measure(task: str, parameters: dict, item):
    """The (text, pair) an item is tokenized into, or None when the pipeline copes with any length.

    Question answering splits long contexts into doc_stride windows, token classification does
    with a stride, sentence embeddings cut at their max_seq_length, and an explicit `truncation`
    asks the pipeline to cut: none of those is limited.
    """
    if parameters.get("truncation") or (parameters.get("tokenize_kwargs") or {}).get("truncation"):
        return None
    if task == "question-answering" or (task == "token-classification" and parameters.get("stride")):
        return None
    if task == "sentence-similarity":  # cuts at its max_seq_length, as sentence-transformers does
        return None
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) and "text" in item:
        return item["text"], item.get("text_pair")
    return None  # a chat: its length depends on the chat template, checked by the pipeline
