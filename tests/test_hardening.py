"""The probes of a hostile but fair tester, replayed against a real server on loopback (and the Python API): no
request holds a model for long, no model folder reaches outside itself, no client input gets a 500.

Every loop here is bounded in count and time; all traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import onnxpipe
from test_server import GRACEFUL_EXIT, LOOPBACK, ServerProcess, metric

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def dirs(tiny, tmp_path_factory):
    chat = tiny.export("llama", "text-generation", quantize=None, max_position_embeddings=32768)
    # long context and no EOS: a generation runs as long as it is asked to, so that it can be cut
    manifest = json.loads((chat / "onnxpipe.json").read_text())
    chat = _copy(chat, tmp_path_factory.mktemp("chat") / "chat",
                 generation={**manifest["generation"], "eos_token_id": None})
    return {"sst": tiny.export("bert", "text-classification"), "gen": tiny.export("gpt2", "text-generation"),
            "chat": chat, "t2t": tiny.export("t5", "text2text-generation")}


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    srv = ServerProcess([f"{name}={d}" for name, d in dirs.items()], tmp_path_factory.mktemp("hardening"),
                        "--timeout", "20")
    yield srv
    assert srv.stop() in GRACEFUL_EXIT, srv.log()
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def _copy(folder: Path, dest: Path, **manifest_changes) -> Path:
    shutil.copytree(folder, dest)
    manifest = json.loads((dest / "onnxpipe.json").read_text())
    manifest.update(manifest_changes)
    (dest / "onnxpipe.json").write_text(json.dumps(manifest))
    return dest


# -- 1. unbounded work --------------------------------------------------------------------------------------------

BUDGETS = {
    "2000 prompts": ("gen", {"inputs": ["ab"] * 2000, "parameters": {"max_new_tokens": 200}}, "--max-inputs"),
    "num_beams 3000": ("gen", {"inputs": "ab", "parameters": {"num_beams": 3000, "max_new_tokens": 5}}, "--max-beams"),
    "return sequences": ("gen", {"inputs": "ab", "parameters": {"num_return_sequences": 50, "do_sample": True}},
                         "--max-return-sequences"),
    "max_new_tokens": ("gen", {"inputs": "ab", "parameters": {"max_new_tokens": 100000}}, "--max-new-tokens"),
    "tokens x sequences": ("gen", {"inputs": ["ab"] * 40, "parameters": {"max_new_tokens": 1000}},
                           "--max-generated-tokens"),
    "input tokens": ("sst", {"inputs": ["word " * 2000] * 60, "parameters": {"truncation": True}},
                     "--max-input-tokens"),
}


@pytest.mark.parametrize("model, body, flag", list(BUDGETS.values()), ids=list(BUDGETS))
def test_a_request_over_a_budget_gets_422_naming_the_limit(server, model, body, flag):
    r = httpx.post(f"{server.url}/v1/models/{model}", json=body, timeout=30)
    assert r.status_code == 422 and flag in r.json()["error"], r.text
    t0 = time.monotonic()
    assert httpx.post(f"{server.url}/v1/models/{model}", json={"inputs": "ab", "parameters": {"max_new_tokens": 2}}
                      if model == "gen" else {"inputs": "ab"}, timeout=30).status_code == 200
    assert time.monotonic() - t0 < 5


def test_work_past_its_timeout_stops_and_the_model_answers_the_next_request(dirs, tmp_path):
    """The generation loop checks for its request's cancellation every token: a request that would run for
    minutes gets its 504 and frees the model at once."""
    srv = ServerProcess([f"t2t={dirs['t2t']}"], tmp_path, "--timeout", "1", "--max-new-tokens", "100000",
                        "--max-generated-tokens", "1000000")
    try:
        long = {"inputs": "hello", "parameters": {"max_new_tokens": 50000, "min_new_tokens": 50000, "num_beams": 1}}
        r = httpx.post(f"{srv.url}/v1/models/t2t", json=long, timeout=30)
        assert r.status_code == 504, r.text
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/models/t2t", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}},
                       timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 < 3, (r.text, time.monotonic() - t0)
    finally:
        assert srv.stop() in GRACEFUL_EXIT, srv.log()


def test_a_chat_whose_client_leaves_stops_generating(server):
    before = metric(server.metrics(), "onnxpipe_streams_cancelled_total", model="chat") or 0
    body = json.dumps({"model": "chat", "messages": CHAT, "max_tokens": 1000, "temperature": 0,
                       "stop": ["never appears 12345"]}).encode()
    with socket.create_connection((LOOPBACK, server.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.3)  # generating by now
    deadline = time.monotonic() + 10
    while (metric(server.metrics(), "onnxpipe_streams_cancelled_total", model="chat") or 0) <= before:
        assert time.monotonic() < deadline, "the chat kept generating after its client left"
        time.sleep(0.05)
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "chat", "messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200


def test_thread_counts_are_capped_at_the_cpu_count(dirs, tmp_path):
    srv = ServerProcess([f"sst={dirs['sst']}"], tmp_path, "--threads", "1000000")
    try:
        assert httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": "fine"}, timeout=30).status_code == 200
        assert srv.rss() < 1 << 30
        assert "more than this machine's" in srv.log()
    finally:
        assert srv.stop() in GRACEFUL_EXIT


# -- 2. model folders ---------------------------------------------------------------------------------------------

ESCAPES = {
    "graph up and out": lambda m: m["files"]["model"]["fp32"].update(path="../outside/model.onnx"),
    "absolute graph": lambda m: m["files"]["model"]["fp32"].update(path="/etc/passwd"),
    "external data out": lambda m: m["files"]["model"]["fp32"]["external_data"].update(path="../../x.data"),
    "tokenizer out": lambda m: m["tokenizer"].update(file="/etc/passwd"),
}


@pytest.mark.parametrize("change", list(ESCAPES.values()), ids=list(ESCAPES))
def test_manifest_paths_outside_the_folder_are_refused(dirs, tmp_path, change):
    folder = _copy(dirs["sst"], tmp_path / "m")
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    change(manifest)
    (folder / "onnxpipe.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="inside the model folder"):
        onnxpipe.read_manifest(folder)


def test_symlinks_that_leave_the_folder_are_refused(dirs, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = _copy(dirs["sst"], tmp_path / "m")
    (folder / "tokenizer.json").rename(outside / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(ValueError, match="outside the folder"):
        onnxpipe.pipeline("text-classification", model=folder)
    inner = _copy(dirs["sst"], tmp_path / "ok")  # a link that stays inside is fine
    (inner / "tokenizer.json").rename(inner / "tok.json")
    (inner / "tokenizer.json").symlink_to("tok.json")
    assert onnxpipe.pipeline("text-classification", model=inner)("fine")


DAMAGED = {
    "a list": lambda m: [m],
    "files a string": lambda m: {**m, "files": "model.onnx"},
    "no precision": lambda m: {**m, "files": {"model": {}}},
    "path a number": lambda m: {**m, "files": {"model": {"fp32": {"path": 5}}}},
    "max length a string": lambda m: {**m, "tokenizer": {**m["tokenizer"], "model_max_length": "512"}},
    "id2label values": lambda m: {**m, "id2label": {"0": 1}},
    "special id": lambda m: {**m, "tokenizer": {**m["tokenizer"], "special_token_ids": {"pad_token_id": "0"}}},
    "unknown task": lambda m: {**m, "task": "telepathy"},
    "deep nesting": lambda m: json.dumps(m)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",  # raw text
}


@pytest.mark.parametrize("damage", list(DAMAGED.values()), ids=list(DAMAGED))
def test_damaged_manifests_are_one_line_errors_naming_the_field(dirs, tmp_path, damage):
    folder = tmp_path / "m"
    shutil.copytree(dirs["sst"], folder)
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    damaged = damage(manifest)
    (folder / "onnxpipe.json").write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(ValueError, match="onnxpipe.json") as e:
        onnxpipe.ModelDir(folder)
    assert "\n" not in str(e.value)


def test_a_broken_tokenizer_file_is_named(dirs, tmp_path):
    folder = _copy(dirs["sst"], tmp_path / "m")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer file"):
        onnxpipe.ModelDir(folder)


def test_serve_exits_2_with_one_line_for_a_bad_folder(dirs, tmp_path):
    folder = _copy(dirs["sst"], tmp_path / "m")
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    manifest["files"]["model"]["fp32"]["path"] = "../../etc/passwd"
    (folder / "onnxpipe.json").write_text(json.dumps(manifest))
    out = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "serve", "--model", str(folder), "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "inside the model folder" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_session_cache_entry_damaged_at_the_same_size_is_rebuilt(dirs, tmp_path):
    graph = dirs["sst"] / "model.onnx"
    cache = tmp_path / "cache"
    first = onnxpipe.Session(graph, session_cache=cache)
    data = first.cached_from / "model.onnx.data"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 3: len(damaged) // 3 + 64] = b"\xff" * 64  # NaN patterns, same size
    data.write_bytes(bytes(damaged))
    again = onnxpipe.Session(graph, session_cache=cache)
    assert not again.cache_hit and again.cached_from == first.cached_from
    feeds = {"input_ids": np.array([[2, 40, 41, 3]]), "attention_mask": np.ones((1, 4), np.int64),
             "token_type_ids": np.zeros((1, 4), np.int64)}
    np.testing.assert_allclose(again.run(feeds)["logits"], onnxpipe.Session(graph, session_cache=False).run(feeds)["logits"],
                               rtol=0, atol=1e-6)
    assert onnxpipe.Session(graph, session_cache=cache).cache_hit


# -- 3. connections -----------------------------------------------------------------------------------------------

def test_silent_connections_do_not_stop_requests_and_are_closed(dirs, tmp_path):
    srv = ServerProcess([f"sst={dirs['sst']}"], tmp_path, "--max-connections", "64", "--header-timeout", "3")
    silent = []
    try:
        for _ in range(250):
            silent.append(socket.create_connection((LOOPBACK, srv.port), timeout=10))
        for i in range(20):  # each new connection pushes out the longest-silent one
            r = httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": f"request {i}"}, timeout=10)
            assert r.status_code == 200
        time.sleep(4)  # past the header timeout: every silent connection has been closed by the server
        for s in silent:
            s.settimeout(2)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        log = srv.log()
        assert "Traceback" not in log and len(log) < 100_000
    finally:
        for s in silent:
            s.close()
        assert srv.stop() in GRACEFUL_EXIT


# -- 4. client input that used to be a 500 ------------------------------------------------------------------------

PROBES = {
    "JSON nested 100k deep": ("sst", dict(content=b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400,
                              "nests deeper"),
    "lone surrogate": ("sst", dict(content=b'{"inputs": "ab\\ud800cd"}'), 400, "not valid Unicode"),
    "max_length 1e30": ("sst", dict(json={"inputs": "a", "parameters": {"max_length": 1e30}}), 422, "max_length"),
    "padding to 100000": ("sst", dict(json={"inputs": "a", "parameters": {"padding": "max_length",
                                                                           "max_length": 100000}}), 422, "positions"),
    "NaN constant": ("gen", dict(content=b'{"inputs": "a", "parameters": {"length_penalty": NaN}}'), 400, "NaN"),
    "number out of range": ("gen", dict(content=b'{"inputs": "a", "parameters": {"temperature": 1e400}}'), 422,
                            "out of range"),
    "do_sample yes": ("gen", dict(json={"inputs": "a", "parameters": {"do_sample": "yes"}}), 422, "true or false"),
    "return_full_text no": ("gen", dict(json={"inputs": "a", "parameters": {"return_full_text": "no"}}), 422,
                            "true or false"),
    "token id out of vocab": ("gen", dict(json={"inputs": "a", "parameters": {"bos_token_id": 10**9,
                                                                               "max_new_tokens": 2}}), 422,
                              "vocabulary"),
}


@pytest.mark.parametrize("model, request_kw, status, message", list(PROBES.values()), ids=list(PROBES))
def test_client_input_gets_a_json_4xx(server, model, request_kw, status, message):
    r = httpx.post(f"{server.url}/v1/models/{model}", timeout=30, **request_kw)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_chat_messages_that_are_not_a_chat_get_422(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "chat", "messages": ["hello", "there"], "max_tokens": 3})
    assert r.status_code == 422 and "one chat" in r.json()["error"]["message"], r.text


TEMPLATES = {
    "raise_exception": ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come "
                        "first') }}{% endif %}x", "a system message must come first"),
    "sandbox": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "syntax error": ("{% if %}", "cannot be compiled"),
}


def test_a_broken_chat_template_is_422_naming_its_message(dirs, tmp_path):
    folders = {name: _copy(dirs["chat"], tmp_path / name, chat_template=template)
               for name, (template, _) in TEMPLATES.items()}
    srv = ServerProcess([f"{name.replace(' ', '_')}={d}" for name, d in folders.items()], tmp_path)
    try:
        for name, (_, message) in TEMPLATES.items():
            for stream in (False, True):
                r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30, json={
                    "model": name.replace(" ", "_"), "messages": CHAT, "max_tokens": 3, "stream": stream})
                text = r.text
                if stream:  # the error comes as an event of the stream
                    assert r.status_code == 200 and message in text and '"error"' in text, text
                else:
                    assert r.status_code == 422 and message in r.json()["error"]["message"], text
        assert "Traceback" not in srv.log()
    finally:
        assert srv.stop() in GRACEFUL_EXIT


# -- 5. memory ----------------------------------------------------------------------------------------------------

def test_memory_returns_after_large_bodies(dirs, tmp_path):
    srv = ServerProcess([f"sst={dirs['sst']}"], tmp_path)
    try:
        for _ in range(3):
            httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": "warm up"}, timeout=30)
        start = srv.rss()
        body = json.dumps({"inputs": "word " * 200_000}).encode()  # just under 1 MiB
        for _ in range(20):
            r = httpx.post(f"{srv.url}/v1/models/sst", content=body, timeout=60)
            assert r.status_code == 422  # too long for the model: counted, then refused
        grown = srv.rss() - start
        assert grown < 50 << 20, f"resident memory grew by {grown >> 20} MiB"
    finally:
        assert srv.stop() in GRACEFUL_EXIT


# -- 7. NaN -------------------------------------------------------------------------------------------------------

def _nan_copy(folder: Path, dest: Path) -> Path:
    """The export with every float weight NaN (integer initializers, shapes among them, kept)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(folder, dest)
    model = onnx.load(str(dest / "model.onnx"))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, np.float32),
                                                  init.name))
    (dest / "model.onnx.data").unlink()
    onnx.save(model, str(dest / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dest


def test_models_that_produce_nan_give_a_clear_error(dirs, tmp_path):
    sst, gen = _nan_copy(dirs["sst"], tmp_path / "sst"), _nan_copy(dirs["gen"], tmp_path / "gen")
    from onnxpipe.errors import ModelOutputError

    with pytest.raises(ModelOutputError, match="NaN after the prompt"):
        onnxpipe.pipeline("text-generation", model=gen)("hello", max_new_tokens=3, do_sample=False)
    srv = ServerProcess([f"sst={sst}", f"gen={gen}"], tmp_path)
    try:
        r = httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": "hello"}, timeout=30)
        assert r.status_code == 500 and "NaN" in r.json()["error"], r.text
        r = httpx.post(f"{srv.url}/v1/models/gen", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}},
                       timeout=30)
        assert r.status_code == 500 and "logits are NaN" in r.json()["error"], r.text
    finally:
        assert srv.stop() in GRACEFUL_EXIT


# -- 8. the smaller ones ------------------------------------------------------------------------------------------

def test_generate_refuses_ids_outside_the_vocabulary_and_empty_batches(dirs):
    gen = onnxpipe.pipeline("text-generation", model=dirs["gen"])
    with pytest.raises(ValueError, match="vocabulary"):
        gen.generate(np.array([[10**9]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no rows"):
        gen.generate(np.zeros((0, 3), np.int64), max_new_tokens=2)
    with pytest.raises(TypeError, match="true or false"):
        gen("a", do_sample="yes")
    with pytest.raises(ValueError, match="finite"):
        gen("a", length_penalty=float("nan"), num_beams=2)


def test_chat_cut_by_max_tokens_or_the_context_says_length(server, dirs):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "chat", "messages": CHAT, "max_tokens": 2, "temperature": 0,
                         "stop": ["never appears 12345"]})
    assert r.json()["choices"][0]["finish_reason"] == "length"



def test_chat_cut_by_the_context_window_says_length(dirs, tmp_path):
    short = _copy(dirs["chat"], tmp_path / "short", max_positions=48)
    srv = ServerProcess([f"short={short}"], tmp_path)
    try:
        for stream in (False, True):
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30, json={
                "model": "short", "messages": CHAT, "max_tokens": 500, "temperature": 0, "stream": stream})
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                assert chunks[-1]["choices"][0]["finish_reason"] == "length", r.text
            else:
                assert r.json()["choices"][0]["finish_reason"] == "length", r.text
    finally:
        assert srv.stop() in GRACEFUL_EXIT


def test_no_redirect_from_the_host_header_and_no_cross_origin_posts(server):
    r = httpx.post(f"{server.url}/v1/models/sst/", json={"inputs": "a"}, headers={"Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    r = httpx.post(f"{server.url}/v1/models/sst", content=b'{"inputs": "a"}',
                   headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "--allow-origin" in r.json()["error"]
    same = httpx.post(f"{server.url}/v1/models/sst", json={"inputs": "a"}, headers={"Origin": server.url})
    assert same.status_code == 200


def test_an_allowed_origin_gets_cors_headers(dirs, tmp_path):
    srv = ServerProcess([f"sst={dirs['sst']}"], tmp_path, "--allow-origin", "https://app.example")
    try:
        r = httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": "a"}, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        pre = httpx.options(f"{srv.url}/v1/models/sst", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert httpx.post(f"{srv.url}/v1/models/sst", json={"inputs": "a"},
                          headers={"Origin": "https://other.example"}).status_code == 403
    finally:
        assert srv.stop() in GRACEFUL_EXIT
