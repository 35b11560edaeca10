"""The pipelines' public request contract (base.py), which the server and other front ends call instead of knowing
tasks: a request's inputs split, checked and joined with others' into one list call must give each request exactly
what the in-process call gives; parameters are checked once; the session settings are one object."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import onnxpipe
from onnxpipe.base import InputError
from onnxpipe.task_table import SUPPORTED_TASKS, TASK_ALIASES, export_task, normalize_task, task_names
from test_serve_time_imports import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]

# task -> (single inputs, a second input for lists, call options); JSON values, as a client sends them
REQUESTS = {
    "text-classification": ("I love this.", {"text": "a pair", "text_pair": "of texts"}, {}),
    "token-classification": ("John lives in Paris.", "Mary works in Berlin.", {"aggregation_strategy": "simple"}),
    "question-answering": ({"question": "Where?", "context": "John lives in Paris."},
                           {"question": "Who?", "context": "Mary works in Berlin."}, {"top_k": 2}),
    "fill-mask": ("John lives in {mask}.", "Paris is the {mask} of France.", {"top_k": 3}),
    "feature-extraction": ("a short text", "another, longer text", {}),
    "sentence-similarity": ("a short text", "another, longer text", {}),
    "text-generation": ("Once upon a time", "The", {"max_new_tokens": 4, "do_sample": False}),
    "text2text-generation": ("hello there", "a second text", {"max_new_tokens": 3}),
    "summarization": ("a long text to summarize", "another", {"max_new_tokens": 3}),
    "translation": ("hello", "goodbye", {"max_new_tokens": 3}),
}


@pytest.fixture(scope="module")
def pipes(tiny):
    return {task: onnxpipe.pipeline(task, model=tiny.export(*TINY_MODEL[task])) for task in REQUESTS}


def _fill(pipe, value):
    if isinstance(value, str) and "{mask}" in value:
        return value.replace("{mask}", pipe.tokenizer.mask_token)
    return value


def _json(result):
    return json.loads(json.dumps(result, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o.item()))


def test_the_task_table_covers_every_task_and_alias():
    assert set(REQUESTS) == set(SUPPORTED_TASKS)
    for alias, task in TASK_ALIASES.items():
        assert normalize_task(alias) == task
    assert export_task("summarization") == "text2text-generation" and export_task("causal-lm") == "text-generation"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        normalize_task("nope")
    assert "sentiment-analysis" in task_names()


@pytest.mark.parametrize("task", sorted(REQUESTS))
def test_joined_requests_get_what_each_would_get_alone(pipes, task):
    """The server's batching rule, through the contract only: two requests (one single input, one list) joined into
    one list call, split back with results_per_item and answered with answer(), equal pipe(inputs) for each."""
    pipe = pipes[task]
    first, second, params = REQUESTS[task]
    first, second = _fill(pipe, first), _fill(pipe, second)
    options = pipe.check_parameters(params)
    requests = [pipe.split_inputs(first), pipe.split_inputs([second]), pipe.split_inputs([first, second])]
    items = [item for r in requests for item in r.items]
    if pipe.joins_requests:
        results = pipe.results_per_item(pipe.run(items, options, batch_size=len(items)), len(items))
    else:  # each request runs as sent (and so as its own list call)
        results = [res for r in requests for res in pipe.results_per_item(pipe.run(r.items, options), len(r.items))]
    at = 0
    for r in requests:
        part, at = results[at:at + len(r.items)], at + len(r.items)
        if pipe.joins_requests or r.is_list:
            assert _json(pipe.answer(r, options, part)) == _json(pipe(r.value, **params)), (task, r)


@pytest.mark.parametrize("task", sorted(REQUESTS))
def test_run_with_checked_options_equals_the_call(pipes, task):
    pipe = pipes[task]
    first, _, params = REQUESTS[task]
    first = _fill(pipe, first)
    assert _json(pipe.run(first, pipe.check_parameters(params))) == _json(pipe(first, **params))


@pytest.mark.parametrize("task", sorted(REQUESTS))
def test_inputs_of_the_wrong_json_type_are_named(pipes, task):
    pipe = pipes[task]
    with pytest.raises(InputError, match=re.escape("inputs[1] has the wrong type (number)")):
        pipe.split_inputs([REQUESTS[task][0], 5])
    with pytest.raises(InputError, match="empty list"):
        pipe.split_inputs([])
    with pytest.raises(InputError, match="needs 'inputs'"):
        pipe.split_inputs(None)


def test_a_chat_is_one_input_and_a_list_of_chats_is_a_batch(pipes):
    pipe = pipes["text-generation"]
    chat = [{"role": "user", "content": "hi"}]
    assert not pipe.split_inputs(chat).is_list
    assert pipe.split_inputs([chat, chat]).is_list
    with pytest.raises(InputError, match="wrong type"):
        pipe.split_inputs([{"role": "user"}])


def test_length_checks_say_the_limit_and_skip_what_the_pipeline_cuts(pipes):
    clf = pipes["text-classification"]
    limit = clf.max_input_tokens
    long_text = "word " * (limit + 10)
    with pytest.raises(ValueError, match=f"inputs is .* tokens long; this model takes at most {limit} tokens"):
        clf.check_input_length(long_text, clf.check_parameters({}))
    assert clf.check_input_length(long_text, clf.check_parameters({"truncation": True})) is None
    assert clf.check_input_length("short", clf.check_parameters({})) == clf.tokenizer.count_tokens("short")
    qa = pipes["question-answering"]
    assert qa.check_input_length({"question": "q", "context": long_text}, qa.check_parameters({})) is None
    gen = pipes["text-generation"]
    positions = gen.max_input_tokens
    with pytest.raises(ValueError, match=f"plus max_new_tokens={positions}; this model takes at most {positions} positions"):
        gen.check_input_length("hello", gen.check_parameters({"max_new_tokens": positions}))


def test_generation_options_are_checked_once_per_call(pipes, monkeypatch):
    """check_parameters resolves and validates; the run and generate() then take the plan as it is."""
    from onnxpipe.generation import config as config_mod
    from onnxpipe.generation import generate as generate_mod

    gen = pipes["text-generation"]
    calls = []
    real = config_mod.validate
    monkeypatch.setattr(generate_mod, "validate", lambda c: (calls.append(c), real(c))[1])
    gen("Once", max_new_tokens=2, do_sample=False)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="TextGenerationPipeline got unexpected arguments: bogus"):
        gen.check_parameters({"bogus": 1})
    with pytest.raises(ValueError, match="top_p"):
        gen.check_parameters({"do_sample": True, "top_p": 3})


def test_bad_construction_options_fail_at_construction(tiny):
    with pytest.raises(ValueError, match="num_beams"):
        onnxpipe.pipeline("text-generation", model=tiny.export("gpt2", "text-generation"), num_beams=0)


def test_cuda_asked_for_on_a_cpu_only_machine_reports_cpu(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA: see the cuda-marked tests")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pipe = onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification"), device="cuda")
        assert pipe.device == "cpu"
    assert pipe.model.session_config.device == "cuda"  # what was asked for stays readable


def test_session_settings_are_one_object_passed_intact(tiny):
    config = onnxpipe.SessionConfig(intra_op_num_threads=1, allow_spinning=False, cache=False)
    pipe = onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification"),
                             session_config=config)
    session = pipe.model.session()
    assert session.config is config
    assert session.options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert session.options.intra_op_num_threads == 1
    with pytest.raises(TypeError, match="not both"):
        onnxpipe.pipeline("text-classification", model=tiny.export("bert", "text-classification"),
                          session_config=config, intra_op_num_threads=2)


def test_thread_counts_above_the_cpu_count_are_capped_with_a_warning():
    import os

    with pytest.warns(RuntimeWarning, match="more than this machine"):
        config = onnxpipe.SessionConfig(intra_op_num_threads=10**6)
    assert config.intra_op_num_threads == os.cpu_count()


def test_the_server_names_no_task():
    """Front ends call the contract: no task name (nor a `task ==` test) in the server's code."""
    # one-word aliases ("chat", "ner") are also ordinary field names (the model list's "chat": true)
    names = set(SUPPORTED_TASKS) | {alias for alias in TASK_ALIASES if "-" in alias}
    for path in sorted((ROOT / "runtime" / "server").glob("*.py")):
        source = path.read_text()
        assert "task ==" not in source, path
        quoted = {n for n in names if f'"{n}"' in source or f"'{n}'" in source}
        assert not quoted, f"{path.name} names tasks {quoted}"
