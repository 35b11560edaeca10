"""Continuous batching (onnxpipe.generation.engine, and the server's generation workers): requests that decode
together, joining and leaving at step boundaries, get exactly the tokens each gets served alone."""
from __future__ import annotations

import asyncio
import json
import warnings

import httpx
import pytest

import onnxpipe
from onnxpipe.generation.engine import GenerationEngine
from test_server import GRACEFUL_EXIT, ServerProcess, metric

EXPORTS = {"gpt2": ("gpt2", {}), "llama": ("llama", {}),
           "llama-gqa": ("llama", dict(optimize=True, hidden_size=64, head_dim=16))}
PROMPTS = ["hello there", "once upon a time in a land far away", "a", "the quick brown fox jumps", "", "zebra",
           "one two three four five six seven"]
NEW_TOKENS = [5, 9, 3, 12, 7, 4, 6]


def _pipe(name):
    from conftest import tiny_export

    arch, options = EXPORTS[name]
    return onnxpipe.pipeline("text-generation", model=tiny_export(arch, "text-generation", **options))


def _alone(pipe, prompt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = pipe(prompt, return_tensors=True, **kw)[0]["generated_token_ids"]
    return ids[max(pipe.preprocess(prompt)["input_ids"].shape[1], 1):]


def _drain(engine, arrivals: dict, abort_at: dict | None = None) -> dict:
    """Step until done; arrivals: step -> [(id, prompt, kwargs)], abort_at: step -> ids. -> {id: RequestOutput}."""
    done, step = {}, 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, kw in arrivals.get(step, []):
            engine.add_request(rid, prompt, **kw)
        for rid in (abort_at or {}).get(step, []):
            engine.abort(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 500
    return done


@pytest.mark.parametrize("name", list(EXPORTS))
def test_requests_joining_at_different_steps_get_their_tokens_alone(name):
    pipe = _pipe(name)
    engine = GenerationEngine(pipe, max_running=4)
    greedy = dict(do_sample=False)
    arrivals = {0: [(i, PROMPTS[i], dict(max_new_tokens=NEW_TOKENS[i], **greedy)) for i in range(3)],
                2: [(i, PROMPTS[i], dict(max_new_tokens=NEW_TOKENS[i], **greedy)) for i in range(3, 6)],
                5: [(6, PROMPTS[6], dict(max_new_tokens=NEW_TOKENS[6], **greedy))]}
    done = _drain(engine, arrivals)
    for i, prompt in enumerate(PROMPTS):
        assert done[i].token_ids == _alone(pipe, prompt, max_new_tokens=NEW_TOKENS[i], **greedy), (name, i)
        assert done[i].finish_reason in ("length", "stop")
        assert done[i].result == pipe(prompt, max_new_tokens=NEW_TOKENS[i], **greedy)
    assert engine.batch_positions == 0 and not engine.running  # every row has left


def test_abort_stop_strings_max_tokens_and_sampling_per_request():
    pipe = _pipe("llama")
    engine = GenerationEngine(pipe, max_running=8)
    alone = _alone(pipe, PROMPTS[1], max_new_tokens=12, do_sample=False)
    stop = pipe.tokenizer.decode(alone[2:4])  # a stop string the greedy continuation meets at its 4th token
    sample = dict(do_sample=True, temperature=0.8, top_k=20, seed=5, max_new_tokens=8)
    arrivals = {0: [("long", PROMPTS[0], dict(max_new_tokens=30, do_sample=False)),
                    ("stop", PROMPTS[1], dict(max_new_tokens=12, do_sample=False, stop_strings=[stop])),
                    ("max", PROMPTS[3], dict(max_new_tokens=2, do_sample=False))],
                1: [("sampled", PROMPTS[2], sample)]}
    done = _drain(engine, arrivals, abort_at={4: ["long"]})
    assert done["long"].finish_reason == "aborted" and 0 < len(done["long"].token_ids) < 30
    assert done["stop"].token_ids == _alone(pipe, PROMPTS[1], max_new_tokens=12, do_sample=False, stop_strings=[stop])
    assert done["stop"].finish_reason == "stop"
    assert done["max"].finish_reason == "length" and len(done["max"].token_ids) == 2
    assert done["sampled"].token_ids == _alone(pipe, PROMPTS[2], **sample)  # its own generator, its own seed


def test_beam_search_is_refused_clearly():
    engine = GenerationEngine(_pipe("gpt2"))
    with pytest.raises(ValueError, match="beam search"):
        engine.add_request("b", "hello", num_beams=2, max_new_tokens=3)


def test_no_cache_leaks_over_a_thousand_requests():
    import psutil

    pipe = _pipe("gpt2")
    engine = GenerationEngine(pipe, max_running=8)
    process = psutil.Process()

    def wave(offset):
        for i in range(250):
            engine.add_request(offset + i, PROMPTS[i % len(PROMPTS)] or "x", max_new_tokens=1 + i % 4, do_sample=False)
        while engine.has_unfinished():
            engine.step()

    wave(0)
    start = process.memory_info().rss
    for w in range(1, 4):
        wave(w * 1000)
    assert engine.batch_positions == 0 and not engine.running and not engine._ids
    assert process.memory_info().rss - start < 30 << 20


@pytest.mark.slow
def test_real_smollm2_requests_decoded_together_equal_alone():
    from conftest import real_export

    pipe = onnxpipe.pipeline("text-generation", model=real_export("smollm2"))
    engine = GenerationEngine(pipe)
    prompts = ["The capital of France is", "Once upon a time, in a small village,",
               [{"role": "user", "content": "What is two plus two?"}]]
    done = _drain(engine, {0: [(0, prompts[0], dict(max_new_tokens=16, do_sample=False))],
                           3: [(i, p, dict(max_new_tokens=16, do_sample=False)) for i, p in enumerate(prompts[1:], 1)]})
    for i, prompt in enumerate(prompts):
        assert done[i].result == pipe(prompt, max_new_tokens=16, do_sample=False), i


# -- the server ---------------------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = ServerProcess([f"chat={tiny.export('llama', 'text-generation')}"], tmp_path_factory.mktemp("engine"),
                        "--max-running", "8", "--max-queue", "16")
    yield srv
    assert srv.stop() in GRACEFUL_EXIT, srv.log()
    assert "Traceback" not in srv.log()


async def _stream_chat(url, max_tokens, client):
    body = {"model": "chat", "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        text = ""
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
        return text


def test_chat_streams_under_concurrency_decode_together(server, tiny):
    pipe = onnxpipe.pipeline("text-generation", model=tiny.export("llama", "text-generation"))
    lengths = [4, 12, 8, 16, 6, 10]
    expected = [pipe(CHAT, max_new_tokens=n, do_sample=False)[0]["generated_text"][-1]["content"] for n in lengths]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(_stream_chat(server.url, n, client) for n in lengths))

    assert asyncio.run(run()) == expected
    text = httpx.get(server.url + "/metrics").text
    steps = metric(text, "onnxpipe_tokens_per_step_count", model="chat")
    tokens = metric(text, "onnxpipe_tokens_per_step_sum", model="chat")
    assert tokens > steps, "no step decoded more than one sequence"
    assert metric(text, "onnxpipe_time_to_first_token_seconds_count", model="chat") >= len(lengths)
    assert metric(text, "onnxpipe_running_sequences", model="chat") == 0


def test_overload_gets_503_and_recovers(server):
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "chat", "messages": CHAT, "max_tokens": 30, "temperature": 0}
            return await asyncio.gather(*(client.post(f"{server.url}/v1/chat/completions", json=body)
                                          for _ in range(80)))

    statuses = [r.status_code for r in asyncio.run(run())]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"model": "chat", "messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
