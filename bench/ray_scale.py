"""onnxpipe on Ray: does a second replica or actor pay, and what does Ray add to a request?

    tests/loopback_only.sh .venv/bin/python -m bench.ray_scale     # or: make bench-ray

Three figures, on a BERT-small classifier (random weights, real sentences), ONNX Runtime at 1 thread per
replica/actor/process, for requests of a sentence, a ~128-token review, or 8 reviews:
- Serve throughput at 16 clients, one replica vs two (1 CPU each): both apps deployed side by side on one local
  Ray, their runs alternating (`--repeats`), so a busy spell on the machine falls on both.
- Ray's added latency per request at 1 client: the 1-replica app against `onnxpipe serve` (same settings),
  alternating too.
- Offline labelling, `--rows` rows (default 50,000): Ray Data with 2 actors against one process, rows/s once past
  start-up (from the first chunk labelled to the last) and over the whole job.
Ray starts only inside a loopback-only network namespace: it binds every interface and probes outside addresses
at start. Writes bench/results/ray_scale.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from .serve_load import RESULTS, Server, load, machine, sentences, small_bert, summarize, write_report

CLIENTS = 16
APPS = {"one": 1, "two": 2}   # app name (its route prefix) -> replicas
SERVE_FLAGS = {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": 1024, "intra_op_num_threads": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600, help="requests per Serve run")
    ap.add_argument("--latency-requests", type=int, default=200, help="requests per 1-client latency run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure, alternating")
    ap.add_argument("--rows", type=int, default=50_000, help="rows labelled offline")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per run at most")
    ap.add_argument("--parts", default="serve,batch", help="serve, batch or both; a part not run keeps its figures "
                    "(and their run's machine line) from the existing --out .json")
    ap.add_argument("--out", default=str(RESULTS / "ray_scale"))
    args = ap.parse_args(argv)

    from onnxpipe.ray.node import interfaces_up

    if interfaces_up():
        print("bench.ray_scale starts Ray, which binds every interface: run it in a loopback-only namespace, "
              "e.g. tests/loopback_only.sh .venv/bin/python -m bench.ray_scale", file=sys.stderr)
        return 2
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = "1"
    model = small_bert()
    texts = sentences()
    load_before = os.getloadavg()
    # 2 real cores; logical CPUs enough for the three replicas of the two apps (an idle replica costs nothing)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False,
             configure_logging=False)
    parts = set(args.parts.split(","))
    previous = _previous(Path(args.out).with_suffix(".json"))
    try:
        serve_runs = serve_figures(model, texts, args) if "serve" in parts else previous["serve"]
        batch_runs = batch_figures(model, texts, args) if "batch" in parts else previous["batch"]
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    report = {"model": str(model), "machine": machine(load_before, os.getloadavg()), "serve": serve_runs,
              "batch": batch_runs, "repeats": args.repeats, "parts_run": sorted(parts)}
    if parts != {"serve", "batch"}:
        report["carried_from_previous_run"] = carried(previous, parts)
    report["targets"] = targets(report)
    write_report(Path(args.out), report, markdown(report))
    return 0


def serve_figures(model: Path, texts: list[str], args) -> dict:
    """Per workload (a sentence, a ~128-token review, or 8 reviews per request): 16 clients on the 1- and
    2-replica apps, and 1 client on the 1-replica app and on `onnxpipe serve`; with the CPU seconds each kind of
    process spent per request (what bounds the figures on a small machine)."""
    from ray import serve

    from onnxpipe.ray import deployment
    from onnxpipe.ray.serve_app import wait_for_route

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    for name, replicas in APPS.items():
        serve.run(deployment(model, name="bench", num_replicas=replicas, num_cpus=1, **SERVE_FLAGS), name=name,
                  route_prefix=f"/{name}")
    wait_for_route("127.0.0.1", port, routes=[f"/{name}" for name in APPS])
    base = f"http://127.0.0.1:{port}"
    long_texts = reviews(texts)
    # (inputs of each request, its share of --requests): a tweet-sized request, a review, and a client that sends
    # its reviews 8 at a time; the heavier the request, the less Ray's own work per request counts
    workloads = {"sentence": (texts, 1), "review": (long_texts, 2),
                 "list of 8 reviews": ([long_texts[i:i + 8] for i in range(0, len(long_texts), 8)], 8)}
    local_flags = ["--max-batch-size", "8", "--max-wait-ms", "5", "--max-queue", "1024", "--threads", "1"]
    figures = {}
    with Server(model, local_flags) as local:
        urls = {"one": f"{base}/one", "two": f"{base}/two", "ray_1_client": f"{base}/one",
                "serve_1_client": local.url}
        for workload, (bodies, cost) in workloads.items():
            samples: dict[str, list] = {name: [] for name in urls}
            cpu: dict[str, dict] = {name: {} for name in urls}
            for url in (urls["one"], urls["two"], local.url):  # warm-up, not counted
                asyncio.run(load(url, bodies, concurrency=4, requests=40, time_limit=30))
            for rep in range(args.repeats):
                order = list(urls) if rep % 2 == 0 else list(urls)[::-1]
                for name in order:
                    clients = CLIENTS if name in APPS else 1
                    requests = max(20, (args.requests if name in APPS else args.latency_requests) // cost)
                    before = process_cpu(local.proc.pid)
                    sample = asyncio.run(load(urls[name], bodies, concurrency=clients, requests=requests,
                                              time_limit=args.time_limit))
                    spent = process_cpu(local.proc.pid, before)
                    sample["server_cpu_s"] = 0.0  # below, by kind of process
                    samples[name].append(sample)
                    for kind, seconds in spent.items():
                        cpu[name][kind] = cpu[name].get(kind, 0.0) + seconds
            runs = {}
            for name, s in samples.items():
                stats = summarize(s)
                stats.pop("server_cpu_ms_per_request")
                stats["cpu_ms_per_request"] = {kind: round(1000 * v / stats["completed"], 2)
                                               for kind, v in sorted(cpu[name].items()) if v > 0.005 * len(s)}
                runs[name] = stats
                print(f"{workload:8} {name:15} {stats['throughput_rps']:7.1f} req/s  p50 {stats['p50_ms']:6.2f} ms  "
                      f"p99 {stats['p99_ms']:6.2f} ms  CPU ms/request {stats['cpu_ms_per_request']}", flush=True)
            figures[workload] = runs
    for name in APPS:
        serve.delete(name)
    return figures


def reviews(texts: list[str], words: int = 100) -> list[str]:
    """Sentences joined into ~100-word texts (about 128 tokens): a product review rather than a tweet."""
    out, current = [], []
    for t in texts * 3:
        current.append(t)
        if sum(len(c.split()) for c in current) >= words:
            out.append(" ".join(current))
            current = []
    return out[:200]


def process_cpu(serve_pid: int, before: dict | None = None) -> dict:
    """CPU seconds (user + system) so far by kind of process: Ray Serve's proxy, replicas and controller, Ray's own
    daemons, `onnxpipe serve`, and this process (the load generator); minus `before` when given."""
    import psutil

    kinds: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
            if proc.info["pid"] == os.getpid():
                kind = "load generator"
            elif proc.info["pid"] == serve_pid:
                kind = "onnxpipe serve"
            elif "ProxyActor" in cmd:
                kind = "Serve proxy"
            elif "ServeReplica" in cmd:
                kind = "Serve replicas"
            elif "ServeController" in cmd:
                kind = "Serve controller"
            elif any(k in cmd for k in ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard")):
                kind = "Ray daemons"
            else:
                continue
            t = proc.cpu_times()
            kinds[kind] = kinds.get(kind, 0.0) + t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if before is not None:
        kinds = {k: v - before.get(k, 0.0) for k, v in kinds.items()}
    return kinds


def batch_figures(model: Path, texts: list[str], args) -> dict:
    """Rows/s labelling args.rows rows: one process (1 thread) vs Ray Data with 2 actors (1 CPU each)."""
    import concurrent.futures
    import multiprocessing

    from onnxpipe.batch_job import chunks
    from onnxpipe.ray.data import label_chunks

    values = [texts[i % len(texts)] for i in range(args.rows)]
    pieces = chunks(values, 64)
    runs: dict[str, list] = {"single process": [], "ray data, 2 actors": []}
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            if name == "single process":
                # in a process of its own, as `onnxpipe batch` without --ray-address runs: this one holds the Ray
                # driver, whose threads would share its core
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    t0, first, last, rows = pool.submit(_label_alone, str(model), pieces).result()
            else:
                t0 = time.perf_counter()
                first = last = None
                rows = 0
                for answers in label_chunks(pieces, str(model), column="text", address="auto", actors=2,
                                            cpus_per_actor=1):
                    last = time.perf_counter()
                    first = first or last
                    rows += len(answers)
            assert rows == len(values), (name, rows)
            whole = last - t0
            steady_rows = rows - len(pieces[0])
            runs[name].append({"seconds": round(whole, 3), "rows_per_s": round(rows / whole, 1),
                               "startup_s": round(first - t0, 3),
                               "steady_rows_per_s": round(steady_rows / (last - first), 1)})
            print(f"{name:20} {rows} rows in {whole:.1f} s ({rows / whole:.0f} rows/s; past start-up "
                  f"{steady_rows / (last - first):.0f} rows/s, start-up {first - t0:.1f} s)", flush=True)
    return {name: {"runs": r, "steady_rows_per_s": _median([x["steady_rows_per_s"] for x in r]),
                   "rows_per_s": _median([x["rows_per_s"] for x in r])} for name, r in runs.items()}


def _label_alone(model: str, pieces: list) -> tuple[float, float, float, int]:
    """The single-process run (a spawned process, 1 thread): (start, first chunk done, last chunk done, rows)."""
    from onnxpipe import pipeline
    from onnxpipe.batch_job import RowLabeller

    t0 = time.perf_counter()
    labeller = RowLabeller(pipeline(model=model, intra_op_num_threads=1))
    first = last = None
    rows = 0
    for piece in pieces:
        rows += len(labeller.label(piece))
        last = time.perf_counter()
        first = first or last
    return t0, first, last, rows


def targets(report: dict) -> list[dict]:
    out = []
    for workload, serve in report["serve"].items():
        replicas = serve["two"]["throughput_rps"] / serve["one"]["throughput_rps"]
        overhead = serve["ray_1_client"]["p50_ms"] - serve["serve_1_client"]["p50_ms"]
        out += [{"target": f"Serve, 2 replicas >= 1.7x one (16 clients, a {workload} per request)",
                 "value": round(replicas, 2), "met": replicas >= 1.7},
                {"target": f"Ray's added latency per request at 1 client (p50 ms, a {workload} per request)",
                 "value": round(overhead, 2), "met": None}]
    batch = report["batch"]
    actors = batch["ray data, 2 actors"]["steady_rows_per_s"] / batch["single process"]["steady_rows_per_s"]
    out.append({"target": "Ray Data, 2 actors >= 1.7x one process, past start-up", "value": round(actors, 2),
                "met": actors >= 1.7})
    return out


def markdown(report: dict) -> str:
    m, batch = report["machine"], report["batch"]
    lines = [f"Model: `{Path(report['model']).name}`; {m['cpus']} CPUs ({m['cpu_model']}); 1-min load average "
             f"{m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after; {report['repeats']} runs per row, "
             "alternating; ONNX Runtime at 1 thread per replica, actor or process." +
             (f" The {', '.join(report['carried_from_previous_run']['parts'])} figures are from an earlier run of the "
              f"same code (load {report['carried_from_previous_run']['machine']['loadavg_1m_before']} -> "
              f"{report['carried_from_previous_run']['machine']['loadavg_1m_after']})."
              if report.get("carried_from_previous_run") else ""), "",
             "| request | server | clients | throughput (req/s, median run) | p50 (ms) | p99 (ms) | "
             "CPU ms per request, by process |", "|:---|:---|---:|---:|---:|---:|:---|"]
    for workload, serve in report["serve"].items():
        for name, label, clients in (("one", "Ray Serve, 1 replica", CLIENTS),
                                     ("two", "Ray Serve, 2 replicas", CLIENTS),
                                     ("serve_1_client", "onnxpipe serve", 1), ("ray_1_client", "Ray Serve, 1 replica", 1)):
            s = serve[name]
            cpu = ", ".join(f"{k} {v}" for k, v in s["cpu_ms_per_request"].items())
            lines.append(f"| a {workload} | {label} | {clients} | {s['throughput_rps']} | {s['p50_ms']} | "
                         f"{s['p99_ms']} | {cpu} |")
    lines += ["", "| offline labelling | rows/s past start-up (median) | rows/s whole job | start-up (s) |",
              "|:---|---:|---:|---:|"]
    for name, b in batch.items():
        startup = _median([r["startup_s"] for r in b["runs"]])
        lines.append(f"| {name} | {b['steady_rows_per_s']} | {b['rows_per_s']} | {startup} |")
    lines += ["", "| target | value | met |", "|:---|---:|:---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def carried(previous: dict, parts: set) -> dict:
    """What a run of some parts says of the figures it keeps from the previous run: which parts, and the machine that
    measured them (the previous run's, or the one that run had kept them from in turn)."""
    kept = sorted({"serve", "batch"} - set(parts))
    earlier = previous.get("carried_from_previous_run") or {}
    machine = earlier["machine"] if set(kept) <= set(earlier.get("parts", ())) else previous["machine"]
    return {"machine": machine, "parts": kept}


def _previous(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
