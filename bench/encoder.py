"""Encoder tasks through each contender's whole pipeline (tokenize, run, postprocess).

Batch-1 latency at sequence lengths 16, 128, 512 (p50, p95) and batch-32 throughput at 128,
for classification, NER and QA on BERT-base-sized and DistilBERT-base-sized random models.
"""
from __future__ import annotations

import gc

import numpy as np

from . import artifacts, contenders as C
from .inputs import qa_pairs, texts_of_length
from .limits import EncoderMatmulChain, GemmProbe, encoder_gflop
from .timing import paired_speedup, summarize, time_interleaved

SHAPES = {"bert": dict(layers=12, hidden=768, intermediate=3072), "distilbert": dict(layers=6, hidden=768, intermediate=3072),
          "default": dict(layers=6, hidden=384, intermediate=1536)}  # the real defaults: MiniLM-L6
# (arch, task) groups and their shapes: (batch, length). Quick mode: one group, two shapes.
FULL_GROUPS = [("bert", "text-classification"), ("distilbert", "text-classification"),
               ("bert", "token-classification"), ("bert", "question-answering"),
               ("default", "text-classification"), ("default", "token-classification")]
FULL_SHAPES = [(1, 16), (1, 128), (1, 512), (32, 128)]
QUICK_GROUPS = [("bert", "text-classification")]
QUICK_SHAPES = [(1, 16), (1, 128), (32, 128)]
# seconds per (group, shape), min and max rounds
BUDGET = {"full": {1: (10.0, 5, 30), 32: (40.0, 2, 4)}, "quick": {1: (3.0, 3, 10), 32: (6.0, 1, 2)}}
FLOOR_CHAIN, FLOOR_PROBE = "floor: the model's matmuls chained", "floor: GEMM rate probe"
BUDGET_512 = {"full": (20.0, 3, 10), "quick": (4.0, 2, 4)}


def run(threads: int, quick: bool, gemm_gflops: float | None, only: list[str] | None = None) -> list[dict]:
    mode = "quick" if quick else "full"
    groups = QUICK_GROUPS if quick else FULL_GROUPS
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    if only:  # a filter picks from every group, also in a quick run
        groups = [g for g in FULL_GROUPS if any(o in (g[0], g[1], f"{g[0]}-{g[1]}") for o in only)] or groups
    results = []
    for arch, task in groups:
        results += _run_group(arch, task, shapes, threads, mode, gemm_gflops)
    return results


def _run_group(arch, task, shapes, threads, mode, gemm_gflops) -> list[dict]:
    if arch == "default":  # the built-in default model (real weights), as `onnxpipe.pipeline(task)` serves it
        plain = artifacts.default_export(task)
        ckpt = artifacts.default_checkpoint(task)
        contenders = C.default_contenders(task, ckpt, plain, threads)
        label = f"{plain.name} (real default)"
    else:
        ckpt = artifacts.checkpoint(arch, task)
        plain, opt = artifacts.export(arch, task), artifacts.export(arch, task, optimized=True)
        contenders = C.encoder_contenders(task, ckpt, plain, opt, threads)
        label = f"{arch}-base"
    built, errors = {}, {}
    for name, build in contenders.items():
        try:
            built[name] = build()
        except Exception as e:  # a contender that cannot load this model is reported, not fatal
            errors[name] = f"load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    paths = {n: ("session+tokenizer only (pipeline not committed yet)" if isinstance(p, C.SessionOnly) else "pipeline")
             for n, p in built.items()}
    tok_json = plain / "tokenizer.json"
    rows = []
    for batch, length in shapes:
        budget, lo, hi = BUDGET_512[mode] if length == 512 else BUDGET[mode][batch]
        inputs = _inputs(task, tok_json, batch, length)
        calls = {name: _call(task, pipe, inputs, batch, length) for name, pipe in built.items()}
        # the floors, timed in the same rounds as the contenders: the model's matmuls chained in one ORT graph,
        # and a GEMM of a favourable shape whose rate gives that round's peak-rate floor
        chain, probe = EncoderMatmulChain(seq=length, batch=batch, threads=threads, **SHAPES[arch]), GemmProbe(threads)
        calls[FLOOR_CHAIN], calls[FLOOR_PROBE] = chain, probe
        print(f"bench: {arch} {task} batch {batch} len {length}: {len(calls) - 2} contenders and the two floors", flush=True)
        times, case_errors = time_interleaved(calls, budget_s=budget, min_reps=lo, max_reps=hi, warmup=1)
        case_errors.update(errors)
        chain_t, probe_t = times.pop(FLOOR_CHAIN), times.pop(FLOOR_PROBE)
        probe_flop, probe_shape = probe.flop, probe.shape
        del chain, probe, calls
        gc.collect()
        flops = encoder_gflop(seq=length, batch=batch, **SHAPES[arch])
        ref = times.get(C.REFERENCE)
        # per round: the peak-rate floor (the model's FLOPs at the probe's rate that round) and the chained matmuls
        round_floor = [flops / (probe_flop / 1e9 / t) for t in probe_t]
        rates = summarize([probe_flop / 1e9 / t for t in probe_t], scale=1.0)
        chain_summary = summarize(chain_t)
        floor_ms, chain_ms = float(np.median(round_floor)) * 1e3, chain_summary["p50"]
        row = {"model": label, "arch": arch, "task": task, "batch": batch, "length": length,
               "gflop": flops, "floor_ms": floor_ms, "gemm_gflops_case": rates["p50"], "floor_shapes_ms": chain_ms,
               "floor_ms_run_start": flops / gemm_gflops * 1e3 if gemm_gflops else None,
               "floor_paired": {"peak_rate_ms": summarize(round_floor, scale=1e3), "probe_shape": probe_shape,
                                "probe_gflops": rates, "chain_ms": chain_summary},
               "errors": case_errors, "contenders": {}}
        for name, t in times.items():
            s = summarize(t)
            s["speedup_vs_torch"] = paired_speedup(ref, t) if ref else None
            s["path"] = paths[name]
            if batch > 1:
                s["items_per_s"] = batch / (s["p50"] / 1e3)
            s["floor_over_p50"] = floor_ms / s["p50"]
            s["shape_floor_over_p50"] = chain_ms / s["p50"]
            # this contender's time over the floors of the same round (median, min, max)
            s["over_peak_floor"] = paired_speedup(t, round_floor)
            s["over_chain_floor"] = paired_speedup(t, chain_t)
            row["contenders"][name] = s
        rows.append(row)
    del built
    gc.collect()
    return rows


def _inputs(task, tok_json, batch, length):
    if task == "question-answering":
        return qa_pairs(tok_json, length, batch)
    return texts_of_length(tok_json, length, batch)


def _call(task, pipe, inputs, batch, length):
    if task == "question-answering":
        # transformers splits a context longer than max_seq_len (384) into windows: give every contender
        # room for the whole length so the 512 case is one 512-token window, not two of 384.
        extra = {"max_seq_len": length} if length > 384 else {}
        if batch == 1:
            return lambda: pipe(question=inputs[0]["question"], context=inputs[0]["context"], **extra)
        qs, cs = [p["question"] for p in inputs], [p["context"] for p in inputs]
        return lambda: pipe(question=qs, context=cs, batch_size=batch, **extra)
    if batch == 1:
        return lambda: pipe(inputs[0])
    return lambda: pipe(inputs, batch_size=batch)
