"""Helpers shared by the encoder tasks: input checks, tokenizing, batching with padding, softmax/sigmoid.

`run_batched` is transformers' DataLoader + `pad_collate_fn` + unbatching in numpy: items
preprocessed one by one are padded into batches of `batch_size`, run, and split back into
one-row results, so postprocess sees exactly what it would see with batch_size=1 (plus the
padding positions, as in transformers).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .. import cancel
from ..base import CallOptions, Pipeline, check_batch_size, check_bool
from ..tokenizer import to_numpy

TOKENIZER_KWARGS = ("truncation", "max_length", "padding", "add_special_tokens")
_TRUNCATION = (True, False, "longest_first", "only_first", "only_second", "do_not_truncate")
_PADDING = (True, False, "longest", "max_length", "do_not_pad")
# transformers' pad_collate_fn pads these keys with 1 (they mark "not a real token"); input_ids
# takes the tokenizer's pad id, everything else 0.
_PAD_WITH_ONE = {"p_mask", "special_tokens_mask"}


def check_texts(inputs, arg_name: str = "inputs") -> tuple[list[str], bool]:
    """`inputs` as a str or a non-empty list of str -> (texts, was_single_str)."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"{arg_name} is an empty list: pass a string or a non-empty list of strings")
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                raise TypeError(f"{arg_name}[{i}] must be a string, got {type(x).__name__}")
        return list(inputs), False
    raise TypeError(f"{arg_name} must be a string or a list of strings, got {type(inputs).__name__}")


class EncoderPipeline(Pipeline):
    """A pipeline that runs the model once per input: lists go through `run_batched` in `batch_size` batches.

    batch_size is taken at construction and per call, as transformers' pipelines take it. Requests may be joined
    into one batch: each input is preprocessed and postprocessed alone, so its result does not depend on its
    neighbours (except where a task keeps the padding in its output: it sets joins_requests = False).
    """

    takes_batch_size = True
    joins_requests = True

    def __init__(self, model, *, batch_size=None, **kwargs):
        self._batch_size = check_batch_size(batch_size)
        super().__init__(model, **kwargs)

    def run(self, inputs, options: CallOptions, *, batch_size: int | None = None):
        pre, fwd, post = options.preprocess, options.forward, options.postprocess
        if not isinstance(inputs, list):
            return self.run_single(inputs, pre, fwd, post)
        if not inputs:
            raise ValueError(f"{self.task}: inputs is an empty list: pass at least one input")
        return self._run(inputs, self._batch_size_for(options, batch_size), pre, fwd, post)

    def _batch_size_for(self, options: CallOptions, batch_size: int | None) -> int:
        """The call's batch_size: run()'s, else the options', else the construction's."""
        if batch_size is not None:
            return check_batch_size(batch_size)
        return options.batch_size if options.batch_size is not None else self._batch_size

    def run_single(self, inputs, pre, fwd, post):
        return self._run([inputs], 1, pre, fwd, post)[0]

    def _run(self, inputs: list, batch_size: int, pre, fwd, post) -> list:
        items = [self.preprocess(x, **pre) for x in inputs]
        outputs = run_batched(items, batch_size, lambda feeds: self._forward(feeds, **fwd),
                              pad=pad_values(self.tokenizer), padding_side=self.tokenizer.padding_side)
        return [self.postprocess(out, **post) for out in outputs]

    def _forward(self, model_inputs):
        return self.model.session().run(model_inputs)


class ChunkPipeline(EncoderPipeline):
    """transformers' ChunkPipeline: preprocess turns one input into a list of items (QA windows,
    NER stride windows); batches cross input boundaries and postprocess gets one input's list."""

    def run_examples(self, inputs: list, options: CallOptions, batch_size: int | None = None) -> list:
        """One result per input, for subclasses whose run() parses its own input forms."""
        pre, fwd, post = options.preprocess, options.forward, options.postprocess
        return self._run(inputs, self._batch_size_for(options, batch_size), pre, fwd, post)

    def _run(self, inputs: list, batch_size: int, pre, fwd, post) -> list:
        chunks = [self.preprocess(x, **pre) for x in inputs]
        outputs = run_chunked(chunks, batch_size, lambda feeds: self._forward(feeds, **fwd),
                              pad=pad_values(self.tokenizer), padding_side=self.tokenizer.padding_side)
        return [self.postprocess(out, **post) for out in outputs]


class UnwrapsOneItemList:
    """For tasks whose transformers pipeline returns pipe([x]) as pipe(x) (question answering, fill-mask): the
    request contract's side of that unwrapping. Listed before the pipeline class in the bases."""

    def results_per_item(self, output, n: int) -> list:
        return [output] if n == 1 else list(output)

    def answer(self, inputs, options, results: list):
        if inputs.is_list and len(results) == 1:
            return results[0]
        return super().answer(inputs, options, results)


def check_tokenizer_kwargs(kwargs: dict, owner: str) -> dict:
    """Keep the tokenizer options a pipeline forwards; anything else is a TypeError naming it."""
    unknown = sorted(set(kwargs) - set(TOKENIZER_KWARGS))
    if unknown:
        raise TypeError(f"{owner} got unexpected arguments: {', '.join(unknown)} "
                        f"(tokenizer options it takes: {', '.join(TOKENIZER_KWARGS)})")
    if "truncation" in kwargs and kwargs["truncation"] not in _TRUNCATION:
        raise ValueError(f"truncation={kwargs['truncation']!r} is not understood: use one of {_TRUNCATION}")
    if "padding" in kwargs and kwargs["padding"] not in _PADDING:
        raise ValueError(f"padding={kwargs['padding']!r} is not understood: use one of {_PADDING}")
    if kwargs.get("max_length") is not None:
        check_positive_int(kwargs["max_length"], "max_length")
    if "add_special_tokens" in kwargs:
        check_bool(kwargs["add_special_tokens"], "add_special_tokens")
    return dict(kwargs)


def encode(tokenizer, text: str, pair: str | None = None, *, truncation=None, max_length: int | None = None,
           padding=False, add_special_tokens: bool = True) -> dict[str, np.ndarray]:
    """One input -> feeds shaped [1, seq], as transformers' `tokenizer(text, text_pair, return_tensors=...)`.

    Left unset, truncation cuts only what is longer than the model takes (max_length, else the
    model's max length): transformers would hand such an input to the model and fail on the
    position embeddings. truncation=False with such an input is a ValueError instead.
    """
    longest = tokenizer.model_max_length
    if max_length is not None and longest is not None and max_length > longest:
        # past the model's positions the graph fails (position embeddings), or pads to a huge batch
        raise ValueError(f"max_length={max_length} is more than this model's {longest} positions: pass at most "
                         f"{longest}")
    limit = max_length if max_length is not None else longest
    if truncation == "do_not_truncate":
        truncation = False
    if truncation is None:
        truncation = limit is not None
    padding = False if padding == "do_not_pad" else padding
    encs = tokenizer.encode_batch([text], None if pair is None else [pair], truncation=truncation, max_length=limit,
                                  padding=padding, add_special_tokens=add_special_tokens)
    if not truncation and longest is not None and len(encs[0].ids) > longest:
        raise ValueError(f"the input is {len(encs[0].ids)} tokens long and the model takes at most {longest}: "
                         "pass truncation=True (or leave truncation unset) to cut it")
    return to_numpy(encs)


def check_positive_int(value, arg_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{arg_name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value, choices: tuple[str, ...], arg_name: str) -> str:
    """A case-insensitive option name (transformers' str enums pass too) -> its lower-case form."""
    name = value.lower() if isinstance(value, str) else None
    if name not in choices:
        raise ValueError(f"{arg_name}={value!r} is not understood: use one of {', '.join(choices)}")
    return name


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """transformers.pipelines' softmax (max-shifted), in float32 like the model's logits."""
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def pad_values(tokenizer) -> dict[str, int]:
    """Padding value per feed name, as transformers' pad_collate_fn chooses them (0 for others)."""
    return {"input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            **{k: 1 for k in _PAD_WITH_ONE}}


def run_batched(items: list[dict], batch_size: int, forward: Callable[[dict], dict], *,
                pad: dict[str, int] | None = None, padding_side: str = "right") -> list[dict]:
    """Run `forward` on `items` in padded batches and return one result dict per item.

    items: what preprocess returned for each input: numpy arrays shaped [1, seq, ...] (feeds and
    anything else per token, e.g. offset_mapping) plus plain python values (kept as they are).
    forward: padded arrays -> dict of arrays with the batch first.
    Each result holds the item's padded arrays, forward's outputs sliced to [1, ...], and the
    item's python values.
    """
    pad = pad or {}
    results: list[dict] = []
    for start in range(0, len(items), batch_size):
        cancel.check()  # a caller that has gone stops the call here, between batches
        chunk = items[start:start + batch_size]
        array_keys = [k for k, v in chunk[0].items() if isinstance(v, np.ndarray)]
        if len(chunk) == 1:
            batch = {k: chunk[0][k] for k in array_keys}
        else:
            batch = {k: _pad([it[k] for it in chunk], pad.get(k, 0), padding_side) for k in array_keys}
        outputs = {**batch, **forward(batch)}
        for i, item in enumerate(chunk):
            row = {k: v[i:i + 1] for k, v in outputs.items()}
            row.update({k: v for k, v in item.items() if k not in array_keys})
            results.append(row)
    return results


def run_chunked(chunks_per_input: list[list[dict]], batch_size: int, forward: Callable[[dict], dict], *,
                pad: dict[str, int] | None = None, padding_side: str = "right") -> list[list[dict]]:
    """`run_batched` for transformers' ChunkPipelines (QA windows, NER strides): one input -> several items.

    Batches cross input boundaries, as transformers' PipelineChunkIterator does; the results come
    back grouped per input.
    """
    flat = run_batched([c for chunks in chunks_per_input for c in chunks], batch_size, forward, pad=pad,
                       padding_side=padding_side)
    grouped, at = [], 0
    for chunks in chunks_per_input:
        grouped.append(flat[at:at + len(chunks)])
        at += len(chunks)
    return grouped


def _pad(arrays: list[np.ndarray], value, side: str) -> np.ndarray:
    if arrays[0].ndim < 2:
        return np.concatenate(arrays, axis=0)
    longest = max(a.shape[1] for a in arrays)
    out = np.full((len(arrays), longest, *arrays[0].shape[2:]), value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        n = a.shape[1]
        if side == "left":
            out[i, longest - n:] = a[0]
        else:
            out[i, :n] = a[0]
    return out

