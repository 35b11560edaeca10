"""Generation under concurrent streaming clients: continuous batching ("after") against one request at a time
("before", `--max-running 0`, the server as it was), side by side on loopback.

    python -m bench.serve_load --generation                       # SmolLM2 fp32 and int8, 1/4/8/16 clients
    python -m bench.serve_load --generation --model DIR --precisions fp32 --clients 1,8
    python -m bench.serve_load --generation --modes after,after-no-prefix-cache   # what the prefix cache gives

Each client streams chat completions (SSE) one after another (closed loop), each a question of its own (one of six,
numbered: the server's prefix cache knows only the chat template's start of it), with greedy decoding and a stop
string that never occurs, so each request decodes exactly its max_tokens: --new-tokens on average, spread by
--length-spread (default 0.5: uniform in 24..72 for 48, the same draws for every server, seeded by the
request's index). With --length-spread 0 every request decodes the same count, so closed-loop clients stay in
lockstep: they finish at the same step and all ask again at once, and each new request waits for the prefill of
every other (the worst case for time to first token, not what independent users do). Per (precision, clients): aggregate tokens/s over the run, each stream's tokens/s (from its first token
to its last), time to first token p50/p99; the two servers' runs alternate. Bounded: --requests per run, and
a time limit. Targets (issue 20), at 8 clients against 1: aggregate tokens/s >= 4x, per-stream tokens/s >= 50%,
time to first token p50 <= 2x. Writes bench/results/serve_generation.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

from .serve_load import RESULTS, Server, _quantile, machine, write_report

MODES = {"after": ["--max-running", "16"], "before": ["--max-running", "0"],
         # the engine without its prefix cache: what the chat template's known start saves
         "after-no-prefix-cache": ["--max-running", "16", "--prefix-cache-mb", "0"]}
PROMPTS = ["Tell me a story about a lighthouse.", "What is the capital of France?",
           "Explain how rain forms, step by step.", "Write a short poem about the sea.",
           "Give me three tips for learning to cook.", "Why is the sky blue?"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generation", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="text-generation model folder (default: SmolLM2, the built-in default)")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--modes", default="after,before", help=f"servers to compare, of {', '.join(MODES)}")
    ap.add_argument("--new-tokens", type=int, default=48, help="max_tokens of a request, on average")
    ap.add_argument("--length-spread", type=float, default=0.5,
                    help="max_tokens drawn uniformly in new_tokens x [1 - spread, 1 + spread] (0: all the same)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per run (default: 6 per client: the first burst, when every client asks at once, "
                         "is then a sixth of the run rather than its median)")
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds per run at most")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "serve_generation"))
    args = ap.parse_args(argv)
    model = Path(args.model) if args.model else _smollm2()
    clients = [int(c) for c in args.clients.split(",")]
    modes = {m: MODES[m] for m in args.modes.split(",")}
    extra = ["--threads", str(args.threads)] if args.threads else []
    load_before = os.getloadavg()
    runs = []
    for precision in args.precisions.split(","):
        with contextlib.ExitStack() as stack:
            flags = ["--precision", precision, "--max-queue", "256", "--timeout", "600", *extra]
            servers = {mode: stack.enter_context(Server(model, [*mode_flags, *flags]))
                       for mode, mode_flags in modes.items()}
            for srv in servers.values():  # warm-up, not counted
                asyncio.run(load(srv.url, 2, 2, 8, 60, 0.0))
            for c in clients:
                requests = args.requests or 6 * c
                for mode in (list(modes) if c % 2 == 0 else list(modes)[::-1]):
                    stats = summarize(asyncio.run(load(servers[mode].url, c, requests, args.new_tokens,
                                                       args.time_limit, args.length_spread)))
                    stats.update(precision=precision, mode=mode, clients=c)
                    runs.append(stats)
                    print(f"{precision} {mode:6} clients {c:2}: {stats['aggregate_tokens_per_s']:7.1f} tok/s, "
                          f"per stream {stats['stream_tokens_per_s_p50']:6.1f} tok/s, TTFT p50 "
                          f"{stats['ttft_p50_ms']:7.1f} ms p99 {stats['ttft_p99_ms']:7.1f} ms "
                          f"({stats['completed']} requests)", flush=True)
    report = {"model": str(model), "machine": machine(load_before, os.getloadavg()), "new_tokens": args.new_tokens,
              "length_spread": args.length_spread, "runs": runs, "targets": targets(runs)}
    write_report(Path(args.out), report, markdown(report))
    return 0


def max_tokens(index: int, new_tokens: int, spread: float) -> int:
    """The index-th request's max_tokens: the same for every server and run."""
    import random

    u = random.Random(index).random()
    return max(1, round(new_tokens * (1 - spread + 2 * spread * u)))


async def load(url: str, concurrency: int, requests: int, new_tokens: int, time_limit: float,
               spread: float) -> list[dict]:
    """Closed loop of streamed chat completions; one record per finished request."""
    import httpx

    records, issued = [], 0
    deadline = time.perf_counter() + time_limit
    start = time.perf_counter()

    async def client_loop(client):
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            # a question of its own for every request (a user's, not one asked again): what a prefix cache may
            # know of it is the chat template's start, as for distinct users
            prompt = f"{PROMPTS[issued % len(PROMPTS)]} (Question {issued + 1}.)"
            wanted = max_tokens(issued, new_tokens, spread)
            issued += 1
            body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": wanted,
                    "temperature": 0, "stop": ["\u2603never\u2603"], "stream": True,
                    "stream_options": {"include_usage": True}}
            # a kept-alive connection the server closed meanwhile (llama-server's allow 5 requests each) fails
            # before any byte: the request is asked again, on a new one
            for attempt in (1, 2):
                t0 = time.perf_counter()
                first = last = None
                tokens = pieces = 0
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                                now = time.perf_counter()
                                first = first or now
                                last = now
                                pieces += 1
                    break
                except httpx.RemoteProtocolError:
                    if attempt == 2 or first is not None:
                        raise
            tokens = tokens or pieces  # a server that sends no usage (one token a chunk, as llama-server streams)
            if first is not None:
                records.append({"ttft": first - t0, "tokens": tokens, "stream_s": last - first, "end": last})

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    for r in records:
        r["run_s"] = time.perf_counter() - start
    return records


def summarize(records: list[dict]) -> dict:
    ttft = sorted(r["ttft"] for r in records)
    per_stream = sorted(r["tokens"] / r["stream_s"] for r in records if r["stream_s"] > 0)
    seconds = max((r["end"] for r in records), default=0) - min((r["end"] - r["stream_s"] - r["ttft"]
                                                                 for r in records), default=0)
    tokens = sum(r["tokens"] for r in records)
    return {"completed": len(records), "tokens": tokens, "seconds": round(seconds, 2),
            "aggregate_tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
            "stream_tokens_per_s_p50": round(_quantile(per_stream, 0.5), 2),
            "ttft_p50_ms": round(1000 * _quantile(ttft, 0.5), 1), "ttft_p99_ms": round(1000 * _quantile(ttft, 0.99), 1)}


def targets(runs: list[dict]) -> list[dict]:
    """Issue 20's targets per precision and mode: 8 clients against 1."""
    out = []
    for precision in sorted({r["precision"] for r in runs}):
        for mode in MODES:
            by = {r["clients"]: r for r in runs if r["precision"] == precision and r["mode"] == mode}
            if 1 not in by or 8 not in by:
                continue
            one, eight = by[1], by[8]
            checks = [("aggregate tok/s at 8 clients >= 4x 1 client",
                       eight["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"], 4.0, True),
                      ("per-stream tok/s at 8 clients >= 50% of 1 client",
                       eight["stream_tokens_per_s_p50"] / one["stream_tokens_per_s_p50"], 0.5, True),
                      ("TTFT p50 at 8 clients <= 2x 1 client", eight["ttft_p50_ms"] / one["ttft_p50_ms"], 2.0, False)]
            for name, ratio, bound, at_least in checks:
                out.append({"precision": precision, "mode": mode, "target": name, "ratio": round(ratio, 2),
                            "met": ratio >= bound if at_least else ratio <= bound})
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Generation under concurrent streaming clients ({Path(report['model']).name})", "",
             f"{m.get('cpu_model', '')}, {m['cpus']} CPUs (client and server share them); {report['new_tokens']} new "
             f"tokens per request on average (spread {report.get('length_spread', 0)}: "
             f"{'all the same, clients in lockstep' if not report.get('length_spread') else 'mixed lengths'}), "
             f"greedy; load average {m['loadavg_1m_before']} -> {m['loadavg_1m_after']}. after: "
             "continuous batching (--max-running 16); before: one request at a time (--max-running 0); "
             "after-no-prefix-cache: continuous batching with --prefix-cache-mb 0.", "",
             "| precision | server | clients | aggregate tok/s | per-stream tok/s (p50) | TTFT p50 (ms) | TTFT p99 (ms) | requests |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['precision']} | {r['mode']} | {r['clients']} | {r['aggregate_tokens_per_s']} | "
                     f"{r['stream_tokens_per_s_p50']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['completed']} |")
    lines += ["", "| precision | server | target | ratio | met |", "|---|---|---|---|---|"]
    lines += [f"| {t['precision']} | {t['mode']} | {t['target']} | {t['ratio']} | {'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _smollm2() -> Path:
    from onnxpipe.models import default_model_dir

    return default_model_dir("text-generation")
