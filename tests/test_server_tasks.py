"""Every task through `onnxpipe serve`: the answer is what the in-process pipeline returns, alone or batched;
text generation streams over server-sent events; chat models answer OpenAI-style chat completions.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import assert_results_close
from test_server import GRACEFUL_EXIT, ServerProcess, metric, roundtrip

MAX_BATCH = 8
# Models whose pipelines batch for real (batch_size) without changing results: the server combines
# their concurrent requests. Feature extraction keeps padded lengths; generation loops over prompts.
BATCHED = ("fill", "qa", "ner", "emb")
MODELS = {  # served name -> (arch, task) of the tiny export
    "fill": ("bert", "fill-mask"),
    "qa": ("bert", "question-answering"),
    "ner": ("bert", "token-classification"),
    "feat": ("bert", "feature-extraction"),
    "gen": ("gpt2", "text-generation"),
    "chat": ("llama", "text-generation"),
    "t2t": ("t5", "text2text-generation"),
}


# Served with another pipeline than the manifest's task: --model emb=DIR@sentence-similarity.
OTHER_TASK = {"emb": ("feat", "sentence-similarity")}


@pytest.fixture(scope="module")
def dirs(tiny):
    found = {name: tiny.export(arch, task) for name, (arch, task) in MODELS.items()}
    return {**found, **{name: found[of] for name, (of, _) in OTHER_TASK.items()}}


@pytest.fixture(scope="module")
def pipes(dirs):
    import onnxpipe

    tasks = {name: task for name, (_, task) in OTHER_TASK.items()}
    return {name: onnxpipe.pipeline(tasks.get(name), model=str(d)) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    specs = [f"{name}={d}" + (f"@{OTHER_TASK[name][1]}" if name in OTHER_TASK else "") for name, d in dirs.items()]
    srv = ServerProcess(specs, tmp_path_factory.mktemp("server"), "--max-batch-size", str(MAX_BATCH),
                        "--max-wait-ms", "100")
    yield srv
    assert srv.stop() in GRACEFUL_EXIT, srv.log()


QA = {"question": "Where does Sarah live?", "context": "My name is Sarah and I live in London, a big city."}
QA2 = {"question": "What is my name?", "context": "My name is Clara and I live in Berkeley."}
GREEDY = {"max_new_tokens": 8, "do_sample": False}
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello to the world."}]

CASES = {  # id -> (model, inputs, parameters); "{mask}" becomes the model's mask token
    "fill-mask one text": ("fill", "Paris is the {mask} of France.", {}),
    "fill-mask list": ("fill", ["Paris is the {mask} of France.", "I {mask} you."], {}),
    "fill-mask one-item list": ("fill", ["I {mask} you."], {"top_k": 2}),
    "fill-mask targets": ("fill", "I {mask} you.", {"targets": ["love", "hate"]}),
    "qa one": ("qa", QA, {}),
    "qa list": ("qa", [QA, QA2], {}),
    "qa one-item list": ("qa", [QA2], {}),
    "qa top_k": ("qa", QA, {"top_k": 3}),
    "ner one": ("ner", "My name is Wolfgang and I live in Berlin", {}),
    "ner list, simple aggregation": ("ner", ["Sarah lives in London", "Clara works at Google"],
                                     {"aggregation_strategy": "simple"}),
    "features one": ("feat", "hello world", {}),
    "features list of different lengths": ("feat", ["hello", "a much longer sentence than that"], {}),
    "sentence embedding": ("emb", "hello world", {}),
    "sentence embeddings, list": ("emb", ["hello", "a much longer sentence than that"], {}),
    "sentence embeddings, cls pooling": ("emb", ["hello there"], {"pooling": "cls", "normalize": False}),
    "generation prompt": ("gen", "once upon a time", GREEDY),
    "generation prompts": ("gen", ["once upon a time", "the weather"], {**GREEDY, "return_full_text": False}),
    "generation chat": ("chat", CHAT, GREEDY),
    "text2text": ("t2t", "translate English to German: hello", {"max_new_tokens": 6}),
    "text2text list": ("t2t", ["summarize: the cat sat", "hello"], {"max_new_tokens": 6}),
}


def _fill_mask(inputs, mask: str):
    if isinstance(inputs, str):
        return inputs.replace("{mask}", mask)
    if isinstance(inputs, list):
        return [_fill_mask(x, mask) for x in inputs]
    return inputs


def _in_process(pipe, name, inputs, parameters):
    """The oracle: the same call the server makes for a request running alone (it sizes list batches itself)."""
    extra = {"batch_size": min(len(inputs), MAX_BATCH)} if name in BATCHED and isinstance(inputs, list) else {}
    return roundtrip(pipe(inputs, **parameters, **extra))


@pytest.mark.parametrize("name, inputs, parameters", list(CASES.values()), ids=list(CASES))
def test_each_task_answers_what_its_pipeline_returns(server, pipes, name, inputs, parameters):
    inputs = _fill_mask(inputs, pipes[name].tokenizer.mask_token or "")
    r = httpx.post(f"{server.url}/v1/models/{name}", json={"inputs": inputs, "parameters": parameters}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == _in_process(pipes[name], name, inputs, parameters)


@pytest.mark.parametrize("name", BATCHED)
def test_concurrent_requests_batched_together_each_get_their_own_answer(server, pipes, name):
    cases = [(n, _fill_mask(i, pipes[n].tokenizer.mask_token or ""), p) for n, i, p in CASES.values() if n == name]
    cases = cases * 2  # enough requests with equal parameters to share batches

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"/v1/models/{name}", json={"inputs": i, "parameters": p})
                                          for _, i, p in cases))

    # Whether a burst shares a batch depends on timing (a lone request runs at once, and a loaded
    # machine can serialise the clients): every burst's answers are checked, and one of a few bursts
    # must have shared a batch.
    shared = False
    for _ in range(5):
        before = server.metrics()
        for (_, inputs, parameters), r in zip(cases, asyncio.run(send_all())):
            assert r.status_code == 200, r.text
            # In a batch, inputs are padded to the longest: scores move by float rounding only.
            assert_results_close(r.json(), roundtrip(pipes[name](inputs, **parameters)), atol=1e-5, where=repr(inputs))
        after = server.metrics()
        batches = metric(after, "onnxpipe_batch_size_count", model=name) - metric(before, "onnxpipe_batch_size_count", model=name)
        if batches < len(cases):
            shared = True
            break
    assert shared, "no two concurrent requests shared a batch in 5 bursts"


def _events(response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("name, inputs", [("gen", "once upon a time"), ("chat", CHAT)], ids=["prompt", "chat"])
def test_generation_streams_its_text_as_server_sent_events(server, pipes, name, inputs):
    parameters = {"max_new_tokens": 24, "do_sample": False}
    with httpx.stream("POST", f"{server.url}/v1/models/{name}", timeout=60,
                      json={"inputs": inputs, "parameters": parameters, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"result": roundtrip(pipes[name](inputs, **parameters))}
    streamed = "".join(e["token"] for e in events[:-2])
    assert streamed == "".join(pipes[name].stream(inputs, **parameters))
    assert streamed  # the greedy continuation of the tiny model is not empty


def test_chat_completion_is_the_assistant_message_the_pipeline_appends(server, pipes):
    body = {"model": "chat", "messages": CHAT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = pipes["chat"](CHAT, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    assert data["object"] == "chat.completion" and data["model"] == "chat"
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected["content"]}
    assert choice["finish_reason"] in ("stop", "length")

    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


CHAT_ERRORS = {
    "not a chat model": ({"model": "gen", "messages": CHAT}, 422, "is not a chat model"),
    "unknown model": ({"model": "nope", "messages": CHAT}, 404, "no model named 'nope'"),
    "no messages": ({"model": "chat"}, 422, "'messages' must be a non-empty list"),
    "bad message": ({"model": "chat", "messages": [{"role": "user"}]}, 422, "wrong type"),
    "unsupported field": ({"model": "chat", "messages": CHAT, "tools": []}, 422, "unsupported field(s) tools"),
    "negative temperature": ({"model": "chat", "messages": CHAT, "temperature": -1}, 422, "temperature"),
    "chat longer than the model": ({"model": "chat", "messages": [{"role": "user", "content": "word " * 400}]},
                                   422, "tokens"),
}


@pytest.mark.parametrize("body, status, message", list(CHAT_ERRORS.values()), ids=list(CHAT_ERRORS))
def test_bad_chat_request_gets_a_clear_4xx(server, body, status, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]  # OpenAI's error shape on the OpenAI routes


def test_generation_longer_than_the_model_positions_is_refused(server, dirs):
    limit = json.loads((dirs["gen"] / "onnxpipe.json").read_text())["max_positions"]
    r = httpx.post(f"{server.url}/v1/models/gen", json={"inputs": "once upon a time",
                                                       "parameters": {"max_new_tokens": limit}}, timeout=60)
    assert r.status_code == 422 and f"at most {limit} positions" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/models/gen", json={"inputs": "word " * (limit + 10)}, timeout=60)
    assert r.status_code == 422 and "tokens long" in r.json()["error"]
