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


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_rows_joining_and_leaving_in_any_order_keep_their_tokens(name, monkeypatch):
    """Random arrivals into 3 rows, so that rows leave from the middle (the last ones move into their places),
    newcomers come both shorter and longer than the batch (one side or the other moves right), padding columns
    are trimmed, and the shared buffers (llama-gqa) grow from 1 position of headroom: every request's tokens
    equal its tokens alone, and the batch stays no wider than its longest row plus a third of padding."""
    from onnxpipe.generation import batch_cache

    monkeypatch.setattr(batch_cache, "SHARED_HEADROOM", 1)
    pipe = _pipe(name)
    engine = GenerationEngine(pipe, max_running=3)
    rng = __import__("random").Random(7)
    words = "the a cat sat on mat of long and winding road to nowhere over hills".split()
    requests = {i: (" ".join(rng.choices(words, k=rng.randint(1, 14))), rng.randint(1, 16)) for i in range(14)}
    arrivals: dict = {}
    for i in requests:
        arrivals.setdefault(rng.randint(0, 40), []).append((i, requests[i][0], dict(max_new_tokens=requests[i][1],
                                                                                      do_sample=False)))
    widths, moved = [], []
    step = engine.step

    def watched_step():
        out = step()
        if engine.running:
            longest = max(seq.ids.shape[1] - 1 for seq in engine.running)  # the last token is not in the cache yet
            widths.append((engine.batch_positions, longest))
        return out

    engine.step = watched_step
    done = _drain(engine, arrivals)
    for i, (prompt, n) in requests.items():
        assert done[i].token_ids == _alone(pipe, prompt, max_new_tokens=n, do_sample=False), (name, i)
    assert all(width <= longest + max(batch_cache.TRIM_MIN, longest // 3 + 1) for width, longest in widths), widths
    assert engine.batch_positions == 0 and not engine.running


def test_shared_buffers_hold_slots_for_the_rows_that_run_not_max_running():
    """llama-gqa: a lone request's join allocates one row slot (not max_running: zeroing 16 rows of SmolLM2's
    cache cost a lone request 20-40 ms before its prefill); slots double as more rows run, up to max_running,
    rows keep their tokens through each growth, and the buffers go when the last row leaves."""
    pipe = _pipe("llama-gqa")
    engine = GenerationEngine(pipe, max_running=6)
    greedy = dict(do_sample=False)

    def slots():
        return engine._rows.buffers[0].shape[0]

    engine.add_request(0, PROMPTS[1], max_new_tokens=12, **greedy)
    engine.step()
    assert slots() == 1
    seen, done = [], {}
    arrivals = {2: [(1, PROMPTS[3], dict(max_new_tokens=10, **greedy))],
                4: [(i, PROMPTS[i], dict(max_new_tokens=6, **greedy)) for i in (2, 5, 6)],
                6: [(4, PROMPTS[0], dict(max_new_tokens=5, **greedy))]}
    for step in range(1, 60):
        for rid, prompt, kw in arrivals.get(step, []):
            engine.add_request(rid, prompt, **kw)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if engine.running:
            seen.append((len(engine.running), slots()))
        if not engine.has_unfinished() and step > max(arrivals):
            break
    assert [s for _, s in seen][:6] == [1, 2, 2, 5, 5, 6]  # rows 1, 2, 2, 5, 5, 6: slots double or fit the join
    assert all(rows <= slots <= 6 for rows, slots in seen)
    prompts = {0: (PROMPTS[1], 12), 1: (PROMPTS[3], 10), 2: (PROMPTS[2], 6), 5: (PROMPTS[5], 6), 6: (PROMPTS[6], 6),
               4: (PROMPTS[0], 5)}
    for rid, (prompt, n) in prompts.items():
        assert done[rid].token_ids == _alone(pipe, prompt, max_new_tokens=n, **greedy), rid
    assert engine._rows.buffers == []


def test_prompts_sharing_a_prefix_are_prefilled_from_where_they_part():
    """llama-gqa: prompts that start as earlier ones did (a long shared start, a conversation's next turn, a prompt
    that is an earlier one's prefix, one asked again) take the known KV and prefill the rest, alone or several
    together with different known lengths: tokens equal alone; the cache hits; none with prefix_cache_mb=0."""
    pipe = _pipe("llama-gqa")
    start = "the rules of the game are simple and everybody who plays it knows them by heart so"
    prompts = [start + " what next", start + " tell me more about the rules", start, start + " what next",
               start + " what next and then what", "zebra " + start, start + " a"]
    engine = GenerationEngine(pipe, max_running=4)
    greedy = dict(do_sample=False, max_new_tokens=6)
    arrivals = {0: [(0, prompts[0], greedy)], 3: [(i, prompts[i], greedy) for i in (1, 2, 3)],
                9: [(i, prompts[i], greedy) for i in (4, 5, 6)]}
    done = _drain(engine, arrivals)
    for i, prompt in enumerate(prompts):
        assert done[i].token_ids == _alone(pipe, prompt, **greedy), i
    prefixes = engine._rows.prefixes
    assert prefixes.hits >= 4 and prefixes.bytes > 0  # 1-4 and 6 start as 0 does; 5 does not
    cold = GenerationEngine(pipe, max_running=4, prefix_cache_mb=0)
    assert cold._rows.prefixes is None
    assert _drain(cold, arrivals)[4].token_ids == done[4].token_ids


def test_prefix_cache_keeps_whole_blocks_checks_tokens_and_evicts_the_least_recent():
    import numpy as np

    from onnxpipe.generation.prefix_cache import BLOCK, PrefixCache

    def kv(n, value):
        return [np.full((2, n, 4), value, np.float32)]

    cache = PrefixCache(max_bytes=2 * kv(3 * BLOCK, 0)[0].nbytes)
    a = np.arange(3 * BLOCK + 5)
    cache.store(a, lambda n: kv(len(a), 1.0))
    arrays, n = cache.lookup(a)
    assert n == 3 * BLOCK and arrays[0].shape == (2, 3 * BLOCK, 4)
    assert cache.lookup(a, limit=3 * BLOCK - 1)[1] == 2 * BLOCK  # a prompt keeps at least one token to feed
    b = a.copy()
    b[BLOCK + 1] = -1
    assert cache.lookup(b)[1] == BLOCK  # parts in the second block
    assert cache.lookup(np.arange(BLOCK - 1)) is None and cache.lookup(a[1:]) is None
    cache.store(np.arange(100, 100 + 3 * BLOCK), lambda n: kv(3 * BLOCK, 2.0))
    cache.lookup(a)  # a is now the most recent
    cache.store(np.arange(200, 200 + 3 * BLOCK), lambda n: kv(3 * BLOCK, 3.0))  # over max_bytes: the 100s go
    assert cache.lookup(np.arange(100, 100 + 3 * BLOCK)) is None and cache.lookup(a) is not None
    assert cache.bytes <= cache.max_bytes
    cache.store(a, lambda n: pytest.fail("a known prompt's positions were read again"))
    live = np.zeros((1, 2 * BLOCK, 4), np.float32)  # one KV head: a row's positions are contiguous, a view would do
    cache.store(np.arange(300, 300 + 2 * BLOCK), lambda n: [live])
    live[:] = 7  # the batch's row is reused
    assert cache.lookup(np.arange(300, 300 + 2 * BLOCK))[0][0].max() == 0


def test_prefix_cache_eviction_keeps_a_shared_prefix_that_another_prompt_holds():
    """Two prompts share a start (a chat template's); the newer answers for it. When the newer is evicted first
    (the older was used since), the start is still known through the older one."""
    import numpy as np

    from onnxpipe.generation.prefix_cache import BLOCK, PrefixCache

    def kv(n, value):
        return [np.full((1, n, 2), value, np.float32)]

    start = np.arange(2 * BLOCK)
    older = np.concatenate([start, np.arange(500, 500 + 2 * BLOCK)])
    newer = np.concatenate([start, np.arange(600, 600 + 2 * BLOCK)])
    cache = PrefixCache(max_bytes=2 * kv(4 * BLOCK, 0)[0].nbytes)
    cache.store(older, lambda n: kv(n, 1.0))
    cache.store(newer, lambda n: kv(n, 2.0))
    assert cache.lookup(older)[1] == 4 * BLOCK  # the older prompt is now the most recent
    cache.store(np.arange(700, 700 + 4 * BLOCK), lambda n: kv(n, 3.0))  # over max_bytes: `newer` goes
    assert cache.lookup(newer, limit=3 * BLOCK)[1] == 2 * BLOCK  # its own blocks are gone, the shared start is not
    arrays, n = cache.lookup(np.concatenate([start, np.arange(800, 800 + BLOCK)]))
    assert n == 2 * BLOCK and arrays[0][0, 0, 0] == 1.0  # answered from the older prompt's KV
    assert cache.bytes <= cache.max_bytes


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
               [{"role": "user", "content": "What is two plus two?"}],
               [{"role": "user", "content": "Name a large city in Japan."}],  # the chat template's start is known
               [{"role": "user", "content": "What is two plus two?"}]]       # asked again
    greedy = dict(max_new_tokens=16, do_sample=False)
    done = _drain(engine, {0: [(0, prompts[0], greedy)], 3: [(i, p, greedy) for i, p in enumerate(prompts[1:3], 1)],
                           7: [(3, prompts[3], greedy)], 9: [(4, prompts[4], greedy)]})
    for i, prompt in enumerate(prompts):
        assert done[i].result == pipe(prompt, **greedy), i
    assert engine._rows.prefixes.hits >= 2


# -- the server ---------------------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    gqa = tiny.export("llama", "text-generation", optimize=True, hidden_size=64, head_dim=16)
    srv = ServerProcess([f"chat={tiny.export('llama', 'text-generation')}", f"chat-gqa={gqa}"],
                        tmp_path_factory.mktemp("engine"), "--max-running", "8", "--max-queue", "16")
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
    assert metric(text, "onnxpipe_prompt_tokens_total", model="chat") >= len(lengths)


def test_a_known_prompt_prefix_is_not_prefilled_again(server):
    """chat-gqa (GroupQueryAttention, shared cache buffers): the same chat twice; the second takes the first's
    prompt KV from the prefix cache (metrics), and answers the same."""
    body = {"model": "chat-gqa", "messages": CHAT, "max_tokens": 5, "temperature": 0}
    first, second = (httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
    text = httpx.get(server.url + "/metrics").text
    prompt = metric(text, "onnxpipe_prompt_tokens_total", model="chat-gqa")
    assert prompt == 2 * first.json()["usage"]["prompt_tokens"]
    assert 0 < metric(text, "onnxpipe_prompt_tokens_cached_total", model="chat-gqa") < prompt / 2


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
