"""onnxpipe on Ray, on a two-node local cluster: the Serve app answers as `onnxpipe serve` does (same results, same
error bodies) from replicas on both nodes; Ray Data labels rows as the local pipeline does; `onnxpipe batch` writes
the same file with and without Ray.

Ray runs only inside a network namespace with nothing but loopback (`make test` runs this file through
tests/loopback_only.sh): the cluster fixture refuses to start when another interface is up.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import assert_results_close
from test_server import LONG_TEXT, clf, clf_dir, free_port, roundtrip  # noqa: F401 - clf, clf_dir: fixtures

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")]
ray = pytest.importorskip("ray")
LOOPBACK = "127.0.0.1"
SERVER_OPTIONS = {"max_batch_size": 8, "max_wait_ms": 50, "max_body_bytes": 65536}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on this machine, each with 2 logical CPUs and one `serve_slot` and one `data_slot` (so one
    replica and one labelling actor go on each node)."""
    from onnxpipe.ray.node import interfaces_up

    up = interfaces_up()
    if up:
        message = (f"Ray is started only in a loopback-only network namespace; interfaces up here: {', '.join(up)} "
                   "(run: tests/loopback_only.sh python -m pytest -m ray)")
        if os.environ.get("ONNXPIPE_RAY_NAMESPACE"):
            pytest.fail(message)
        pytest.skip(message)
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = "1"
    node = {"num_cpus": 2, "resources": {"serve_slot": 1, "data_slot": 1}, "object_store_memory": 150 << 20}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False,
                                                      "node_ip_address": LOOPBACK})
    c.add_node(**node, node_ip_address=LOOPBACK)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        c.shutdown()  # never `ray stop`: it stops every Ray process on the machine


@pytest.fixture(scope="module")
def served(cluster, clf_dir):
    """The onnxpipe app on Serve, two replicas (one per node), its proxy on every node."""
    from ray import serve

    from onnxpipe.ray import deployment
    from onnxpipe.ray.serve_app import wait_for_route

    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port}, proxy_location="EveryNode")
    app = deployment(clf_dir, name="sst", num_replicas=2, num_cpus=1, resources={"serve_slot": 1},
                     **SERVER_OPTIONS)
    serve.run(app, name="onnxpipe", route_prefix="/")
    wait_for_route(LOOPBACK, port)
    yield f"http://{LOOPBACK}:{port}"
    serve.delete("onnxpipe")


def texts(n: int) -> list[str]:
    words = ["good", "bad", "movie", "plot", "actors", "boring", "wonderful", "the", "a", "not"]
    return [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(1 + i % 13)) for i in range(n)]


async def _post_many(url: str, bodies: list[dict]) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(body):
            try:
                return await client.post(url, json=body)
            except httpx.HTTPError as e:
                return e
        return await asyncio.gather(*(one(b) for b in bodies))


def replica_nodes(responses) -> set[str]:
    return {r.headers["x-onnxpipe-replica"].split(" replica ")[0] for r in responses}


def test_serve_answers_200_concurrent_requests_as_the_pipeline_does_from_both_nodes(served, clf):
    bodies = [{"inputs": t} if i % 5 else {"inputs": [t, t + " too"], "parameters": {"top_k": 2}}
              for i, t in enumerate(texts(200))]
    responses = asyncio.run(_post_many(served + "/v1/models/sst", bodies))
    for body, r in zip(bodies, responses):
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        expected = roundtrip(clf(body["inputs"], **body.get("parameters", {})))
        assert_results_close(r.json(), expected, atol=1e-5, where=str(body))
    assert len(replica_nodes(responses)) == 2, replica_nodes(responses)
    # batches of more than one input were run: each replica's batch-size histogram (sum of inputs > batches)
    batched = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(40):
            r = client.get(served + "/metrics")
            total = float(re.search(r'onnxpipe_batch_size_sum\{model="sst"\} (\S+)', r.text).group(1))
            count = float(re.search(r'onnxpipe_batch_size_count\{model="sst"\} (\S+)', r.text).group(1))
            batched[r.headers["x-onnxpipe-replica"]] = total > count
    assert any(batched.values()), batched


def test_serve_routes_and_errors_are_onnxpipe_serves(served, clf_dir):
    """The same request to the in-process `onnxpipe serve` app and to Ray: the same status and the same body."""
    from starlette.testclient import TestClient

    from onnxpipe.server import ServerConfig, create_app

    requests = {
        "good": ("POST", "/v1/models/sst", {"json": {"inputs": "I love this"}}),
        "inputs a number": ("POST", "/v1/models/sst", {"json": {"inputs": 3}}),
        "list with a number": ("POST", "/v1/models/sst", {"json": {"inputs": ["ok", 5]}}),
        "unknown parameter": ("POST", "/v1/models/sst", {"json": {"inputs": "a", "parameters": {"temperature": 1}}}),
        "too-long input": ("POST", "/v1/models/sst", {"json": {"inputs": LONG_TEXT}}),
        "oversized body": ("POST", "/v1/models/sst", {"json": {"inputs": "word " * 20000}}),
        "not JSON": ("POST", "/v1/models/sst", {"content": b"{nope", "headers": {"content-type": "application/json"}}),
        "unknown model": ("POST", "/v1/models/nope", {"json": {"inputs": "a"}}),
        "chat on a classifier": ("POST", "/v1/chat/completions",
                                 {"json": {"model": "sst", "messages": [{"role": "user", "content": "hi"}]}}),
        "ready": ("GET", "/ready", {}),
    }
    app = create_app([f"sst={clf_dir}"], ServerConfig(**SERVER_OPTIONS), load_in_startup=True)
    with TestClient(app) as local, httpx.Client(base_url=served, timeout=60) as remote:
        for what, (method, path, kw) in requests.items():
            want, got = local.request(method, path, **kw), remote.request(method, path, **kw)
            assert got.status_code == want.status_code, (what, got.status_code, got.text)
            if what != "good":
                assert got.json() == want.json(), what
        models = remote.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["sst"]


def test_a_killed_replica_loses_no_request_without_a_clear_status(served, clf):
    from ray import serve

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
    victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    bodies = [{"inputs": t} for t in texts(300)]

    async def load_and_kill():
        task = asyncio.create_task(_post_many(served + "/v1/models/sst", bodies))
        await asyncio.sleep(0.3)
        ray.kill(victim, no_restart=False)
        return await task

    responses = asyncio.run(load_and_kill())
    ok = 0
    for body, r in zip(bodies, responses):
        assert isinstance(r, httpx.Response), f"a request got no HTTP answer: {r!r}"
        if r.status_code == 200:
            ok += 1
            assert_results_close(r.json(), roundtrip(clf(body["inputs"])), atol=1e-5)
        else:
            assert r.status_code >= 500 and r.text, (r.status_code, r.text)
    assert ok > 0
    # Ray replaces the replica; then every request is answered again
    serve_status_ok = False
    for _ in range(120):
        status = serve.status().applications["onnxpipe"]
        if status.status == "RUNNING" and \
                status.deployments["onnxpipe"].replica_states.get("RUNNING", 0) == 2:
            serve_status_ok = True
            break
        asyncio.run(asyncio.sleep(0.5))
    assert serve_status_ok, serve.status()
    again = asyncio.run(_post_many(served + "/v1/models/sst", bodies[:40]))
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in again)


def test_predict_on_two_actors_equals_the_local_pipeline_row_for_row(cluster, clf_dir, clf):
    from onnxpipe.ray import predict

    rows = [{"text": t} for t in texts(3000)]
    for i in (5, 700, 2999):
        rows[i]["text"] = ""
    rows[1234]["text"] = None
    rows[2000]["text"] = LONG_TEXT
    dataset = ray.data.from_items(rows, override_num_blocks=8)
    out = predict(dataset, clf_dir, column="text", actors=2, batch_size=64, resources={"data_slot": 1},
                  node_column="node").take_all()
    assert len(out) == len(rows)
    for i, (row, got) in enumerate(zip(rows, out)):
        assert got["text"] == row["text"], f"row {i} moved"
        if i in (5, 700, 2999, 1234, 2000):
            assert got["output"] is None and got["error"], (i, got)
        else:
            assert got["error"] is None, (i, got["error"])
            expected = roundtrip(clf(row["text"]))
            assert_results_close(json.loads(got["output"]), expected, atol=1e-5, where=f"row {i}")
    assert "no value" in out[1234]["error"] and "empty" in out[5]["error"] and "512" in out[2000]["error"]
    assert len({row["node"] for row in out}) == 2


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_batch_writes_the_same_file_with_and_without_ray(cluster, clf_dir, tmp_path, suffix):
    from onnxpipe.batch_job import read_table, run_batch

    rows = [{"id": i, "text": t} for i, t in enumerate(texts(500))]
    rows[3]["text"], rows[77]["text"], rows[400]["text"] = "", LONG_TEXT, None
    if suffix == ".jsonl":
        rows[9]["text"] = 42  # a wrong type: JSONL may hold any JSON value
    source = tmp_path / f"in{suffix}"
    write_rows(source, rows)
    local, remote = tmp_path / f"local{suffix}", tmp_path / f"ray{suffix}"
    counts = run_batch(str(clf_dir), source, local, "text", batch_size=32, progress=False)
    run_batch(str(clf_dir), source, remote, "text", batch_size=32, progress=False, ray_address=cluster.address,
              actors=2)
    assert local.read_bytes() == remote.read_bytes()
    out = read_table(local).rows
    bad = {3, 77, 400} | ({9} if suffix == ".jsonl" else set())
    assert counts == {"rows": 500, "labelled": 500 - len(bad), "errors": len(bad), "seconds": counts["seconds"]}
    assert [r["id"] for r in out] == list(range(500))
    assert {i for i, r in enumerate(out) if r["error"]} == bad
    if suffix == ".jsonl":
        assert "wrong type (number)" in out[9]["error"]


def test_batch_command_line_single_process(clf_dir, tmp_path):
    source, out = tmp_path / "in.csv", tmp_path / "sub" / "out.jsonl"
    source.write_text("text,id\nI love it,1\n,2\nawful,3\n")
    r = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "batch", str(clf_dir), str(source), str(out),
                        "--quiet", "-o", "top_k=2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert len(json.loads(rows[0]["output"])) == 2 and rows[0]["error"] is None
    assert rows[1]["output"] is None and "empty" in rows[1]["error"]
    assert "3 rows, 2 labelled, 1 with an error" in r.stderr
    assert not list(out.parent.glob(".*part"))  # the temporary file is gone
    bad = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "batch", str(clf_dir), str(source),
                          str(tmp_path / "o.jsonl"), "--column", "body"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no column 'body'" in bad.stderr and not (tmp_path / "o.jsonl").exists()


def test_serve_config_for_kuberay_round_trips_through_build_app(clf_dir):
    import yaml

    from onnxpipe.ray import build_app, serve_config

    text = serve_config(str(clf_dir), name="sst", num_replicas=3, max_batch_size=16, num_cpus=2)
    config = yaml.safe_load(text)
    (application,) = config["applications"]
    assert application["import_path"] == "onnxpipe.ray:build_app" and config["proxy_location"] == "EveryNode"
    assert application["args"] == {"models": [f"sst={clf_dir}"], "num_replicas": 3, "max_batch_size": 16,
                                   "num_cpus": 2}
    app = build_app(application["args"])
    assert app._bound_deployment.num_replicas == 3
    # `serve run onnxpipe.ray:build_app models=... max_batch_size=16` passes strings
    cli_app = build_app({"models": str(clf_dir), "max_batch_size": "16", "max_wait_ms": "2.5", "num_replicas": "2"})
    assert cli_app._bound_deployment.num_replicas == 2
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        build_app({"models": str(clf_dir), "max_batch_size": "0"})
    with pytest.raises(ValueError, match="unknown argument 'colour'"):
        build_app({"models": str(clf_dir), "colour": "red"})


def test_onnxpipe_serve_ray_command(clf_dir, clf, tmp_path):
    """`onnxpipe serve --ray` as users run it: a Ray of its own, the app on it, a clean stop on SIGINT; and
    `--print-config` (no Ray started) for a KubeRay RayService."""
    import signal
    import time

    import yaml

    from onnxpipe.ray.node import interfaces_up

    if interfaces_up():
        pytest.skip("starts Ray: only inside a loopback-only network namespace")
    printed = subprocess.run([sys.executable, "-m", "onnxpipe.cli", "serve", "--ray", "--model", f"sst={clf_dir}",
                              "--replicas", "3", "--max-batch-size", "16", "--print-config"],
                             capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    args = yaml.safe_load(printed.stdout)["applications"][0]["args"]
    assert args == {"models": [f"sst={clf_dir}"], "num_replicas": 3, "num_cpus": 1, "max_batch_size": 16}

    port = free_port()
    log = tmp_path / "serve-ray.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "onnxpipe.cli", "serve", "--ray", "--model", f"sst={clf_dir}",
                                 "--host", LOOPBACK, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops it" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        r = httpx.post(f"http://{LOOPBACK}:{port}/v1/models/sst", json={"inputs": "I love it"}, timeout=30)
        assert r.status_code == 200, r.text
        assert_results_close(r.json(), roundtrip(clf("I love it")), atol=1e-5)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    assert code == 0, log.read_text(errors="replace")[-3000:]


def test_a_model_folder_missing_on_a_node_is_named_with_the_node(cluster, tmp_path):
    from onnxpipe.ray.node import check_models_here

    @ray.remote(num_cpus=0)
    def check(path):
        try:
            check_models_here([path])
        except FileNotFoundError as e:
            return str(e)

    message = ray.get(check.remote(str(tmp_path / "nowhere")))
    assert f"model folder {tmp_path / 'nowhere'} does not exist on Ray node 127.0.0.1 (node " in message
    assert "every node needs each model folder at the same path" in message


def test_without_ray_installed_the_message_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import onnxpipe.ray\n"
            "try:\n    onnxpipe.ray.deployment\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "onnxpipe.ray needs Ray: pip install 'onnxpipe[ray]'"
