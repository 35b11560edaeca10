"""text-classification (alias sentiment-analysis): transformers' TextClassificationPipeline on ONNX Runtime.

Return shapes follow transformers 4.57 exactly, odd ones included:
    clf("text")                    -> [{'label', 'score'}]           (best label, wrapped in a list)
    clf(["a", "b"])                -> [{'label', 'score'}, ...]       (one dict per text)
    clf({"text": a, "text_pair": b}) -> {'label', 'score'}            (a dict input is not wrapped)
    clf("text", top_k=2)           -> [{'label', 'score'}, ...]       (sorted, best first)
    clf(["a", "b"], top_k=None)    -> [[...all labels...], [...]]
    return_all_scores=True (deprecated) -> every label in label order, not sorted
"""
from __future__ import annotations

import warnings

import numpy as np

from ..base import check_bool
from ._common import EncoderPipeline, check_choice, check_positive_int, check_tokenizer_kwargs, encode, sigmoid, softmax

FUNCTIONS = ("softmax", "sigmoid", "none")
_PAIR_HINT = ('The pipeline received invalid inputs, if you are trying to send text pairs, you can try to send a'
              ' dictionary `{"text": "My text", "text_pair": "My pair"}` in order to send a text pair.')


class TextClassificationPipeline(EncoderPipeline):
    """Classify texts or text pairs with a sequence-classification export.

    top_k: int or None (all labels); function_to_apply: 'softmax' | 'sigmoid' | 'none'
    (default from the manifest's problem_type / num_labels, as transformers decides);
    truncation, max_length, padding, add_special_tokens go to the tokenizer.
    """

    task = "text-classification"
    model_tasks = ("text-classification",)

    input_description = "a string, a {'text': str, 'text_pair': str} object, or a list of those"

    def run(self, inputs, options, *, batch_size=None):
        result = super().run(inputs, options, batch_size=batch_size)
        return [result] if _wraps_result(inputs, options) else result

    # -- the request contract ----------------------------------------------------------------------------------

    def accepts_item(self, item) -> bool:
        return isinstance(item, str) or (isinstance(item, dict) and isinstance(item.get("text"), str)
                                         and set(item) <= {"text", "text_pair"}
                                         and isinstance(item.get("text_pair", ""), str))

    def texts_to_measure(self, item, options):
        if isinstance(item, dict) and not options.preprocess.get("truncation"):
            return item["text"], item.get("text_pair")
        return super().texts_to_measure(item, options)

    def answer(self, inputs, options, results):
        if not inputs.is_list and _wraps_result(inputs.items[0], options):
            return [results[0]]
        return super().answer(inputs, options, results)

    # -- the four steps ----------------------------------------------------------------------------------------

    def _sanitize_parameters(self, return_all_scores=None, function_to_apply=None, top_k="", **tokenizer_kwargs):
        # top_k="" means "not given": top_k=None is a real value (all labels).
        preprocess_params = check_tokenizer_kwargs(tokenizer_kwargs, type(self).__name__)
        postprocess_params = {}
        if top_k is None or (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)):
            postprocess_params["top_k"] = None if top_k is None else check_positive_int(top_k, "top_k")
            postprocess_params["_legacy"] = False
        elif not (isinstance(top_k, str) and top_k == ""):
            raise TypeError(f"top_k must be a positive integer or None (all labels), got {type(top_k).__name__}")
        elif return_all_scores is not None:
            check_bool(return_all_scores, "return_all_scores")
            warnings.warn("`return_all_scores` is now deprecated,  if want a similar functionality use `top_k=None` "
                          "instead of `return_all_scores=True` or `top_k=1` instead of `return_all_scores=False`.",
                          UserWarning, stacklevel=4)
            postprocess_params["top_k"] = None if return_all_scores else 1
        if function_to_apply is not None:
            postprocess_params["function_to_apply"] = check_choice(function_to_apply, FUNCTIONS, "function_to_apply")
        return preprocess_params, {}, postprocess_params

    def preprocess(self, inputs, **tokenizer_kwargs) -> dict[str, np.ndarray]:
        if isinstance(inputs, dict):
            text, pair = _text_pair(inputs)
            return encode(self.tokenizer, text, pair, **tokenizer_kwargs)
        if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], list) and len(inputs[0]) == 2:
            # transformers still takes [[text, pair]] as one pair, for backward compatibility.
            text, pair = _text_pair({"text": inputs[0][0], "text_pair": inputs[0][1]})
            return encode(self.tokenizer, text, pair, **tokenizer_kwargs)
        if isinstance(inputs, list):
            raise ValueError(_PAIR_HINT)
        if not isinstance(inputs, str):
            raise TypeError(f"text-classification inputs must be a string, a {{'text', 'text_pair'}} dict, or a list "
                            f"of those; got {type(inputs).__name__}")
        return encode(self.tokenizer, inputs, **tokenizer_kwargs)

    def postprocess(self, model_outputs, function_to_apply=None, top_k=1, _legacy=True):
        if function_to_apply is None:
            function_to_apply = default_function(self.manifest.get("problem_type"), self.manifest.get("num_labels"))
        scores = apply_function(np.asarray(model_outputs["logits"][0], dtype=np.float32), function_to_apply)
        id2label = self.manifest["id2label"]
        if top_k == 1 and _legacy:
            return {"label": id2label[str(int(scores.argmax()))], "score": scores.max().item()}
        dict_scores = [{"label": id2label[str(i)], "score": score.item()} for i, score in enumerate(scores)]
        if not _legacy:
            dict_scores.sort(key=lambda x: x["score"], reverse=True)
            if top_k is not None:
                dict_scores = dict_scores[:top_k]
        return dict_scores


def _wraps_result(inputs, options) -> bool:
    """transformers wraps a str's result in a list unless top_k was given to this call."""
    return isinstance(inputs, str) and "top_k" not in options.given


def default_function(problem_type: str | None, num_labels: int | None) -> str:
    """transformers' choice when function_to_apply is not given."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    if problem_type == "single_label_classification" or (num_labels or 0) > 1:
        return "softmax"
    return "none"


def apply_function(logits: np.ndarray, function_to_apply: str) -> np.ndarray:
    if function_to_apply == "sigmoid":
        return sigmoid(logits)
    if function_to_apply == "softmax":
        return softmax(logits)
    return logits


def _text_pair(inputs: dict) -> tuple[str, str | None]:
    unknown = sorted(set(inputs) - {"text", "text_pair"})
    if unknown or "text" not in inputs:
        raise ValueError(f"a text-pair input is a dict with keys 'text' and optionally 'text_pair'; "
                         f"got keys {sorted(inputs)}")
    if not isinstance(inputs["text"], str):
        raise TypeError(f"inputs['text'] must be a string, got {type(inputs['text']).__name__}")
    if not isinstance(inputs.get("text_pair", ""), (str, type(None))):
        raise TypeError(f"inputs['text_pair'] must be a string, got {type(inputs['text_pair']).__name__}")
    return inputs["text"], inputs.get("text_pair")
