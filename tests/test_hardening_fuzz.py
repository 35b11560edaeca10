"""Property-based fuzzing (hypothesis, bounded) of what strangers control: request bodies as the server parses and
checks them, and model folders' manifests as the runtime loads them. Anything may be refused, with the clear error
types of each layer (RequestError with a 4xx, ValueError/TypeError); nothing may raise anything else."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxpipe
from onnxpipe.server.errors import RequestError
from onnxpipe.server.exchange import parse_json_body

FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
# the names pipelines take, so that values reach their checks, and others
parameter_names = st.sampled_from([
    "top_k", "truncation", "max_length", "padding", "function_to_apply", "return_all_scores", "max_new_tokens",
    "do_sample", "num_beams", "temperature", "top_p", "repetition_penalty", "stop_strings", "seed",
    "num_return_sequences", "return_full_text", "aggregation_strategy", "stride", "doc_stride", "targets",
    "max_answer_len", "handle_impossible_answer", "pooling", "normalize", "tokenize_kwargs", "early_stopping",
    "length_penalty", "no_repeat_ngram_size", "min_new_tokens", "bos_token_id", "eos_token_id", "prefix",
    "continue_final_message", "skip_special_tokens", "batch_size", "ignore_labels", "is_split_into_words"]) | st.text(max_size=10)
parameters = st.dictionaries(parameter_names, json_values, max_size=4)

TASKS = {"text-classification": ("bert", "text-classification"), "question-answering": ("bert", "question-answering"),
         "token-classification": ("bert", "token-classification"), "fill-mask": ("bert", "fill-mask"),
         "sentence-similarity": ("bert", "feature-extraction"), "text-generation": ("llama", "text-generation"),
         "summarization": ("t5", "text2text-generation")}


@pytest.fixture(scope="module")
def pipes(tiny):
    return {task: onnxpipe.pipeline(task, model=tiny.export(*src)) for task, src in TASKS.items()}


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) |
       st.builds(lambda v: json.dumps({"inputs": v, "parameters": {}}).encode(), json_values))
def test_request_bodies_parse_or_get_a_4xx(body):
    try:
        assert isinstance(parse_json_body(body), dict)
    except RequestError as e:
        assert 400 <= e.status < 500


@pytest.mark.parametrize("task", sorted(TASKS))
def test_request_inputs_and_parameters_are_accepted_or_refused_clearly(pipes, task):
    pipe = pipes[task]

    @FUZZ
    @given(json_values | st.lists(json_values, max_size=3), parameters)
    def check(inputs, params):
        try:
            options = pipe.check_parameters(params)
            request = pipe.split_inputs(inputs)
            for item in request.items:
                pipe.check_input_length(item, options)
                pipe.count_input_tokens(item)
            pipe.generation_work(options)
        except (ValueError, TypeError):
            pass

    check()


@pytest.mark.parametrize("task", ["text-classification", "text-generation"])
def test_accepted_requests_run_or_are_refused_clearly(pipes, task):
    """What passes the checks also runs (small budgets: the run itself is the slow part)."""
    pipe = pipes[task]

    @settings(max_examples=40, deadline=None)
    @given(st.text(max_size=40) | st.lists(st.text(max_size=20), min_size=1, max_size=3),
           st.dictionaries(st.sampled_from(["top_k", "truncation", "function_to_apply", "do_sample", "temperature",
                                            "top_p", "repetition_penalty", "seed", "no_repeat_ngram_size"]),
                           json_values, max_size=3))
    def check(inputs, params):
        if task == "text-generation":
            params = {**params, "max_new_tokens": 2}
        try:
            options = pipe.check_parameters(params)
            request = pipe.split_inputs(inputs)
            json.dumps(pipe.run(request.value, options), default=lambda o: o.tolist(), allow_nan=False)
        except (ValueError, TypeError):
            pass

    check()


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    dest = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny.export("bert", "text-classification"), dest)
    return dest


def _paths(value, prefix=()):
    """Every key path in a JSON object."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


def test_damaged_manifests_load_or_are_refused_clearly(folder):
    original = json.loads((folder / "onnxpipe.json").read_text())
    paths = sorted(_paths(original))

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(paths), json_values | st.just("DELETE")), min_size=1, max_size=3))
    def check(changes):
        manifest = json.loads(json.dumps(original))
        for path, value in changes:
            parent = manifest
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                continue
            if value == "DELETE":
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
        (folder / "onnxpipe.json").write_text(json.dumps(manifest))
        try:
            model = onnxpipe.ModelDir(folder)
            onnxpipe.pipeline(model=model)
        except (ValueError, TypeError, FileNotFoundError):
            pass

    try:
        check()
    finally:
        (folder / "onnxpipe.json").write_text(json.dumps(original))
