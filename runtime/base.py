"""The pipeline skeleton shared by every task: transformers' four-step split, and the request contract front ends use.

The four steps (each testable alone):

    _sanitize_parameters(**kwargs) -> preprocess_kw, forward_kw, postprocess_kw
    preprocess(input, **preprocess_kw)   -> model inputs (numpy feeds + what postprocess needs)
    _forward(model_inputs, **forward_kw) -> model outputs (the ONNX session only)
    postprocess(model_outputs, **postprocess_kw) -> python results (numpy only, pure)

The request contract: what the HTTP server, the Ray deployment or any other front end needs to serve a task
without knowing it. Each task's file declares its own rules by overriding these; a front end only calls them:

    options = pipe.check_parameters({"top_k": 2})    # checked once -> CallOptions (TypeError/ValueError)
    inputs = pipe.split_inputs(json_value)           # RequestInputs: items + was it a list (InputError)
    pipe.check_input_length(item, options, where)    # token count, or None; ValueError when too long
    pipe.run(inputs.value, options)                  # == pipe(json_value, top_k=2), no second check
    pipe.joins_requests / pipe.streams / pipe.chats  # what a front end may do with this task
    pipe.results_per_item(pipe.run(items, ...), n)   # a joined list call, split back per item
    pipe.answer(inputs, options, item_results)       # what pipe(inputs.value, ...) returns, from those
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .model_dir import ModelDir


class InputError(ValueError):
    """A request's inputs have the wrong shape or JSON type for the task; the message says what it takes."""


@dataclass(frozen=True)
class CallOptions:
    """A call's options, checked once by `check_parameters` and merged over the pipeline's construction options."""

    given: dict                 # the options as passed (JSON values for a front end's requests)
    preprocess: dict
    forward: dict
    postprocess: dict
    batch_size: int | None = None

    @property
    def key(self) -> str:
        """Equal for requests whose options are equal: only those may share one call."""
        return json.dumps(self.given, sort_keys=True, default=repr)


@dataclass(frozen=True)
class GenerationWork:
    """What one input of a generating call costs: sequences decoded side by side, and new tokens each."""

    num_beams: int
    num_return_sequences: int
    new_tokens: int
    sampled: bool = False   # tokens are drawn (do_sample), so runs with different seeds differ


@dataclass
class RequestInputs:
    """A request's inputs split into pipeline inputs."""

    items: list                 # one entry per pipeline input
    is_list: bool               # the request sent a list (a batch) rather than one input
    lengths: list | None = None  # tokens per item where measured (front ends group similar lengths)
    tokens: int | None = None    # tokens in all the items' texts, where counted (a front end's budget, usage)

    @property
    def value(self):
        """What to pass to the pipeline: the list, or the one input."""
        return self.items if self.is_list else self.items[0]


class Pipeline:
    task: str = ""
    #: tasks whose model dirs this pipeline accepts (the manifest's `task`)
    model_tasks: tuple[str, ...] = ()
    #: takes batch_size (per call and at construction)
    takes_batch_size: bool = False
    #: several requests' inputs may run as one list call, each result equal to running its request alone
    joins_requests: bool = False
    #: takes a `streamer` that receives the new tokens as they are generated
    streams: bool = False
    #: one line for a client that sent the wrong thing: what an input is
    input_description: str = "a string or a list of strings"

    def __init__(self, model: ModelDir, **kwargs):
        if self.model_tasks and model.task not in self.model_tasks:
            raise ValueError(f"model dir '{model.path}' was exported for {model.task!r}, not for {self.task!r}: "
                             f"export a {' or '.join(self.model_tasks)} model for this pipeline")
        self.model = model
        self.manifest = model.manifest
        self.tokenizer = model.tokenizer
        self._preprocess_params, self._forward_params, self._postprocess_params = self._sanitize_parameters(**kwargs)

    @property
    def device(self) -> str:
        """The device that runs the model (after a CUDA fallback: 'cpu'), read from its session."""
        return self.model.device

    # -- calling ------------------------------------------------------------------------------------------------

    def __call__(self, inputs, **kwargs):
        return self.run(inputs, self.check_parameters(kwargs))

    def run(self, inputs, options: CallOptions):
        """`pipe(inputs, **options.given)` with the options already checked (by check_parameters). Pipelines that
        take batch_size also take run(..., batch_size=n), and streaming ones run(..., streamer=s), overriding the
        options' own."""
        pre, fwd, post = options.preprocess, options.forward, options.postprocess
        if isinstance(inputs, list):
            if not inputs:
                raise ValueError(f"{self.task}: inputs is an empty list: pass at least one input")
            return [self.run_single(x, pre, fwd, post) for x in inputs]
        return self.run_single(inputs, pre, fwd, post)

    def run_single(self, inputs, pre, fwd, post):
        return self.postprocess(self._forward(self.preprocess(inputs, **pre), **fwd), **post)

    # -- the four steps (each task overrides them) ------------------------------------------------------------

    def _sanitize_parameters(self, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {', '.join(sorted(kwargs))}")
        return {}, {}, {}

    def preprocess(self, inputs, **kwargs):
        raise NotImplementedError

    def _forward(self, model_inputs, **kwargs):
        raise NotImplementedError

    def postprocess(self, model_outputs, **kwargs):
        raise NotImplementedError

    # -- the request contract -----------------------------------------------------------------------------------

    def check_parameters(self, parameters: dict | None = None) -> CallOptions:
        """Check a call's options once (unknown names: TypeError; bad values: ValueError) and merge them over the
        construction options: what `run` takes."""
        given = dict(parameters or {})
        kwargs = dict(given)
        batch_size = None
        if self.takes_batch_size and "batch_size" in kwargs:
            batch_size = check_batch_size(kwargs.pop("batch_size"))
        pre, fwd, post = self._sanitize_parameters(**kwargs)
        return CallOptions(given, {**self._preprocess_params, **pre}, {**self._forward_params, **fwd},
                           {**self._postprocess_params, **post}, batch_size)

    def split_inputs(self, inputs, where: str = "inputs") -> RequestInputs:
        """A request's `inputs` (JSON values) -> the pipeline inputs in it, each checked with `accepts_item`."""
        if inputs is None:
            raise InputError(f"the request needs '{where}': pass {self.input_description}")
        if isinstance(inputs, list) and not self.is_one_input(inputs):
            if not inputs:
                raise InputError(f"'{where}' is an empty list: pass {self.input_description}")
            for i, item in enumerate(inputs):
                self._check_item(item, f"{where}[{i}]")
            return RequestInputs(list(inputs), True)
        self._check_item(inputs, where)
        return RequestInputs([inputs], False)

    def is_one_input(self, value: list) -> bool:
        """Whether a list is one input (a chat) rather than a batch of inputs."""
        return False

    def accepts_item(self, item) -> bool:
        """Whether one pipeline input has the JSON type this task takes."""
        return isinstance(item, str)

    @property
    def max_input_tokens(self) -> int | None:
        """The most tokens one input may have: the tokenizer's model_max_length and the model's max_positions."""
        limits = [v for v in (self.manifest.get("tokenizer", {}).get("model_max_length"),
                              self.manifest.get("max_positions")) if isinstance(v, int) and v > 0]
        return min(limits) if limits else None

    def texts_to_measure(self, item, options: CallOptions):
        """The (text, pair) an input is tokenized into for the length check, or None when the pipeline copes
        with any length (it truncates, strides or windows)."""
        if options.preprocess.get("truncation"):
            return None
        if isinstance(item, str):
            return item, None
        return None

    def count_input_tokens(self, item) -> int:
        """Tokens in every text of an input (a question and its context, a chat's messages): what a front end
        counts against its per-request budget, whatever the pipeline does with long inputs."""
        texts, stack = [], [item]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
        return sum(self.tokenizer.count_tokens(t, add_special_tokens=False) for t in texts)

    def generation_work(self, options: CallOptions) -> "GenerationWork | None":
        """How much a call generates per input (None: it runs one forward pass per input)."""
        return None

    def reserved_positions(self, options: CallOptions) -> int:
        """Positions a call needs beyond its input (new tokens of a decoder)."""
        return 0

    def check_input_length(self, item, options: CallOptions, where: str = "inputs") -> int | None:
        """The input's token count (None: not measured); a ValueError naming the limit when it does not fit."""
        limit = self.max_input_tokens
        texts = self.texts_to_measure(item, options) if limit is not None else None
        if texts is None:
            return None
        n = self.tokenizer.count_tokens(*texts)
        reserved = self.reserved_positions(options)
        if n + reserved > limit:
            raise ValueError(self._too_long(where, n, reserved, limit))
        return n

    def _too_long(self, where: str, n: int, reserved: int, limit: int) -> str:
        return (f"{where} is {n} tokens long; this model takes at most {limit} tokens (manifest max length): shorten "
                "it, or pass \"truncation\": true in parameters to cut it")

    def results_per_item(self, output, n: int) -> list:
        """One result per input from `run(list_of_n_inputs, ...)`."""
        return list(output)

    def answer(self, inputs: RequestInputs, options: CallOptions, results: list):
        """What `run(inputs.value, options)` returns, from each item's result of a joined list call."""
        if inputs.is_list:
            return list(results)
        (result,) = results
        return result

    @property
    def continuous_batching(self) -> bool:
        """Requests may decode together in a GenerationEngine (onnxpipe.generation.engine), joining and leaving
        at step boundaries."""
        return False

    def embedding_pipeline(self) -> "Pipeline | None":
        """A pipeline over the same model that gives one vector per text (what /v1/embeddings serves), or None."""
        return None

    @property
    def chats(self) -> bool:
        """Takes a chat (messages) and has a chat template to render it."""
        return False

    def _check_item(self, item, where: str) -> None:
        if not self.accepts_item(item):
            raise InputError(f"{where} has the wrong type ({json_type(item)}) for a {self.task} model: pass "
                             + self.input_description)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={str(self.model.path)!r}, device={self.model.session_config.device!r})"


def check_batch_size(batch_size) -> int:
    if batch_size is None:
        return 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def check_bool(value, name: str) -> bool:
    """A true/false option: a front end's "yes", "no" or 1 is refused rather than taken by its truthiness (which
    transformers would do, silently)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
