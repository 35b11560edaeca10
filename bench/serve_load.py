"""Load test for `onnxpipe serve` on loopback: throughput and p50/p99 latency, dynamic batching on vs off.

    python -m bench.serve_load                      # BERT-small classifier, 1/8/32 clients
    python -m bench.serve_load --model DIR --requests 400 --time-limit 60
    python -m bench.serve_load --generation         # streamed generation, continuous batching on vs off

Bounded: each run sends a fixed number of requests and stops early at a time limit; each
(batching, clients) pair is run --repeats times, alternating with the other mode. The server runs as its own process (`python -m onnxpipe.cli serve`, the same command
users run) on 127.0.0.1; the clients are asyncio coroutines in this process, one keep-alive
connection each (h11), every client sending its next request as soon as its previous answer
arrives (closed loop). Client and server share the machine's cores.
Writes bench/results/serve_load.json and bench/results/serve_load.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("ONNXPIPE_BENCH_CACHE", ROOT / ".cache" / "bench"))
LOOPBACK = "127.0.0.1"
# BERT-small (Turc et al.'s L-4 H-256 A-4): an edge-sized classifier, random weights (speed does not
# depend on their values) with the tiny checkpoints' trained WordPiece tokenizer.
SMALL_BERT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
MODES = {"on": ["--max-batch-size", "8", "--max-wait-ms", "5"], "off": ["--max-batch-size", "1", "--max-wait-ms", "0"]}


def main(argv=None) -> int:
    if "--generation" in (sys.argv[1:] if argv is None else argv):  # streamed generation: bench/generation_load.py
        from .generation_load import main as generation_main

        return generation_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: a BERT-small text classifier, built once)")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=200, help="requests per run (fixed count)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per (batching, clients), on and off alternating")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per run at most")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads in the server")
    ap.add_argument("--out", default=str(RESULTS / "serve_load"), help="path prefix of the .json and .md written")
    args = ap.parse_args(argv)
    model = Path(args.model) if args.model else small_bert()
    clients = [int(c) for c in args.clients.split(",")]
    texts = sentences()
    extra = ["--threads", str(args.threads)] if args.threads else []
    load_before = os.getloadavg()
    runs = []
    # Both servers run side by side and their runs alternate, so that a busy spell on this shared
    # machine falls on both modes alike; an idle server costs nothing (its ORT threads sleep).
    with contextlib.ExitStack() as stack:
        servers = {mode: stack.enter_context(Server(model, [*flags, *extra, "--max-queue", "1024"]))
                   for mode, flags in MODES.items()}
        for srv in servers.values():
            asyncio.run(load(srv.url, texts, concurrency=4, requests=40, time_limit=30))  # warm-up, not counted
        for c in clients:
            samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for rep in range(args.repeats):
                for mode in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
                    cpu0 = servers[mode].cpu_seconds()
                    sample = asyncio.run(load(servers[mode].url, texts, concurrency=c, requests=args.requests,
                                              time_limit=args.time_limit))
                    sample["server_cpu_s"] = servers[mode].cpu_seconds() - cpu0
                    samples[mode].append(sample)
            for mode in MODES:
                stats = summarize(samples[mode])
                stats.update(batching=mode, clients=c, server_flags=MODES[mode] + extra)
                runs.append(stats)
                print(f"batching {mode:3} clients {c:2}: {stats['throughput_rps']:7.1f} req/s  "
                      f"p50 {stats['p50_ms']:6.1f} ms  p99 {stats['p99_ms']:6.1f} ms  "
                      f"({stats['completed']} requests in {stats['seconds']:.1f} s, mean batch "
                      f"{stats['mean_batch']:.1f})", flush=True)
    report = {"model": str(model), "machine": machine(load_before, os.getloadavg()), "runs": runs,
              "requests_per_run": args.requests, "repeats": args.repeats, "time_limit_s": args.time_limit}
    write_report(Path(args.out), report, markdown(report))
    return 0


def write_report(out: Path, report: dict, text: str) -> None:
    """`out`.json (the figures) and `out`.md (the tables), and the tables on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


async def load(url: str, texts: list[str], *, concurrency: int, requests: int, time_limit: float) -> dict:
    """Closed loop: `concurrency` clients share `requests` requests; stop issuing at `time_limit`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    issued = 0
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    before = await _batch_counts(url)
    from urllib.parse import urlsplit

    parts = urlsplit(url)  # a path after the port is a route prefix (an app on Ray Serve)
    path = parts.path.rstrip("/") + "/v1/models/bench"
    clients = [await Connection.open(parts.hostname, parts.port) for _ in range(concurrency)]
    start = time.perf_counter()
    deadline = start + time_limit

    async def one_client(conn):
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            status = await conn.post(path, body)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    try:
        await asyncio.gather(*(one_client(c) for c in clients))
        seconds = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    after = await _batch_counts(url)
    return {"latencies": latencies, "seconds": seconds, "statuses": statuses,
            "batches": after[0] - before[0], "inputs": after[1] - before[1]}


def summarize(samples: list[dict]) -> dict:
    """Median throughput over the runs; latency quantiles over all their requests pooled."""
    latencies = sorted(x for s in samples for x in s["latencies"])
    rates = sorted(len(s["latencies"]) / s["seconds"] for s in samples)
    statuses: dict[str, int] = {}
    for s in samples:
        for code, n in s["statuses"].items():
            statuses[str(code)] = statuses.get(str(code), 0) + n
    batches = sum(s["batches"] for s in samples)
    # CPU time the server spent per request: unlike req/s, it barely depends on how much of the
    # machine other processes took during the run.
    cpu_ms = 1000 * sum(s["server_cpu_s"] for s in samples) / max(1, len(latencies))
    return {"server_cpu_ms_per_request": round(cpu_ms, 3),"completed": len(latencies), "seconds": round(sum(s["seconds"] for s in samples), 3),
            "statuses": statuses, "throughput_rps": round(rates[len(rates) // 2], 2),
            "throughput_rps_runs": [round(r, 2) for r in rates],
            "p50_ms": round(1000 * _quantile(latencies, 0.50), 2), "p99_ms": round(1000 * _quantile(latencies, 0.99), 2),
            "mean_batch": round(sum(s["inputs"] for s in samples) / batches, 2) if batches else 0.0}


class Connection:
    """One keep-alive HTTP/1.1 connection speaking through h11 (the protocol library under httpx).

    httpx itself cost the client more CPU per request than the server spent answering it, and
    client and server share this machine's cores: the load generator must stay light.
    """

    def __init__(self, reader, writer, host: str):
        import h11

        self.h11 = h11
        self.reader, self.writer, self.host = reader, writer, host
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> int:
        h11 = self.h11
        headers = [("Host", self.host), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        self.writer.write(self.conn.send(h11.Request(method="POST", target=path, headers=headers))
                          + self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status

    def close(self) -> None:
        self.writer.close()


async def _batch_counts(url: str) -> tuple[float, float]:
    """(batches run, inputs run) from the server's /metrics."""
    import httpx

    async with httpx.AsyncClient(base_url=url) as client:
        text = (await client.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        for name in ("onnxpipe_batch_size_count", "onnxpipe_batch_size_sum"):
            if line.startswith(name + '{model="bench"}'):
                values[name] = float(line.split()[-1])
    return values.get("onnxpipe_batch_size_count", 0.0), values.get("onnxpipe_batch_size_sum", 0.0)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Server:
    """`onnxpipe serve` in a subprocess on a free loopback port, stopped with SIGTERM. A subclass serves something
    else: its own `command(port)`, `ready_path` and `log_dir`."""

    ready_path = "/ready"
    log_dir = CACHE

    def __init__(self, model: Path, flags: list[str]):
        self.model, self.flags = model, flags
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.args = self.command(self.port)

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "onnxpipe.cli", "serve", "--model", f"bench={self.model}", "--host", LOOPBACK,
                "--port", str(port), *self.flags]

    def __enter__(self):
        import httpx

        self.log = open(self.log_dir / f"{type(self).__name__.lower()}-{self.port}.log", "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.args[0]} not ready in 120 s; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def small_bert() -> Path:
    out = CACHE / "serve" / "bert-small-text-classification"
    if (out / "onnxpipe.json").exists():
        return out
    from onnxpipe.export import export_model
    from onnxpipe.export.tiny import cached_checkpoint

    (CACHE / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = cached_checkpoint("bert", "text-classification", CACHE / "checkpoints", **SMALL_BERT)
    print(f"bench: exporting {out.name} (once)", flush=True)
    export_model(ckpt, out, "text-classification", quantize=None, atol=1e-3, rtol=1e-3)
    return out


def sentences() -> list[str]:
    """Real sentences of the tokenizer's training corpus, 5 to 40 words (about as many tokens)."""
    from onnxpipe.export.tiny import corpus_lines

    lines = [ln for ln in corpus_lines() if ln.isascii() and 5 <= len(ln.split()) <= 40]
    return lines[:500]


def machine(load_before, load_after) -> dict:
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(load_after[0], 2)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says: ratios only compare within one CPU."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Model: `{Path(report['model']).name}`; {m['cpus']} CPUs; 1-min load average "
             f"{m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after; {report['repeats']} runs of "
             f"{report['requests_per_run']} requests per row (on and off alternating), "
             f"{report['time_limit_s']:g} s at most each; throughput is the median run.", "",
             "| clients | batching | throughput (req/s) | runs (req/s) | on / off | server CPU per request (ms) | "
             "p50 (ms) | p99 (ms) | mean batch | requests |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    off = {r["clients"]: r["throughput_rps"] for r in report["runs"] if r["batching"] == "off"}
    for r in sorted(report["runs"], key=lambda r: (r["clients"], r["batching"] != "off")):
        ratio = f"{r['throughput_rps'] / off[r['clients']]:.2f}x" if r["batching"] == "on" and off.get(r["clients"]) else ""
        spread = f"{min(r['throughput_rps_runs']):.0f}-{max(r['throughput_rps_runs']):.0f}"
        cpu = r.get("server_cpu_ms_per_request")
        lines.append(f"| {r['clients']} | {r['batching']} | {r['throughput_rps']:.1f} | {spread} | {ratio} | "
                     f"{'' if cpu is None else f'{cpu:.2f}'} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['completed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
