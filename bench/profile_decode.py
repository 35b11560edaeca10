"""`python -m bench.profile_decode FOLDER [--precision fp32|int8]`: where a decoder's decode step spends its time.

Runs a greedy KV-cache loop on an exported decoder folder (prompt of --prompt random tokens, then --steps
single-token steps, through the runtime's own DecoderStepper) with ONNX Runtime's profiler on, and prints
the step's wall time next to the summed kernel time per operator type, so a slow step can be split into weight MatMuls (bandwidth-bound) and the
rest (graph overhead: Concat/Reshape/Transpose around attention, norms, RoPE).
The raw ORT profile (chrome://tracing JSON) is kept under --out.

`--against OTHER_FOLDER` instead times the two folders' unprofiled decode steps A B A B in one process
(--rounds rounds of --steps steps each) and prints each round's step median: how an export change
(e.g. `--attention gqa` vs `--attention onnx`) moves the step, with this machine's drift shared.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(folder: Path, precision: str = "fp32", threads: int = 2, prompt: int = 64, steps: int = 64,
            out: Path | None = None) -> dict:
    manifest, path = _read(folder, precision)
    out = out or Path("bench/results/profiles")
    out.mkdir(parents=True, exist_ok=True)

    # the same loop without the profiler first: its per-node timing inflates the step (~10 us x nodes)
    plain = _loop(_session(path, threads, False), manifest, prompt, steps)
    sess = _session(path, threads, True, out / f"{folder.name}-{precision}")
    walls = _loop(sess, manifest, prompt, steps)
    return _summarize(sess, folder, precision, threads, prompt, steps, plain, walls)


def _session(path: str, threads: int, profiled: bool, prefix: Path | None = None):
    """onnxpipe's Session (what the pipelines run) on its own pool of `threads`, no session cache."""
    from onnxpipe.session import Session

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profiled:
        so.enable_profiling = True
        so.profile_file_prefix = str(prefix)
    return Session(path, session_options=so)


def _read(folder: Path, precision: str) -> tuple[dict, str]:
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    if not manifest.get("kv_cache"):
        raise SystemExit(f"{folder}: not a decoder with a KV cache (manifest has no kv_cache)")
    files = manifest["files"]["model"]
    if precision not in files:
        raise SystemExit(f"{folder}: no {precision} graph (has {', '.join(files)})")
    return manifest, str(folder / files[precision]["path"])


def _loop(sess, manifest: dict, prompt: int, steps: int) -> list[float]:
    """Greedy through the runtime's own decoder loop (DecoderStepper: its feeds, its KV cache handling, the
    shared cache buffer where the manifest has one): the prompt (random ids, seed 0) in one run, then `steps`
    single-token steps; their wall times."""
    from onnxpipe.generation import DecoderStepper

    vocab = next(o["shape"][-1] for o in manifest["io"]["model"]["outputs"] if o["name"] == "logits")
    prompt_ids = np.random.default_rng(0).integers(0, vocab, size=(1, prompt), dtype=np.int64)
    stepper = DecoderStepper(sess, manifest["kv_cache"])
    logits = stepper.prefill(prompt_ids, np.ones_like(prompt_ids))
    walls = []
    for _ in range(steps):
        next_token = np.array([int(np.argmax(logits[0]))], np.int64)
        t0 = time.perf_counter()
        logits = stepper.step(next_token)
        walls.append(time.perf_counter() - t0)
    return walls


def compare(a: Path, b: Path, precision: str = "fp32", threads: int = 2, prompt: int = 64, steps: int = 128,
            rounds: int = 6) -> dict:
    """Unprofiled decode steps of folders a and b, A B A B in one process: each round's step median (ms)."""
    loaded = [_read(f, precision) for f in (a, b)]
    sessions = [_session(path, threads, False) for _, path in loaded]
    medians: dict[str, list[float]] = {str(a): [], str(b): []}
    for _ in range(rounds):
        for folder, (manifest, _), sess in zip((a, b), loaded, sessions):
            medians[str(folder)].append(float(np.median(_loop(sess, manifest, prompt, steps)) * 1e3))
    return {"precision": precision, "threads": threads, "prompt": prompt, "steps": steps, "step_ms_by_round": medians,
            "ratio_b_over_a_by_round": [y / x for x, y in zip(medians[str(a)], medians[str(b)])]}


def _summarize(sess, folder, precision, threads, prompt, steps, plain, walls) -> dict:
    trace = sess.ort_session.end_profiling()
    events = json.loads(Path(trace).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    first_step = runs[-steps]["ts"]
    per_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_step:
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"] / 1e3 / steps
            count[op] += 1
    ops = sorted(per_op.items(), key=lambda kv_: -kv_[1])
    return {
        "folder": str(folder), "precision": precision, "threads": threads, "prompt": prompt, "steps": steps,
        "step_ms_p50_unprofiled": float(np.median(plain) * 1e3),
        "step_wall_ms_p50": float(np.median(walls) * 1e3), "step_wall_ms_min": float(min(walls) * 1e3),
        "model_run_ms_p50": float(np.median([e["dur"] for e in runs[-steps:]]) / 1e3),
        "kernel_ms_per_step": sum(per_op.values()), "nodes_per_step": sum(count.values()) // steps,
        "ops": [{"op": op, "ms_per_step": ms, "nodes": count[op] // steps} for op, ms in ops],
        "trace": str(trace),
    }


def render(r: dict) -> str:
    lines = [f"{r['folder']} {r['precision']}, {r['threads']} threads, prompt {r['prompt']}, {r['steps']} steps",
             f"step p50 without the profiler {r['step_ms_p50_unprofiled']:.2f} ms",
             f"profiled: step wall p50 {r['step_wall_ms_p50']:.2f} ms (min {r['step_wall_ms_min']:.2f}); "
             f"ORT model_run p50 {r['model_run_ms_p50']:.2f} ms; summed kernel time {r['kernel_ms_per_step']:.2f} ms "
             f"over {r['nodes_per_step']} nodes",
             f"{'op':32s} {'ms/step':>8s} {'share':>6s} nodes"]
    for o in r["ops"]:
        lines.append(f"{o['op']:32s} {o['ms_per_step']:8.3f} {o['ms_per_step'] / r['kernel_ms_per_step']:6.1%} "
                     f"x{o['nodes']}")
    lines.append(f"trace: {r['trace']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_decode", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="an exported decoder folder (onnxpipe export ... text-generation)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="where the raw ORT trace goes (bench/results/profiles)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--against", type=Path, default=None, metavar="OTHER_FOLDER",
                   help="time FOLDER and OTHER_FOLDER's unprofiled steps A B A B instead of profiling")
    p.add_argument("--rounds", type=int, default=6, help="with --against: rounds of --steps steps per folder")
    a = p.parse_args(argv)
    if a.against is not None:
        r = compare(a.folder, a.against, a.precision, a.threads, a.prompt, a.steps, a.rounds)
        if a.json:
            print(json.dumps(r, indent=1))
        else:
            for folder, ms in r["step_ms_by_round"].items():
                print(f"{folder}: step p50 by round {' '.join(f'{x:.2f}' for x in ms)} ms, median {np.median(ms):.2f}")
            ratios = r["ratio_b_over_a_by_round"]
            print(f"second / first, round by round: {' '.join(f'{x:.3f}' for x in ratios)}, median {np.median(ratios):.3f}")
        return 0
    r = profile(a.folder, a.precision, a.threads, a.prompt, a.steps, a.out)
    print(json.dumps(r, indent=1) if a.json else render(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
