"""`onnxpipe serve` as a real process on loopback: answers equal the in-process pipeline, errors are clear 4xx.

The oracle for every answer is `onnxpipe.pipeline(model=DIR)(inputs, **parameters)` run in this
process (itself checked against transformers by the task tests), sent through JSON.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import assert_results_close

LOOPBACK = "127.0.0.1"
# uvicorn re-raises the SIGTERM it handled once shutdown is complete, so a clean stop exits by that signal.
GRACEFUL_EXIT = (0, -signal.SIGTERM)


class ServerProcess:
    """`python -m onnxpipe.cli serve ...` on a free loopback port, waited for until /ready answers 200."""

    def __init__(self, models: list[str], log_dir: Path, *options: str, ready_within_s: float = 120,
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        args = [sys.executable, "-m", "onnxpipe.cli", "serve", "--host", LOOPBACK, "--port", str(self.port)]
        for m in models:
            args += ["--model", str(m)]
        # Output goes to a file: an unread pipe would fill up and block the server.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*args, *options], stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(ready_within_s)

    def _wait_ready(self, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready within {within_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def roundtrip(result):
    """What the in-process result looks like after JSON, as the server sends it."""
    import numpy as np

    def default(o):
        return o.tolist() if isinstance(o, np.ndarray) else o.item()

    return json.loads(json.dumps(result, default=default))


@pytest.fixture(scope="module")
def clf_dir(tiny):
    return tiny.export("bert", "text-classification")


@pytest.fixture(scope="module")
def clf(clf_dir):
    import onnxpipe

    return onnxpipe.pipeline(model=str(clf_dir))


@pytest.fixture(scope="module")
def server(clf_dir, tmp_path_factory):
    # A long batching window so that concurrent requests are sure to meet in one batch.
    srv = ServerProcess([f"sst={clf_dir}"], tmp_path_factory.mktemp("server"), "--max-batch-size", "8",
                        "--max-wait-ms", "100", "--max-body-bytes", "65536")
    yield srv
    assert srv.stop() in GRACEFUL_EXIT, srv.log()
    assert "Application shutdown complete" in srv.log()


LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 80  # ~720 tokens > the tiny model's 512

CLASSIFY_CASES = {
    "one text": ("I love this movie", {}),
    "list of texts": (["I love this movie", "awful", "a plain, ordinary day"], {}),
    "one-item list": (["a plain, ordinary day"], {}),
    "text pair": ({"text": "is it good?", "text_pair": "it is great"}, {}),
    "top_k=None": ("I love this movie", {"top_k": None}),
    "top_k=1 on a list": (["I love this movie", "awful"], {"top_k": 1}),
    "sigmoid": ("awful", {"function_to_apply": "sigmoid"}),
    "long text, truncation=true": (LONG_TEXT, {"truncation": True}),
}


@pytest.mark.parametrize("inputs, parameters", list(CLASSIFY_CASES.values()), ids=list(CLASSIFY_CASES))
def test_predict_returns_what_the_pipeline_returns(server, clf, inputs, parameters):
    r = httpx.post(f"{server.url}/v1/models/sst", json={"inputs": inputs, "parameters": parameters}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == roundtrip(clf(inputs, **parameters))


def test_concurrent_requests_run_as_one_batch_and_each_gets_its_own_answer(server, clf):
    cases = [("I love this movie", {}), (["awful", "fine"], {}), (["fine"], {}), ("meh", {"top_k": None}),
             ({"text": "is it good?", "text_pair": "yes"}, {}), ("great", {}), (["x", "y", "z"], {"top_k": 2}),
             ("not bad", {})]
    before = server.metrics()

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/models/sst", json={"inputs": i, "parameters": p})
                                          for i, p in cases))

    responses = asyncio.run(send_all())
    for (inputs, parameters), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        # Padding to the batch's longest input moves scores by float rounding only.
        assert_results_close(r.json(), roundtrip(clf(inputs, **parameters)), atol=1e-5, where=repr(inputs))
    after = server.metrics()
    batches = metric(after, "onnxpipe_batch_size_count", model="sst") - metric(before, "onnxpipe_batch_size_count", model="sst")
    inputs_run = metric(after, "onnxpipe_batch_size_sum", model="sst") - metric(before, "onnxpipe_batch_size_sum", model="sst")
    assert inputs_run == sum(len(i) if isinstance(i, list) else 1 for i, _ in cases)
    assert batches < len(cases), "no two concurrent requests were batched together"


def test_health_ready_and_model_list(server, clf_dir):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "models": {"sst": "text-classification"}}
    (model,) = httpx.get(server.url + "/v1/models").json()["data"]
    manifest = json.loads((Path(clf_dir) / "onnxpipe.json").read_text())
    assert model["name"] == "sst" and model["task"] == "text-classification"
    assert model["max_input_tokens"] == min(manifest["tokenizer"]["model_max_length"], manifest["max_positions"])


def test_metrics_are_prometheus_text_with_counts_latency_batches_and_queue(server):
    httpx.post(f"{server.url}/v1/models/sst", json={"inputs": "hello"})
    httpx.post(f"{server.url}/v1/models/nope", json={"inputs": "hello"})
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name, kind in [("onnxpipe_requests_total", "counter"), ("onnxpipe_request_duration_seconds", "histogram"),
                       ("onnxpipe_batch_size", "histogram"), ("onnxpipe_queue_depth", "gauge")]:
        assert f"# TYPE {name} {kind}" in text
    assert metric(text, "onnxpipe_requests_total", model="sst", endpoint="/v1/models/{name}", status="200") >= 1
    assert metric(text, "onnxpipe_requests_total", model="", endpoint="/v1/models/{name}", status="404") >= 1
    assert metric(text, "onnxpipe_queue_depth", model="sst") == 0
    count = metric(text, "onnxpipe_request_duration_seconds_count", model="sst")
    assert metric(text, "onnxpipe_request_duration_seconds_bucket", model="sst", le="+Inf") == count >= 1


BAD_REQUESTS = {
    "bad JSON": (dict(content=b'{"inputs": "unterminated'), 400, "not valid JSON"),
    "body not an object": (dict(json=["a", "b"]), 422, "must be a JSON object"),
    "no inputs": (dict(json={"parameters": {}}), 422, "needs 'inputs'"),
    "inputs a number": (dict(json={"inputs": 3}), 422, "inputs has the wrong type (number)"),
    "list with a number": (dict(json={"inputs": ["ok", 5]}), 422, "inputs[1] has the wrong type (number)"),
    "empty list": (dict(json={"inputs": []}), 422, "empty list"),
    "parameters not an object": (dict(json={"inputs": "a", "parameters": [1]}), 422, "'parameters' must be a JSON object"),
    "bad parameter value": (dict(json={"inputs": "a", "parameters": {"top_k": "two"}}), 422, "top_k"),
    "unknown parameter": (dict(json={"inputs": "a", "parameters": {"temperature": 0.5}}), 422, "temperature"),
    "unknown field": (dict(json={"inputs": "a", "top_k": 2}), 422, "unknown field(s) top_k"),
    "stream on a classifier": (dict(json={"inputs": "a", "stream": True}), 422, "cannot stream"),
    "oversized body": (dict(json={"inputs": "word " * 20000}), 413, "at most 65536"),
    "too-long input": (dict(json={"inputs": LONG_TEXT}), 422, "takes at most 512 tokens"),
    "too-long input in a list": (dict(json={"inputs": ["short", LONG_TEXT]}), 422, "inputs[1] is"),
}


@pytest.mark.parametrize("request_kw, status, message", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, clf, request_kw, status, message):
    r = httpx.post(f"{server.url}/v1/models/sst", timeout=30, **request_kw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    ok = httpx.post(f"{server.url}/v1/models/sst", json={"inputs": "still there?"}, timeout=30)
    assert ok.status_code == 200 and ok.json() == roundtrip(clf("still there?"))


def test_oversized_body_sent_in_chunks_gets_413(server):
    # No Content-Length to refuse up front: the server counts the bytes as they arrive.
    def chunks():
        yield b'{"inputs": "'
        for _ in range(100):
            yield b"word " * 200
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/models/sst", content=chunks(), timeout=30)
    assert r.status_code == 413 and "over 65536 bytes" in r.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_two_worker_threads_answer_every_request_like_the_pipeline(clf_dir, clf, tmp_path):
    srv = ServerProcess([f"sst={clf_dir}"], tmp_path, "--workers", "2", "--max-batch-size", "4")
    try:
        texts = [f"request {i}: " + "good " * (i % 7) + "bad " * (i % 5) for i in range(48)]

        async def send_all():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/models/sst", json={"inputs": t}) for t in texts))

        for text, r in zip(texts, asyncio.run(send_all())):
            assert r.status_code == 200, r.text
            assert_results_close(r.json(), roundtrip(clf(text)), atol=1e-5, where=text)
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()


def test_unknown_model_and_wrong_method_get_404_and_405(server):
    r = httpx.post(f"{server.url}/v1/models/nope", json={"inputs": "a"})
    assert r.status_code == 404 and "no model named 'nope'" in r.json()["error"] and "sst" in r.json()["error"]
    r = httpx.get(f"{server.url}/v1/models/sst")
    assert r.status_code == 405
    assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "serve", "--model", str(tmp_path), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "has no onnxpipe.json" in out.stderr


BUCKET_CASES = {
    "equal lengths share one group": ([10, 10, 10, 10], [[0, 1, 2, 3]]),
    "a long outlier runs apart": ([10, 40, 11, 12], [[0, 2, 3], [1]]),
    "sorted by length within a group": ([12, 10, 11], [[1, 2, 0]]),
    "unknown lengths keep one group in order": ([10, None, 40], [[0, 1, 2]]),
}


@pytest.mark.parametrize("lengths, groups", list(BUCKET_CASES.values()), ids=list(BUCKET_CASES))
def test_length_buckets_keep_padding_small(lengths, groups):
    from onnxpipe.server.batching import length_buckets

    assert length_buckets(lengths) == groups
    for group in groups:
        if None not in lengths:
            real = sum(lengths[i] for i in group)
            assert len(group) * max(lengths[i] for i in group) <= 1.25 * real


def test_serve_exits_with_the_reason_when_a_model_cannot_load(clf_dir):
    # The manifest is fine (checked before start); the pipeline refuses the export at load time.
    out = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "serve", "--model", f"x={clf_dir}@question-answering",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "could not load model 'x'" in out.stderr and "exported for 'text-classification'" in out.stderr


def test_serve_refuses_an_unknown_task(clf_dir):
    out = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "serve", "--model", f"x={clf_dir}@nonsense",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown task 'nonsense'" in out.stderr


@pytest.mark.slow
def test_serve_loads_a_large_model_from_the_session_cache_on_its_second_start(tmp_path, monkeypatch):
    """The server's sessions do not spin (a server wants its cores back between runs) and still use the default
    session cache: MiniLM (~90 MB, over the default cache's 32 MiB floor) is optimized and saved on the first start
    and loaded as saved on the second."""
    from conftest import real_export
    from onnxpipe.server.app import ServerConfig
    from onnxpipe.server.metrics import Metrics
    from onnxpipe.server.pool import ModelPool, parse_model_specs
    from onnxpipe.session import DEFAULT_CACHE_MIN_BYTES

    folder = real_export("minilm")
    assert sum(f.stat().st_size for f in folder.glob("model.onnx*")) >= DEFAULT_CACHE_MIN_BYTES
    env = {k: v for k, v in os.environ.items() if k != "ONNXPIPE_SESSION_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    states = []
    for start in range(2):
        server = ServerProcess([f"minilm={folder}@sentence-similarity"], tmp_path, env=env)
        try:
            (model,) = httpx.get(server.url + "/v1/models").json()["data"]
            states.append(model["session_cache"])
            r = httpx.post(f"{server.url}/v1/models/minilm", json={"inputs": ["a text", "another"]}, timeout=30)
            assert r.status_code == 200 and len(r.json()) == 2
        finally:
            server.stop()
    assert states == ["written", "hit"]
    assert list((tmp_path / "xdg" / "onnxpipe" / "sessions").iterdir())

    # the same through the pool in this process, where the session itself can be read
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    monkeypatch.delenv("ONNXPIPE_SESSION_CACHE", raising=False)
    pool = ModelPool(parse_model_specs([str(folder)]), ServerConfig(), Metrics(), stop_server=lambda: None)
    pool.load()
    assert pool.ready, pool.load_error
    session = next(iter(pool.workers.values())).pipe.model.session()
    assert session.cache_hit and session.cached_from.parent == tmp_path / "xdg" / "onnxpipe" / "sessions"
    assert session.options.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError):  # spinning between a run's operators stays on
        session.options.get_session_config_entry("session.intra_op.allow_spinning")
    pool.close()
