"""Greedy generation: time to first token (prefill) and decode tokens/s, batch 1 and 8.

Every contender runs `generate(input_ids, attention_mask, max_new_tokens=N, min_new_tokens=N,
do_sample=False)` on the same prompt ids (min_new_tokens so an early EOS cannot shorten a run)
and is handed a callback that timestamps each new token: transformers' streamer `put()` (torch
and Optimum) and onnxpipe's `on_tokens`. One 256-token run so gives the prefill time, decode
tokens/s over the first 64 new tokens and over all 256, and the median step time.
"""
from __future__ import annotations

import gc
import random
import time
import traceback
import warnings

import numpy as np

from . import artifacts, contenders as C
from .limits import BandwidthProbe, DecodeMatmuls
from .timing import GAP_S, paired_speedup, summarize

# The export's int8 for decoders is weight-only 8-bit MatMulNBits; dynamic int8 (what the export wrote
# before, and still writes for encoders) is measured beside it on the same fp32 graph.
DYNAMIC = "onnxpipe int8 (dynamic)"
PROMPT_TOKENS = 64
NEW_TOKENS = 256
WINDOWS = (64, 256)
MATMUL_FLOOR = "floor: the fp32 step's weight MatMuls alone"
BANDWIDTH = "probe: numpy read bandwidth"


def run(threads: int, quick: bool, bandwidth_gbs: float | None, only: list[str] | None = None) -> list[dict]:
    models = ["smollm2", "gpt2"]
    if only:
        models = [m for m in models if m in only] or models
    # batch -> (rounds, new tokens): batch 1 is what the targets are about; each run already times every step,
    # and a full run has to fit beside the encoder cases in ~25 minutes on 2 shared cores
    plan = {1: (1, 64)} if quick else {1: (2, NEW_TOKENS), 8: (1, 64)}
    rows = []
    for name in models:
        rows += _run_model(name, threads, quick, plan, bandwidth_gbs)
    return rows


def prompt_ids(tokenizer, batch: int, length: int = PROMPT_TOKENS) -> np.ndarray:
    """`batch` different prompts of exactly `length` tokens, cut from real English news text."""
    from .fidelity import news_articles

    rows = []
    for text in news_articles(batch):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        if len(ids) < length:
            raise RuntimeError("a news article is shorter than the prompt length")
        rows.append(ids)
    return np.array(rows, dtype=np.int64)


def _run_model(name, threads, quick, plan, bandwidth_gbs) -> list[dict]:
    if name == "smollm2":
        ckpt, export, label = artifacts.smollm2_hf(), artifacts.smollm2_export(), "SmolLM2-135M (real)"
    else:
        ckpt, export, label = artifacts.checkpoint("gpt2", "text-generation"), artifacts.gpt2_export(), "GPT-2-small (random)"
    dynamic, dynamic_error = None, None
    if not quick:
        try:
            dynamic = artifacts.requantized(export, "qint8", per_channel=True)
        except ValueError as e:  # refused for a fused decoder: it comes out wrong (export/quantize.py)
            dynamic_error = f"refused by the export: {e}"
    builders = {
        C.REFERENCE: lambda: TorchGen(ckpt, threads),
        "transformers torch int8 (dynamic)": lambda: TorchGen(ckpt, threads, int8=True),
        "Optimum ORT fp32": lambda: OptimumGen(export, threads),
        "onnxpipe fp32": lambda: OnnxpipeGen(export, threads, "fp32"),
        "onnxpipe int8": lambda: OnnxpipeGen(export, threads, "int8"),
    }
    if dynamic is not None:
        builders[DYNAMIC] = lambda: OnnxpipeGen(dynamic, threads, "int8")
    if quick:
        builders.pop("transformers torch int8 (dynamic)")
    built, errors = {}, ({DYNAMIC: dynamic_error} if dynamic_error else {})
    for cname, build in builders.items():
        try:
            built[cname] = build()
        except Exception as e:
            errors[cname] = f"load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(limit=3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    weight_bytes = {"fp32": streamed_weight_bytes(export / "model.onnx"), "int8": streamed_weight_bytes(export / "model.int8.onnx")}
    if dynamic is not None:
        weight_bytes["int8 dynamic"] = streamed_weight_bytes(dynamic / "model.int8.onnx")
    rows = []
    for batch, (rounds, new_tokens) in plan.items():
        ids = prompt_ids(tok, batch)
        mask = np.ones_like(ids)
        case_errors = dict(errors)
        calls = dict(built)
        for cname in list(calls):  # warm-up, and drop a contender that fails here
            try:
                calls[cname](ids, mask, 4)
            except Exception as e:
                case_errors[cname] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc(limit=3)
                del calls[cname]
        print(f"bench: {name} batch {batch}: {len(calls)} contenders, {rounds} x {new_tokens} new tokens", flush=True)
        # the fp32 step's weight MatMuls alone through ONNX Runtime's kernels (the floor of any ORT decoder), timed
        # in the same rounds as the contenders
        calls[MATMUL_FLOOR] = DecodeMatmuls(export / "model.onnx", threads, batch=batch)
        # and the machine's read bandwidth, sampled in the same rounds too
        calls[BANDWIDTH] = BandwidthProbe(threads)
        stamps = {c: [] for c in calls}
        names = list(calls)
        for r in range(rounds):
            for cname in random.Random(r).sample(names, len(names)):
                gc.collect()
                time.sleep(GAP_S)
                stamps[cname].append(calls[cname](ids, mask, new_tokens))
        probe = calls.pop(BANDWIDTH)
        bw_rounds = [probe.gbs(r) for r in stamps.pop(BANDWIDTH)]  # GB/s, per round
        bw_case = float(np.median(bw_rounds))
        del probe
        floor = calls.pop(MATMUL_FLOOR)
        floor_runs = stamps.pop(MATMUL_FLOOR)
        floor_steps = [float(np.median(np.diff(r))) for r in floor_runs]  # per round, seconds
        mm_floor = floor.summary([t * 1e3 for r in floor_runs for t in np.diff(r)])
        mm_floor["per_round_ms"] = [t * 1e3 for t in floor_steps]
        del floor
        row = {"model": label, "key": name, "batch": batch, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
               "weight_bytes_streamed": weight_bytes, "bandwidth_gbs": bw_case, "bandwidth_gbs_rounds": bw_rounds,
               "bandwidth_gbs_run_start": bandwidth_gbs,
               "matmul_floor_fp32": mm_floor,
               "errors": case_errors,
               "export": str(export), "prefill_last_logits_only": _has_logits_to_keep(export),
               "contenders": {}}
        ref = stamps.get(C.REFERENCE)
        for cname, runs in stamps.items():
            row["contenders"][cname] = _summarize_runs(runs, ref, batch, new_tokens)
            run_steps = [float(np.median(np.diff(r))) for r in runs]  # per round: the median step, seconds
            precision = "int8 dynamic" if "dynamic" in cname else "int8" if "int8" in cname else "fp32"
            wb = weight_bytes.get(precision)
            if wb:
                ceiling = bw_case * 1e9 / wb  # one pass over the weights per decode step
                row["contenders"][cname]["ceiling_steps_per_s"] = ceiling
                # round by round: this contender's step rate over the ceiling at the bandwidth sampled in that round
                shares = [(1.0 / step) / (bw * 1e9 / wb) for bw, step in zip(bw_rounds, run_steps)]
                row["contenders"][cname]["of_ceiling"] = float(np.median(shares))
            if precision == "fp32":
                # round by round: the matmuls' step time over this contender's step time in the same round
                ratios = [f / step for f, step in zip(floor_steps, run_steps)]
                row["contenders"][cname]["of_matmul_ceiling"] = float(np.median(ratios))
                row["contenders"][cname]["of_matmul_ceiling_range"] = [float(min(ratios)), float(max(ratios))]
        rows.append(row)
    del built, calls
    gc.collect()
    return rows


def _has_logits_to_keep(export) -> bool:
    import json

    manifest = json.loads((export / "onnxpipe.json").read_text())
    inputs = [i["name"] for i in manifest.get("io", {}).get("model", {}).get("inputs", [])]
    return bool(manifest.get("logits_to_keep_input")) or "logits_to_keep" in inputs


def _summarize_runs(runs: list[np.ndarray], ref: list[np.ndarray] | None, batch: int, new_tokens: int) -> dict:
    """runs: per run, the seconds since the call at which each new token arrived."""
    ttft = [r[0] for r in runs]
    out = {"prefill_ms": summarize(ttft), "runs": len(runs)}
    for w in WINDOWS:
        if w > new_tokens:
            continue
        rates = [(w - 1) / (r[w - 1] - r[0]) for r in runs]
        out[f"decode_{w}"] = {"steps_per_s": float(np.median(rates)), "tokens_per_s": float(np.median(rates)) * batch,
                              "min": float(min(rates)) * batch, "max": float(max(rates)) * batch}
        if ref:
            ref_rates = [(w - 1) / (r[w - 1] - r[0]) for r in ref]
            out[f"decode_{w}"]["speedup_vs_torch"] = paired_speedup([1 / x for x in ref_rates], [1 / x for x in rates])
    steps = np.concatenate([np.diff(r) for r in runs])
    out["step_ms"] = summarize(list(steps))
    out["steps_per_s"] = 1e3 / out["step_ms"]["p50"]
    if ref:
        out["prefill_speedup_vs_torch"] = paired_speedup([r[0] for r in ref], ttft)
    return out


class _Stamps:
    """transformers streamer: put() gets the prompt once, then each step's new tokens."""

    def __init__(self, t0: float):
        self.t0, self.times, self.seen_prompt = t0, [], False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter() - self.t0)

    def end(self):
        pass


class TorchGen:
    def __init__(self, ckpt, threads: int, int8: bool = False):
        import torch
        import transformers

        C.set_torch_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            if int8:
                from torch.ao.quantization import quantize_dynamic

                self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.torch = torch
        self.pad = self.model.generation_config.pad_token_id or self.model.generation_config.eos_token_id

    def __call__(self, ids, mask, new_tokens):
        t0 = time.perf_counter()
        stamps = _Stamps(t0)
        with warnings.catch_warnings(), self.torch.inference_mode():
            warnings.simplefilter("ignore")
            self.model.generate(self.torch.from_numpy(ids), attention_mask=self.torch.from_numpy(mask),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=self.pad, streamer=stamps)
        return np.array(stamps.times)


class OptimumGen(TorchGen):
    def __init__(self, export_dir, threads: int):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        from onnxpipe.session import on_process_pool

        so = on_process_pool(ort.SessionOptions(), threads)
        so.log_severity_level = 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = ORTModelForCausalLM.from_pretrained(export_dir, file_name="model.onnx", session_options=so,
                                                             provider="CPUExecutionProvider", use_cache=True,
                                                             use_io_binding=False)
        self.torch = torch
        self.pad = self.model.generation_config.pad_token_id or self.model.generation_config.eos_token_id
        if "logits_to_keep" in self.model.input_names:
            _feed_logits_to_keep(self.model)


def _feed_logits_to_keep(model) -> None:
    """Optimum 2.1 does not know our exports' logits_to_keep input: give it 1, as transformers' generate would."""
    import torch

    prepare = model._prepare_onnx_inputs

    def prepare_with_keep(use_torch, model_inputs):
        keep = torch.ones(1, dtype=torch.int64) if use_torch else np.ones(1, dtype=np.int64)
        return prepare(use_torch, {**model_inputs, "logits_to_keep": keep})

    model._prepare_onnx_inputs = prepare_with_keep


class OnnxpipeGen:
    def __init__(self, export_dir, threads: int, precision: str):
        self.pipe = C.onnxpipe_pipeline("text-generation", export_dir, threads, precision)

    def __call__(self, ids, mask, new_tokens):
        times = []
        t0 = time.perf_counter()
        self.pipe.generate(ids, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           on_tokens=lambda _: times.append(time.perf_counter() - t0))
        return np.array(times)


def streamed_weight_bytes(onnx_path) -> int:
    """Bytes of initializers a decode step reads in full: all but embedding tables only gathered from.

    A tied embedding exported twice (a Gather table and the LM head's MatMul weight) is read once
    per token, as the LM head; the Gather reads one row per token.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    produced_by = {o: n for n in g.node for o in n.output}

    def only_gathered(name, depth=0) -> bool:
        uses = consumers.get(name, [])
        if not uses or depth > 2:
            return False
        for node, i in uses:
            if node.op_type == "Gather" and i == 0:
                continue
            if node.op_type in ("DequantizeLinear", "Cast") and i == 0 and all(only_gathered(o, depth + 1) for o in node.output):
                continue
            return False
        return True

    total = 0
    for init in g.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        size = n * {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2, 21: 1, 22: 1}.get(init.data_type, 4)
        if init.data_type in (21, 22):  # uint4 / int4 packed two per byte
            size = (n + 1) // 2
        if not only_gathered(init.name):
            total += size
    del produced_by
    return total
