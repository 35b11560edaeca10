"""The server under faults, as a real process on loopback: overload, clients that vanish, shutdown, long runs.

Every request must be answered with a clear status (200, or 503 with Retry-After when the queue
is full), the server must stay up and recover, and its memory must not grow with the request count.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from test_server import GRACEFUL_EXIT, ServerProcess, metric


@pytest.fixture(scope="module")
def clf_dir(tiny):
    return tiny.export("bert", "text-classification")


@pytest.fixture(scope="module")
def gen_dir(tiny):
    return tiny.export("gpt2", "text-generation")


async def _fire(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    """POST every body, `concurrency` at a time, and return every response (transport errors raise)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(body):
            async with sem:
                return await client.post(url, json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_overload_gets_503_with_retry_after_then_recovers(clf_dir, tmp_path):
    # One request waiting at most, no batching: 64 clients at once must overflow it.
    srv = ServerProcess([f"sst={clf_dir}"], tmp_path, "--max-queue", "1", "--max-batch-size", "1")
    try:
        url = f"{srv.url}/v1/models/sst"
        text = "a sentence long enough to keep the model busy for a little while " * 6
        statuses = []
        for wave in range(20):  # bounded: stop at the first wave that overflowed
            responses = asyncio.run(_fire(url, [{"inputs": f"{wave} {i} {text}"} for i in range(64)], 64))
            for r in responses:
                assert r.status_code in (200, 503), r.text
                if r.status_code == 503:
                    assert r.headers["Retry-After"] == "1"
                    assert "overloaded" in r.json()["error"]
                else:
                    assert r.json()[0]["label"] in ("NEGATIVE", "POSITIVE")
            statuses += [r.status_code for r in responses]
            if 503 in statuses:
                break
        assert 503 in statuses, "64 concurrent clients never filled a queue of 1"
        # Recovered: sequential requests all succeed, nothing is left queued.
        for i in range(5):
            assert httpx.post(url, json={"inputs": f"calm {i}"}, timeout=30).status_code == 200
        text = srv.metrics()
        assert metric(text, "onnxpipe_queue_depth", model="sst") == 0
        assert metric(text, "onnxpipe_requests_total", model="sst", endpoint="/v1/models/{name}", status="503") \
            == statuses.count(503)
        assert metric(text, "onnxpipe_requests_total", model="sst", endpoint="/v1/models/{name}", status="200") \
            == statuses.count(200) + 5
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()


# The tiny GPT-2 takes 256 positions: a prompt of a few tokens leaves room for this many new ones.
MAX_NEW = 240
# A client process that starts a streamed generation, reads the first event and is killed by SIGKILL.
_STREAM_CLIENT = """
import sys, httpx
n = int(sys.argv[2])
with httpx.stream("POST", sys.argv[1], json={"inputs": "once upon a time", "stream": True,
                  "parameters": {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}},
                  timeout=60) as r:
    for line in r.iter_lines():
        if line.startswith("data: "):
            print("first event", flush=True)
            break
    sys.stdin.read()  # hold the connection open until killed
"""


def test_client_killed_mid_stream_frees_the_worker(gen_dir, tmp_path):
    # One worker thread: if the killed stream kept generating, the next request would never run.
    srv = ServerProcess([f"gen={gen_dir}"], tmp_path, "--timeout", "60")
    try:
        url = f"{srv.url}/v1/models/gen"
        client = subprocess.Popen([sys.executable, "-c", _STREAM_CLIENT, url, str(MAX_NEW)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "first event"
        client.send_signal(signal.SIGKILL)
        client.wait()
        deadline = time.monotonic() + 30
        while metric(srv.metrics(), "onnxpipe_streams_cancelled_total", model="gen") < 1:
            assert time.monotonic() < deadline, "the killed client's generation was never stopped"
            time.sleep(0.05)
        # It stopped early: fewer tokens than the MAX_NEW it was asked for.
        assert 0 < metric(srv.metrics(), "onnxpipe_stream_tokens_total", model="gen") < MAX_NEW
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 5, "do_sample": False}}
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(srv.url + "/health").status_code == 200
        assert metric(srv.metrics(), "onnxpipe_queue_depth", model="gen") == 0
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()


@pytest.fixture(scope="module")
def t2t_dir(tiny):
    return tiny.export("t5", "text2text-generation")


# A long generation (T5 has no position limit) keeps the model's only worker busy for a while.
BLOCKER = {"inputs": "hello", "parameters": {"max_new_tokens": 400, "min_new_tokens": 400}}


def _start_blocker(srv, model: str) -> tuple[threading.Thread, dict]:
    """Send BLOCKER from a thread and return once the server has it in flight."""
    result = {}

    def send():
        result["r"] = httpx.post(f"{srv.url}/v1/models/{model}", json=BLOCKER, timeout=120)

    before = metric(srv.metrics(), "onnxpipe_requests_in_flight")
    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 30
    while metric(srv.metrics(), "onnxpipe_requests_in_flight") <= before:
        assert time.monotonic() < deadline, "the long request never arrived"
        time.sleep(0.01)
    return thread, result


def test_client_gone_while_queued_is_dropped_and_server_keeps_serving(t2t_dir, tmp_path):
    srv = ServerProcess([f"t2t={t2t_dir}"], tmp_path, "--timeout", "120")
    try:
        url = f"{srv.url}/v1/models/t2t"
        blocker, result = _start_blocker(srv, "t2t")

        async def impatient():
            async with httpx.AsyncClient(timeout=0.2) as client:
                return await asyncio.gather(*(client.post(url, json={"inputs": f"impatient {i}"}) for i in range(5)),
                                            return_exceptions=True)

        outcomes = asyncio.run(impatient())
        assert all(isinstance(o, httpx.ReadTimeout) for o in outcomes), outcomes
        blocker.join(120)
        assert result["r"].status_code == 200, result["r"].text
        assert httpx.post(url, json={"inputs": "patient"}, timeout=60).status_code == 200
        text = srv.metrics()
        # 499 (nginx's "client closed request") counts requests dropped unanswered; none of them ran.
        assert metric(text, "onnxpipe_requests_total", model="t2t", endpoint="/v1/models/{name}", status="499") == 5
        assert metric(text, "onnxpipe_batch_size_count", model="t2t") == 2
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()


def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(t2t_dir, tmp_path):
    srv = ServerProcess([f"t2t={t2t_dir}"], tmp_path, "--timeout", "120")
    blocker, result = _start_blocker(srv, "t2t")
    srv.proc.send_signal(signal.SIGTERM)
    # While the long request is still running, the listening socket is already closed.
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(srv.url + "/health", timeout=5)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            # refused, or accepted just before the listener closed and then closed unanswered by the shutdown
            break
        assert time.monotonic() < deadline, "the server kept accepting connections after SIGTERM"
        time.sleep(0.01)
    assert blocker.is_alive(), "the in-flight request ended before new connections were refused"
    blocker.join(120)
    r = result["r"]
    assert r.status_code == 200, r.text
    assert isinstance(r.json()[0]["generated_text"], str)
    assert srv.proc.wait(60) in GRACEFUL_EXIT
    assert "Application shutdown complete" in srv.log()


def test_request_past_its_timeout_gets_504_and_the_server_keeps_serving(t2t_dir, clf_dir, tmp_path):
    srv = ServerProcess([f"t2t={t2t_dir}", f"sst={clf_dir}"], tmp_path, "--timeout", "0.5", "--max-new-tokens", "2000")
    try:
        r = httpx.post(f"{srv.url}/v1/models/t2t", timeout=60,
                       json={"inputs": "hello", "parameters": {"max_new_tokens": 2000, "min_new_tokens": 2000}})
        assert r.status_code == 504 and "did not answer within 0.5 s" in r.json()["error"]
        assert httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": "fine"}, timeout=30).status_code == 200
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()


def test_memory_stays_flat_over_thousands_of_requests(clf_dir, tmp_path):
    srv = ServerProcess([f"sst={clf_dir}"], tmp_path, "--max-batch-size", "8", "--max-wait-ms", "2")
    try:
        url = f"{srv.url}/v1/models/sst"
        bodies = [{"inputs": f"request number {i} says hello"} for i in range(500)]
        bad = [{"inputs": 5}, {"inputs": ["x"], "parameters": {"top_k": "a"}}, {"nope": 1}]
        # Warm up: allocator pools, ONNX Runtime arenas and caches reach their working size first.
        asyncio.run(_fire(url, bodies, 8))
        rss = [srv.rss()]
        for _ in range(6):  # 3000 good requests (+ 300 bad ones) after the warm-up
            responses = asyncio.run(_fire(url, bodies + bad * 100, 16))
            assert {r.status_code for r in responses} == {200, 422}
            rss.append(srv.rss())
        growth_mib = (rss[-1] - rss[0]) / 2**20
        assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB over 3300 requests: {[r >> 20 for r in rss]} MiB"
        assert metric(srv.metrics(), "onnxpipe_queue_depth", model="sst") == 0
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()
