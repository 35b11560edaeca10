"""`python -m bench.peers.server`: onnxpipe's server beside llama.cpp's `llama-server` under concurrent streaming
chat clients (issue 26: "the server's concurrent throughput next to the peers that batch").

llama-server is the peer that serves: parallel slots (`--parallel N`), continuous batching, an OpenAI-style
`/v1/chat/completions` with SSE, the GGUF's chat template (`--jinja`). It is built here from the llama.cpp sources
that llama-cpp-python 0.3.36 vendors (the version the decode workloads run), without AMX (as bench/peers/install.py
builds it: its AMX kernels crashed here), under .cache/peers/llama-server/. The other peers offer no server of
their own that batches (onnxruntime-genai and CTranslate2 are libraries; OpenVINO's is OpenVINO Model Server, a
separate install, not measured).

Same weights (onnxpipe's fp32 / weight-only int8 export of the GGUF's transformers folder; llama.cpp's F32 / Q8_0
of it), same client (bench/generation_load.py's closed loop: a numbered question per request, greedy, a stop
string that never occurs, max_tokens 24..72), both on loopback with 2 threads for inference; each (precision,
clients) runs the two servers in alternating order, `--rounds` times. Writes bench/results/peers_server.json / .md.
Needs `python -m bench peers` to have run once (its llama.cpp venv and GGUF files).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ..generation_load import load, summarize
from ..serve_load import LOOPBACK, RESULTS, Server, cpu_model
from . import install, models

VERSION = "0.3.36"  # llama-cpp-python's, whose vendored llama.cpp is built
BUILD = install.CACHE / "llama-server"
GGUF_TYPE = {"fp32": "F32", "int8": "Q8_0"}  # llama.cpp's file type for each onnxpipe precision


def llama_server_binary() -> Path:
    """Build llama-server once (a few minutes on 2 cores) and return its path."""
    src = BUILD / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    binary = src / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    BUILD.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        subprocess.run([str(install.python("llama.cpp")), "-m", "pip", "download", f"llama-cpp-python=={VERSION}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(BUILD)], check=True)
        with tarfile.open(BUILD / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(BUILD, filter="data")
    print("bench peers server: building llama-server (once)", flush=True)
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    f"-DCMAKE_C_FLAGS={install.NO_AMX}", f"-DCMAKE_CXX_FLAGS={install.NO_AMX}",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"], cwd=src, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   cwd=src, check=True)
    return binary


class LlamaServer(Server):
    """llama-server on a free loopback port: `slots` parallel sequences of `per_slot` positions each."""

    ready_path = "/health"
    log_dir = BUILD

    def __init__(self, gguf: Path, slots: int, threads: int, per_slot: int = 512):
        self.gguf, self.slots, self.threads, self.per_slot = gguf, slots, threads, per_slot
        super().__init__(gguf, [])

    def command(self, port: int) -> list[str]:
        return [str(llama_server_binary()), "-m", str(self.gguf), "--host", LOOPBACK, "--port", str(port),
                "-t", str(self.threads), "-tb", str(self.threads), "--parallel", str(self.slots),
                "-c", str(self.slots * self.per_slot), "--jinja", "--no-webui"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--time-limit", type=float, default=240.0)
    ap.add_argument("--out", default=str(RESULTS / "peers_server"))
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    slots = max(clients)
    ggufs = {p: models.smollm2_gguf_as(GGUF_TYPE[p]) for p in args.precisions.split(",")}
    missing = [g.name for g in ggufs.values() if not g.exists()]
    if missing or not install.python("llama.cpp").exists():
        raise SystemExit(f"bench peers server: run `python -m bench peers` first (it installs llama.cpp and writes "
                         f"the GGUF files this bench serves; missing: {', '.join(missing) or 'the llama.cpp venv'})")
    load_before = os.getloadavg()
    onnx_dir = models.smollm2_onnx()
    runs = []
    for precision in args.precisions.split(","):
        with contextlib.ExitStack() as stack:
            servers = {
                "onnxpipe serve": stack.enter_context(Server(onnx_dir, [
                    "--precision", precision, "--max-running", str(max(16, slots)), "--max-queue", "256",
                    "--timeout", "600", "--threads", str(args.threads)])),
                f"llama-server --parallel {slots}": stack.enter_context(LlamaServer(ggufs[precision], slots,
                                                                                    args.threads)),
            }
            for srv in servers.values():  # warm-up, not counted
                asyncio.run(load(srv.url, 2, 2, 8, 60, 0.0))
            for r in range(args.rounds):
                for c in clients:
                    order = list(servers) if (r + c) % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        stats = summarize(asyncio.run(load(servers[name].url, c, 6 * c, args.new_tokens,
                                                           args.time_limit, 0.5)))
                        stats.update(precision=precision, server=name, clients=c, round=r)
                        runs.append(stats)
                        print(f"{precision} {name:26} clients {c:2} round {r}: {stats['aggregate_tokens_per_s']:7.1f} "
                              f"tok/s, per stream {stats['stream_tokens_per_s_p50']:6.1f}, TTFT p50 "
                              f"{stats['ttft_p50_ms']:7.1f} ms ({stats['completed']} requests)", flush=True)
    report = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads,
              "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)], "new_tokens": args.new_tokens,
              "llama_cpp": f"llama.cpp vendored by llama-cpp-python {VERSION}, built without AMX",
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


def markdown(report: dict) -> str:
    """Medians over rounds per (precision, server, clients)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in report["runs"]:
        groups.setdefault((r["precision"], r["server"], r["clients"]), []).append(r)
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    lines = ["# onnxpipe serve beside llama-server: concurrent streaming chat (issue 26)", "",
             f"{report['cpu']}, {report['cpus']} cores shared by the server and the client; {report['threads']} "
             f"inference threads each; load average {report['loadavg_1m'][0]} -> {report['loadavg_1m'][1]}; "
             f"{report['llama_cpp']}; `python -m bench.peers.server` ({report['started']}). Each request a numbered "
             f"question of its own, greedy, max_tokens {report['new_tokens']} on average (24..72); medians over "
             "rounds, servers alternating.", "",
             "| precision | server | clients | aggregate tok/s | per-stream tok/s p50 | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for (p, name, c), rows in sorted(groups.items()):
        lines.append(f"| {p} | {name} | {c} | {med(rows, 'aggregate_tokens_per_s'):.1f} | "
                     f"{med(rows, 'stream_tokens_per_s_p50'):.1f} | {med(rows, 'ttft_p50_ms'):.0f} | "
                     f"{med(rows, 'ttft_p99_ms'):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
