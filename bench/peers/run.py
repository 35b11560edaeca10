"""`python -m bench peers`: onnxpipe beside the engines users pick for speed (issue 26).

onnxruntime-genai, llama.cpp (llama-cpp-python), CTranslate2 and OpenVINO, each in its own venv
(bench/peers/install.py), each contender in its own process (bench/peers/worker.py), all with the same weights,
the same inputs and the same thread count. Contenders of one workload take turns in a seeded shuffle each round
(the machine is shared: whatever else runs hits them all alike) and each peer's ratio to onnxpipe at the same
precision is taken round by round (> 1: the peer is faster).

Workloads: SmolLM2-135M decode at batch 1 and at batch 8 (8 prompts decoding together: onnxpipe's continuous-batching
engine, the peers' batch APIs; BATCHING says what each engine offers), the int4 variants' perplexity
(bench/peers/int4_variants.py), BERT-base encode. `python -m bench.peers.run decode_b8` runs some alone (into bench/results/quick/).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import install, int4_variants, models

WORKER = Path(__file__).resolve().parent / "worker.py"
GAP_S = 0.1  # ORT / OpenMP pools spin for a while after a call (bench/timing.py)
PROMPT_TOKENS = 64
# OpenMP engines (llama.cpp, CTranslate2) with the default active wait, 2 threads on 2 cores other work also uses:
# every barrier (several per op) waits for a thread the kernel descheduled. Measured here while building this case
# (load average ~5.7): llama.cpp Q4_1 decoded 0.2 tok/s with the default wait, 33 with OMP_WAIT_POLICY=PASSIVE and
# 37 with 1 thread. Every worker gets the passive wait (ONNX Runtime and OpenVINO do not use OpenMP here).
OMP_WAIT = "PASSIVE"
BATCH = 8  # the batch decode workload's sequences
# the sections of a run, in order; `python -m bench.peers.run a b` runs only those
WORKLOADS = ("decode", "decode_b8", "int4_fidelity", "encode")
# what each engine offers for decoding several sequences together (issue 26: "record what each engine offers")
BATCHING = {
    "onnxpipe": "continuous batching: `onnxpipe.generation.engine.GenerationEngine` (requests join and leave between "
                "steps, one session call per step for all; the server runs it, `--max-running 16` by default); the "
                "pipeline also takes a static batch (`batch_size=`). Measured here: the engine.",
    "onnxruntime-genai": "static batch in its Python API: `GeneratorParams.set_search_options(batch_size=B)` and one "
                         "[B, length] prompt array per Generator (every sequence starts together; equal lengths here, "
                         "unequal ones are padded with its pad token); no continuous batching in 0.18. Measured here.",
    "llama.cpp": "llama-cpp-python's high-level `Llama` decodes one sequence (context n_seq_max 1, `generate()` takes "
                 "one prompt); its low-level bindings (`llama_batch` with a seq_id per sequence, `n_seq_max`, one "
                 "`llama_decode` per step) do what `llama-server --parallel N` does with its slots (continuous "
                 "batching over slots; llama-cpp-python does not build the server binary). Measured here: the low-level "
                 "API, greedy argmax in Python; `llama-server --parallel 8` itself, built from the same vendored "
                 "sources, beside `onnxpipe serve` in `python -m bench.peers.server` (bench/results/peers_server.md).",
    "ctranslate2": "static batch: `Generator.generate_batch` (sequences that finish leave the batch; `max_batch_size`, "
                   "`batch_type` split large ones); continuous batching is not in its Python API. Measured here.",
    "openvino": "not a decoder peer here (decoding needs optimum-intel / openvino-genai exports): not measured.",
}


class Worker:
    """One contender: a process of its engine's interpreter speaking worker.py's JSON lines."""

    def __init__(self, python: Path | str, label: str):
        self.label = label
        self.log = open(models.MODELS.parent / "logs" / f"{label.replace(' ', '_').replace('/', '-')}.log", "a") \
            if (models.MODELS.parent / "logs").exists() else subprocess.DEVNULL
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": OMP_WAIT}
        self.p = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, env=env, cwd=str(install.ROOT))

    def ask(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req, default=_jsonable) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the worker died (exit {self.p.wait()})")
        out = json.loads(line)
        if not out.get("ok"):
            raise RuntimeError(out.get("error", "failed"))
        return out

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    raise TypeError(type(x))


def _workloads(asked=None) -> list[str]:
    """The workloads asked for (all when none): only `python -m bench.peers.run`, which writes a partial file, asks
    for some, so a full run's peers.json and README table are never replaced by part of one."""
    asked = asked or []
    unknown = [w for w in asked if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {', '.join(unknown)}: use any of {', '.join(WORKLOADS)}")
    return [w for w in WORKLOADS if w in asked] if asked else list(WORKLOADS)


def run(threads: int, quick: bool, meta: dict, workloads: list[str] | None = None) -> dict:
    (models.MODELS.parent / "logs").mkdir(parents=True, exist_ok=True)
    todo = _workloads(workloads)
    if todo != list(WORKLOADS):
        meta["workloads"] = todo
    meta["omp_wait_policy"] = (f"OMP_WAIT_POLICY={OMP_WAIT} in every worker: with OpenMP's default active wait, "
                               "llama.cpp's 2 threads on the 2 shared cores stalled at every barrier (bench/peers/run.py)")
    res: dict = {"meta": meta, "installs": {}, "preparation_errors": {}, "decode": [], "decode_batch": [], "encode": [],
                 "batching": dict(BATCHING)}
    t0 = time.time()
    # ONNXPIPE_PEERS=a,b narrows the engines (a development run); the others are recorded as not asked for
    wanted = [e.strip() for e in os.environ.get("ONNXPIPE_PEERS", "").split(",") if e.strip()] or list(install.ENGINES)
    for engine in install.ENGINES:
        if engine not in wanted:
            res["installs"][engine] = {"error": "not asked for (ONNXPIPE_PEERS)"}
            continue
        print(f"bench peers: {engine}: install (once)", flush=True)
        res["installs"][engine] = install.ensure(engine)
    res["installs"]["onnxpipe"] = {"versions": {k: v for k, v in meta.get("versions", {}).items()
                                                if k in ("onnxruntime", "numpy", "tokenizers")},
                                   "size_mb": _onnxpipe_size_mb(), "size_note": "serve-time closure (numpy, tokenizers, onnxruntime)"}
    ok = {e for e, r in res["installs"].items() if "error" not in r}
    # a full run fits ~15 minutes on the 2 shared cores here (decode at 5-15 tok/s under a load of 8)
    plan_decode = (2, 32) if quick else (3, 96)  # rounds, new tokens
    plan_batch = (2, 16) if quick else (3, 32)  # rounds, new tokens per sequence (BATCH sequences)
    plan_encode = (3, 3) if quick else (6, 3)  # rounds, forwards per call (their median)
    if "decode" in todo:
        res["decode"] = _decode(threads, ok, res["preparation_errors"], *plan_decode)
        _stamp(res, "decode", t0)
    if "decode_b8" in todo:
        res["decode_batch"] = _decode_batch(threads, ok, res["preparation_errors"], *plan_batch)
        res["server_concurrent"] = _server_concurrent()
        _stamp(res, "decode b8", t0)
    if "int4_fidelity" in todo:
        try:
            res["int4_fidelity"] = int4_variants.perplexity(threads, n_articles=2 if quick else 4)
        except Exception as e:
            res["preparation_errors"]["int4 perplexity"] = f"{type(e).__name__}: {e}"
        _stamp(res, "int4 perplexity", t0)
    if "encode" in todo:
        res["encode"] = _encode(threads, ok, res["preparation_errors"], *plan_encode)
        _stamp(res, "encode", t0)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["duration_s"] = round(time.time() - t0, 1)
    return res


def _stamp(res, name, t0):
    load = [round(x, 2) for x in os.getloadavg()]
    res["meta"].setdefault("sections", {})[name] = {"done_after_s": round(time.time() - t0, 1), "loadavg": load}
    print(f"bench peers: {name} done after {time.time() - t0:.0f} s (load average {load})", flush=True)


def _onnxpipe_size_mb() -> float | None:
    """onnxpipe's serve-time closure (numpy, tokenizers, onnxruntime and what they require) in this venv."""
    try:
        from ..size import SERVE_ROOTS, closure_size

        return round(closure_size(SERVE_ROOTS)["bytes"] / 1e6, 1)
    except Exception:
        return None


# --- decode --------------------------------------------------------------------------------------------------------

def _decode_contenders(ok: set, errors: dict, threads: int, batch: bool = False) -> dict:
    """precision -> [(label, engine, load request)]; what cannot be prepared is recorded in `errors`. With `batch`:
    the contenders of the batch decode workload (the same weights; llama.cpp through its low-level API)."""
    hf = models.artifacts.smollm2_hf()
    onnx_dir = models.smollm2_onnx()
    groups = {p: [(f"onnxpipe {p}", "onnxpipe", {"onnx_dir": onnx_dir, "variant": p})] for p in ("fp32", "int8", "int4")}
    try:  # the faster, less faithful int4 (bench/peers/int4_variants.py)
        groups["int4"].append((int4_variants.NAME, "onnxpipe", {"onnx_dir": int4_variants.folder(), "variant": "int4"}))
    except Exception as e:
        errors[int4_variants.NAME] = f"{type(e).__name__}: {e}"
    if "onnxruntime-genai" in ok:
        for p, bp in (("fp32", "fp32"), ("int8", "int8"), ("int4", "int4")):
            try:
                d = _genai_build(hf, bp)
                groups[p].append((f"onnxruntime-genai {bp}", "onnxruntime-genai",
                                  {"genai_dir": d, "variant": bp, "builder_precision": bp}))
            except Exception as e:
                errors[f"onnxruntime-genai {bp}"] = str(e)
    if "llama.cpp" in ok:
        src = models.smollm2_gguf()
        for p, ft in (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_1")):
            try:
                g = src if ft == "Q4_1" else _llama_requant(src, ft)
                groups[p].append((f"llama.cpp {ft}" + (" (low-level batch)" if batch else ""), "llama.cpp",
                                  {"gguf": g, "variant": ft}))
            except Exception as e:
                errors[f"llama.cpp {ft}"] = str(e)
    if "ctranslate2" in ok:
        try:
            d = _ct2_convert(hf, "smollm2", "decoder")
            groups["fp32"].append(("CTranslate2 float32", "ctranslate2", {"ct2_dir": d, "hf_dir": hf, "variant": "float32"}))
            groups["int8"].append(("CTranslate2 int8", "ctranslate2", {"ct2_dir": d, "hf_dir": hf, "variant": "int8"}))
        except Exception as e:
            errors["CTranslate2 SmolLM2"] = str(e)
        errors["CTranslate2 4-bit"] = "not offered: CTranslate2's int4 is AWQ checkpoints only (no weight-only int4 of a float model)"
    errors["OpenVINO decode"] = ("not measured: OpenVINO decodes through optimum-intel / openvino-genai exports "
                                 "(optimum-intel is 1.5 GB); it cannot read onnxpipe's fused decoder (com.microsoft ops)")
    return groups


def _genai_build(hf: Path, precision: str) -> Path:
    out = models.MODELS / f"genai-smollm2-{precision}"
    if (out / "genai_config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    cmd = ["nice", "-n", "10", str(install.python("onnxruntime-genai")), "-m", "onnxruntime_genai.models.builder",
           "-i", str(hf), "-o", str(tmp), "-p", precision, "-e", "cpu", "-c", str(models.MODELS / "genai-cache")]
    # the builder's own defaults for CPU (what a user gets), whatever they are in this version
    print(f"bench peers: onnxruntime-genai model builder, {precision} (once)", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"model builder -p {precision} failed: " + " | ".join(r.stderr.strip().splitlines()[-3:]))
    os.replace(tmp, out)
    return out


def _llama_requant(src: Path, ftype: str) -> Path:
    dst = models.smollm2_gguf_as(ftype)
    _once(dst, f"llama.cpp requantizes the GGUF to {ftype}", "llama.cpp", f"llama-quantize-{ftype}",
          op="llama_quantize", src=src, dst=dst, ftype=ftype)
    return dst


def _ct2_convert(hf: Path, name: str, kind: str) -> Path:
    out = models.MODELS / f"ct2-{name}"
    _once(out / "model.bin", f"CTranslate2 converts {name}", "ctranslate2", f"ct2-convert-{name}",
          op="ct2_convert", hf_dir=hf, out=out, kind=kind)
    return out


def _once(made: Path, what: str, engine: str, label: str, **request) -> None:
    """A conversion an engine's worker makes once: skipped while `made` exists."""
    if made.exists():
        return
    print(f"bench peers: {what} (once)", flush=True)
    w = Worker(install.python(engine), label)
    try:
        w.ask(**request)
    finally:
        w.close()


def _python_of(engine: str):
    return sys.executable if engine == "onnxpipe" else install.python(engine)


def _start(contenders, threads, workload, errors, extra=None) -> dict:
    live = {}
    for label, engine, req in contenders:
        w = Worker(_python_of(engine), label)
        try:
            info = w.ask(op="load", engine=engine, workload=workload, threads=threads, **req, **(extra or {}))["info"]
            live[label] = (w, info)
        except Exception as e:
            errors[label] = f"load failed: {e}"
            w.close()
    return live


def _interleaved(live: dict, rounds: int, errors: dict, warm_up: dict, measure) -> list[float]:
    """Warm every contender up with the request `warm_up` (one that fails is dropped, its error kept), then `rounds`
    rounds, each in a fresh seeded order, calling measure(label, worker) once per contender (an error is kept and
    the round goes on); -> the 1-min load average at the start of each round."""
    for label, (w, _) in list(live.items()):
        try:
            w.ask(**warm_up)
        except Exception as e:
            errors[label] = str(e)
            w.close()
            del live[label]
    load = []
    for r in range(rounds):
        load.append(os.getloadavg()[0])
        for label in random.Random(r).sample(list(live), len(live)):
            time.sleep(GAP_S)
            try:
                measure(label, live[label][0])
            except Exception as e:
                errors[label] = str(e)
    return load


def _decode(threads, ok, errors, rounds, new_tokens) -> list[dict]:
    """One prompt (the first PROMPT_TOKENS tokens of a news article), greedy, `new_tokens`: decode tokens/s after the
    first token."""
    return _decode_rounds(threads, ok, errors, rounds, new_tokens, batch=1)


def _decode_batch(threads, ok, errors, rounds, new_tokens) -> list[dict]:
    """BATCH different prompts decoding together: the first PROMPT_TOKENS tokens of BATCH news articles (the b1
    prompt is the first; equal lengths, so no engine pads), greedy, `new_tokens` each; the aggregate rate is every
    sequence's tokens after its first over the time from the step that gave the first tokens to the last step."""
    return _decode_rounds(threads, ok, errors, rounds, new_tokens, batch=BATCH)


def _decode_rounds(threads, ok, errors, rounds, new_tokens, batch: int) -> list[dict]:
    """The decode workloads' rounds: per precision, every contender warmed up, then each round in a fresh seeded
    order; rates, per-round ratios to onnxpipe, and greedy agreement with onnxpipe fp32 (the least over the
    sequences at batch > 1)."""
    from transformers import AutoTokenizer

    from ..generation import prompt_ids

    op = "decode" if batch == 1 else "decode_batch"
    groups = _decode_contenders(ok, errors, threads, batch=batch > 1)
    tok = AutoTokenizer.from_pretrained(models.artifacts.smollm2_hf())
    prompts = prompt_ids(tok, batch, PROMPT_TOKENS).tolist()
    ids = prompts[0] if batch == 1 else prompts
    rows, ref_tokens = [], None
    for precision, contenders in groups.items():
        print(f"bench peers: SmolLM2 decode b{batch} {precision}: {', '.join(c[0] for c in contenders)}", flush=True)
        case_errors = {}
        live = _start(contenders, threads, op, case_errors)
        rates = {label: [] for label in live}
        tokens = {}

        def measure(label, worker):
            out = worker.ask(op=op, ids=ids, n=new_tokens)
            s, t = out["stamps"], out["tokens"]
            if batch > 1 and (len(s) != new_tokens or len(t) != batch or any(len(x) != new_tokens for x in t)):
                raise RuntimeError(f"{len(s)} steps, tokens per sequence {[len(x) for x in t]}: not {new_tokens} each")
            rates[label].append(batch * (len(s) - 1) / (s[-1] - s[0]))  # decode tokens/s, the prefill excluded
            tokens[label] = t

        # warm-up: 4 tokens (and a batch's buffers)
        load = _interleaved(live, rounds, case_errors, {"op": op, "ids": ids, "n": 4}, measure)
        rates = {label: rs for label, rs in rates.items() if label in live}
        ref = f"onnxpipe {precision}"
        if ref_tokens is None:
            ref_tokens = tokens.get("onnxpipe fp32")
        row = {"workload": f"SmolLM2-135M decode b{batch}, {precision}", "precision": precision,
               **({"batch": batch} if batch > 1 else {}), "rounds": rounds, "prompt_tokens": PROMPT_TOKENS,
               "new_tokens": new_tokens, "loadavg_1min_per_round": load, "reference": ref, "errors": case_errors,
               "contenders": {}}
        for label, rs in rates.items():
            if not rs:
                continue
            c = {"info": live[label][1], "tokens_per_s": float(np.median(rs)), "min": float(min(rs)), "max": float(max(rs)),
                 "per_round": rs}
            if label != ref and rates.get(ref):
                c["ratio_vs_onnxpipe"] = _paired(rs, rates[ref])
            if ref_tokens and label in tokens:
                if batch == 1:
                    c["greedy_agrees_with_onnxpipe_fp32_for"] = _agree(tokens[label], ref_tokens)
                else:
                    per_seq = [_agree(a, b) for a, b in zip(tokens[label], ref_tokens)]
                    c["greedy_agrees_with_onnxpipe_fp32_for"] = min(per_seq)  # the least of the sequences
                    c["greedy_agreement_per_sequence"] = per_seq
            row["contenders"][label] = c
        for w, _ in live.values():
            w.close()
        rows.append(row)
    return rows


def _server_concurrent(path: Path | None = None) -> dict | None:
    """onnxpipe's server under concurrent streaming clients, from the generation load bench's last run (a separate
    run, not interleaved with the peers: HTTP, SSE, chat template, mixed lengths): shown beside the batch workload."""
    path = path or install.ROOT / "bench" / "results" / "serve_generation.json"
    try:
        d = json.loads(path.read_text())
        rows = [{k: r.get(k) for k in ("precision", "clients", "aggregate_tokens_per_s", "stream_tokens_per_s_p50",
                                       "ttft_p50_ms")}
                for r in d["runs"] if r.get("mode") == "after"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    m = d.get("machine") or {}
    return {"source": str(path.relative_to(install.ROOT)) if path.is_relative_to(install.ROOT) else str(path),
            "command": "python -m bench.serve_load --generation", "cpu": m.get("cpu_model"), "cpus": m.get("cpus"),
            "loadavg_1m": [m.get("loadavg_1m_before"), m.get("loadavg_1m_after")], "new_tokens": d.get("new_tokens"),
            "length_spread": d.get("length_spread"), "runs": sorted(rows, key=lambda r: (r["precision"], r["clients"]))}


def _paired(peer: list[float], ours: list[float]) -> dict:
    """Per round: the peer's rate over onnxpipe's (> 1: the peer is faster); median, min, max."""
    n = min(len(peer), len(ours))
    r = np.asarray(peer[:n]) / np.asarray(ours[:n])
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max()), "rounds": n}


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- encode --------------------------------------------------------------------------------------------------------

def _encode(threads, ok, errors, rounds, per_call) -> list[dict]:
    from tokenizers import Tokenizer

    from ..inputs import texts_of_length

    b = models.bert()
    tok_json = b["plain"] / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_json))
    tok.no_padding()
    tok.no_truncation()

    def enc(text):
        e = tok.encode(text)
        return {"ids": e.ids, "mask": e.attention_mask, "type_ids": e.type_ids}

    ct2_dir = None
    if "ctranslate2" in ok:
        try:
            ct2_dir = _ct2_convert(b["checkpoint"], "bert-base", "encoder")
        except Exception as e:
            errors["CTranslate2 BERT"] = str(e)
    rows = []
    for length in (16, 128):
        feeds = enc(texts_of_length(tok_json, length, 1)[0])
        calib = [enc(t) for t in texts_of_length(tok_json, length, 24, seed=1)]
        groups = {"fp32": [("onnxpipe fp32", "onnxpipe", {"onnx_dir": b["opt"], "variant": "fp32"})],
                  "int8": [("onnxpipe int8", "onnxpipe", {"onnx_dir": b["int8"], "variant": "int8"})]}
        if ct2_dir:
            groups["fp32"].append(("CTranslate2 float32", "ctranslate2", {"ct2_dir": ct2_dir, "variant": "float32"}))
            groups["int8"].append(("CTranslate2 int8", "ctranslate2", {"ct2_dir": ct2_dir, "variant": "int8"}))
        if "openvino" in ok:
            onnx_path = b["plain"] / "model.onnx"
            groups["fp32"].append(("OpenVINO f32", "openvino", {"onnx_path": onnx_path, "variant": "fp32",
                                                                "precision_hint": "f32"}))
            groups["int8"].append(("OpenVINO NNCF int8", "openvino", {"onnx_path": onnx_path, "variant": "int8",
                                                                     "calibration": calib}))
            groups["native default"] = [("onnxpipe fp32", "onnxpipe", {"onnx_dir": b["opt"], "variant": "fp32"}),
                                        ("onnxpipe int8", "onnxpipe", {"onnx_dir": b["int8"], "variant": "int8"}),
                                        ("OpenVINO default", "openvino", {"onnx_path": onnx_path, "variant": "default"})]
        for precision, contenders in groups.items():
            print(f"bench peers: BERT-base b1 L{length} {precision}: {', '.join(c[0] for c in contenders)}", flush=True)
            case_errors = {}
            live = _start(contenders, threads, "encode", case_errors, {"length": length})
            times = {label: [] for label in live}

            def measure(label, worker):
                times[label].append(float(np.median([worker.ask(op="encode", **feeds)["s"] for _ in range(per_call)])))

            load = _interleaved(live, rounds, case_errors, {"op": "encode", **feeds}, measure)
            times = {label: ts for label, ts in times.items() if label in live}
            ref = "onnxpipe fp32" if precision != "int8" else "onnxpipe int8"
            what = "OpenVINO's default precision (vs onnxpipe fp32)" if precision == "native default" else precision
            row = {"workload": f"BERT-base b1 L{length}, {what}", "length": length, "precision": precision,
                   "rounds": rounds, "forwards_per_round": per_call, "loadavg_1min_per_round": load,
                   "reference": ref, "errors": case_errors, "contenders": {}}
            for label, ts in times.items():
                if not ts:
                    continue
                c = {"info": live[label][1], "p50_ms": float(np.median(ts)) * 1e3, "min_ms": float(min(ts)) * 1e3,
                     "max_ms": float(max(ts)) * 1e3}
                if label != ref and times.get(ref):
                    # rates, as for decode: onnxpipe's time over the peer's, round by round
                    c["ratio_vs_onnxpipe"] = _paired([1 / t for t in ts], [1 / t for t in times[ref]])
                    if precision == "native default" and label.startswith("OpenVINO"):
                        c["ratio_vs_onnxpipe_int8"] = _paired([1 / t for t in ts], [1 / t for t in times["onnxpipe int8"]])
                row["contenders"][label] = c
            for w, _ in live.values():
                w.close()
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """`python -m bench.peers.run [WORKLOAD ...] [--quick] [--threads N]`: some of the workloads alone (a development
    or a focused run). Writes bench/results/quick/peers-partial.json and .md, never the full run's peers.json,
    peers.md or the README (`python -m bench peers` writes those)."""
    import argparse

    from .. import __main__ as bench_main
    from . import report

    parser = argparse.ArgumentParser(prog="python -m bench.peers.run")
    parser.add_argument("workloads", nargs="*", help=f"any of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    todo = _workloads(args.workloads)
    meta = bench_main.machine_info(args.threads, args.quick)
    meta["command"] = " ".join(["python -m bench.peers.run", *(argv if argv is not None else sys.argv[1:])])
    print(f"bench peers: {meta['mode']} run of {', '.join(todo)} with {args.threads} threads on {meta['cpu']} "
          f"({meta['cpu_features']}); load average {meta['loadavg_start']}", flush=True)
    res = run(args.threads, args.quick, meta, todo)
    out = bench_main.RESULTS / "quick"
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers-partial.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "peers-partial.md").write_text(report.markdown(res))
    print(f"wrote {out / 'peers-partial.json'} and {out / 'peers-partial.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
