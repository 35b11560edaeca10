"""One engine in one process, run by that engine's own interpreter (its venv under .cache/peers/, or onnxpipe's).

Standalone on purpose: it imports nothing from onnxpipe's bench, so each peer's venv needs only its own packages.
Protocol: one JSON object per line on stdin, one JSON reply per line on the original stdout (everything the
engines print goes to stderr):
  {"op": "load", "engine": E, "workload": "decode"|"encode", "variant": V, "threads": T, ...paths}
      -> {"ok": true, "info": {precision, version, ...}} | {"ok": false, "error": ...}
  {"op": "decode", "ids": [...], "n": N} -> {"stamps": [s after the call when each new token came], "tokens": [...]}
  {"op": "decode_batch", "ids": [[...], ...], "n": N} (workload "decode_batch": the sequences decode together)
      -> {"stamps": [s after the call when each step's tokens, for every sequence, were out], "tokens": [[...], ...]}
  {"op": "encode", "ids": [...], "mask": [...], "type_ids": [...]} -> {"s": seconds of one forward, "head": [...]}
  {"op": "quit"}
Times are taken here, around the engine's own call, so the pipe between the processes is not in them.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # engines' prints (llama.cpp's log, converters) go to stderr


def reply(obj) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def _version(dist: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return None


# --- onnxpipe (its own venv) ----------------------------------------------------------------------------------------

class OnnxpipeDecode:
    def __init__(self, req):
        os.environ.setdefault("ONNXPIPE_SESSION_CACHE", "off")
        import onnxpipe

        self.pipe = onnxpipe.pipeline("text-generation", model=req["onnx_dir"], precision=req["variant"],
                                      intra_op_num_threads=req["threads"])
        self.info = {"precision": req["variant"], "version": _version("onnxpipe"), "onnxruntime": _version("onnxruntime")}

    def decode(self, ids, n):
        import numpy as np

        stamps, toks = [], []
        a = np.array([ids], dtype=np.int64)
        t0 = time.perf_counter()

        def on(t):
            stamps.append(time.perf_counter() - t0)
            toks.append(t)
        out = self.pipe.generate(a, np.ones_like(a), max_new_tokens=n, min_new_tokens=n, do_sample=False, on_tokens=on)
        return stamps, [int(x) for x in np.asarray(out)[0, len(ids):]]


class OnnxpipeEncode:
    def __init__(self, req):
        os.environ.setdefault("ONNXPIPE_SESSION_CACHE", "off")
        import onnxpipe

        precision = "int8" if req["variant"] == "int8" else "fp32"
        self.model = onnxpipe.ModelDir(req["onnx_dir"], precision=precision, intra_op_num_threads=req["threads"])
        self.session = self.model.session()
        self.info = {"precision": precision, "graph": os.path.basename(str(req["onnx_dir"])),
                     "version": _version("onnxpipe"), "onnxruntime": _version("onnxruntime")}

    def encode(self, feeds):
        t0 = time.perf_counter()
        out = self.session.run(feeds)
        s = time.perf_counter() - t0
        return s, next(iter(out.values())).ravel()[:4].tolist()


class OnnxpipeDecodeBatch:
    """The continuous-batching engine the server runs (runtime/generation/engine.py): every request added, then
    stepped until done; all join in one prefill step (max_running 16, the server's default), then one decode step
    for all at a time. No prefix cache (0 MB): every round prefills, as every peer does."""

    def __init__(self, req):
        os.environ.setdefault("ONNXPIPE_SESSION_CACHE", "off")
        import onnxpipe
        from onnxpipe.generation.engine import GenerationEngine

        self.pipe = onnxpipe.pipeline("text-generation", model=req["onnx_dir"], precision=req["variant"],
                                      intra_op_num_threads=req["threads"])
        self.engine_cls, self.max_running = GenerationEngine, 16
        self.info = {"precision": req["variant"], "version": _version("onnxpipe"), "onnxruntime": _version("onnxruntime"),
                     "batching": "GenerationEngine (continuous batching, max_running 16, prefix cache off)"}

    def decode_batch(self, ids, n):
        engine = self.engine_cls(self.pipe, max_running=self.max_running, prefix_cache_mb=0)
        for i, row in enumerate(ids):  # the engine takes text: the ids' text, checked to tokenize back to the ids
            engine.add_request(i, self.pipe.tokenizer.decode(row), add_special_tokens=False, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False)
            got = engine.waiting[-1].ids[0].tolist()
            if got != list(row):
                raise ValueError(f"prompt {i}: its text tokenizes to other ids ({len(got)} tokens)")
        stamps, toks = [], [[] for _ in ids]
        t0 = time.perf_counter()
        while engine.has_unfinished():
            outs = engine.step()
            if any(o.new_token_ids for o in outs):
                stamps.append(time.perf_counter() - t0)
            for o in outs:
                toks[o.request_id] += o.new_token_ids
        return stamps, toks


# --- onnxruntime-genai ----------------------------------------------------------------------------------------------

class GenaiDecode:
    def __init__(self, req):
        import onnxruntime_genai as og

        folder = req["genai_dir"]
        cfg_path = os.path.join(folder, "genai_config.json")
        cfg = json.load(open(cfg_path))
        so = cfg["model"]["decoder"].setdefault("session_options", {})
        so["intra_op_num_threads"], so["inter_op_num_threads"] = req["threads"], 1
        json.dump(cfg, open(cfg_path, "w"), indent=1)
        self.og = og
        self.model = og.Model(folder)
        self.info = {"precision": req["variant"], "builder_precision": req.get("builder_precision"),
                     "version": _version("onnxruntime-genai"), "onnxruntime": _version("onnxruntime")}

    def decode(self, ids, n):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        stamps, toks = [], []
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens([ids])
        while not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter() - t0)
        return stamps, toks


class GenaiDecodeBatch(GenaiDecode):
    """Its static batch: GeneratorParams batch_size, the prompts appended as one [batch, length] array (equal lengths:
    unequal ones need the pad token and its mask); one generate_next_token() steps every sequence."""

    def __init__(self, req):
        super().__init__(req)
        self.info["batching"] = "static batch (search option batch_size, one Generator)"

    def decode_batch(self, ids, n):
        import numpy as np

        og = self.og
        a = np.array(ids, dtype=np.int32)
        params = og.GeneratorParams(self.model)
        params.set_search_options(batch_size=len(ids), max_length=a.shape[1] + n, min_length=a.shape[1] + n,
                                  do_sample=False)
        stamps, toks = [], []
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(a)
        while not gen.is_done():
            gen.generate_next_token()
            toks.append([int(t) for t in gen.get_next_tokens()])
            stamps.append(time.perf_counter() - t0)
        return stamps, [list(r) for r in zip(*toks)]


# --- llama.cpp (llama-cpp-python) -----------------------------------------------------------------------------------

class LlamaDecode:
    def __init__(self, req):
        import llama_cpp

        self.llm = llama_cpp.Llama(req["gguf"], n_threads=req["threads"], n_threads_batch=req["threads"], n_ctx=1024,
                                   n_batch=512, verbose=False)
        self.info = {"precision": req["variant"], "gguf": os.path.basename(req["gguf"]),
                     "version": _version("llama-cpp-python"), "system_info": llama_cpp.llama_print_system_info().decode()}

    def decode(self, ids, n):
        self.llm.reset()  # no prompt reuse from the previous call: every run prefills
        stamps, toks = [], []
        t0 = time.perf_counter()
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter() - t0)
            toks.append(int(tok))
            if len(toks) == n:
                break
        return stamps, toks


class LlamaDecodeBatch:
    """llama-cpp-python's high-level Llama runs one sequence (its context has n_seq_max 1; generate() takes one
    prompt). Its low-level bindings reach what llama-server's parallel slots do: a context with n_seq_max = batch,
    one llama_batch holding a token of every sequence (its own seq_id and position), one llama_decode per step,
    greedy argmax here on each sequence's logits. Context settings as the high-level Llama's (flash attention off,
    the default f16 KV cache); the KV cache is unified off (llama.cpp's default): n_ctx split over the sequences."""

    def __init__(self, req):
        import llama_cpp as L

        self.L = L
        self.threads = req["threads"]
        self.model = L.llama_model_load_from_file(req["gguf"].encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama_model_load_from_file failed: {req['gguf']}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.ctx = self.batch = None
        self.shape = None  # (sequences, positions per sequence, tokens per llama_decode) of the context made
        self.info = {"precision": req["variant"], "gguf": os.path.basename(req["gguf"]),
                     "version": _version("llama-cpp-python"), "system_info": L.llama_print_system_info().decode(),
                     "batching": "low-level API: n_seq_max sequences, one llama_decode per step (llama-server's slots)"}

    def _context(self, b, length, n):
        L = self.L
        per_seq, n_batch = 256 * -(-(length + n) // 256), max(512, b * length)  # the prompts in one llama_decode
        if self.shape == (b, per_seq, n_batch):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)  # every run prefills
            return
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = b * per_seq, b
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = L.llama_batch_init(cp.n_batch, 0, b)
        self.shape = (b, per_seq, n_batch)

    def _fill(self, rows):  # (token, position, sequence, wants logits)
        bt = self.batch
        bt.n_tokens = len(rows)
        for j, (t, pos, s, lg) in enumerate(rows):
            bt.token[j], bt.pos[j], bt.n_seq_id[j], bt.logits[j] = int(t), pos, 1, lg
            bt.seq_id[j][0] = s

    def _argmax(self, i):
        import numpy as np

        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def decode_batch(self, ids, n):
        L = self.L
        b, length = len(ids), len(ids[0])
        if any(len(r) != length for r in ids):
            raise ValueError("equal prompt lengths only")
        self._context(b, length, n)
        stamps, toks = [], []
        t0 = time.perf_counter()
        self._fill([(ids[s][k], k, s, k == length - 1) for s in range(b) for k in range(length)])
        if L.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed (prefill)")
        last = [self._argmax(s * length + length - 1) for s in range(b)]
        toks.append(last)
        stamps.append(time.perf_counter() - t0)
        for step in range(1, n):
            self._fill([(last[s], length + step - 1, s, True) for s in range(b)])
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError(f"llama_decode failed (step {step})")
            last = [self._argmax(s) for s in range(b)]
            toks.append(last)
            stamps.append(time.perf_counter() - t0)
        return stamps, [list(r) for r in zip(*toks)]


def llama_quantize(src: str, dst: str, ftype: str) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[ftype]
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst + ".partial"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    os.replace(tmp, dst)
    return {"gguf": dst}


# --- CTranslate2 ----------------------------------------------------------------------------------------------------

def ct2_convert(hf_dir: str, out: str, kind: str) -> dict:
    import ctranslate2

    tmp = out + ".partial"
    src = hf_dir
    if kind == "encoder":  # CTranslate2 converts the BERT encoder (BertModel); the classifier head is not its job
        import transformers

        base = transformers.BertModel.from_pretrained(hf_dir)
        src = out + ".bertmodel"
        base.save_pretrained(src)
        transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(src)
    ctranslate2.converters.TransformersConverter(src).convert(tmp, force=True)
    os.replace(tmp, out)
    return {"ct2_dir": out}


class Ct2Decode:
    def __init__(self, req):
        import ctranslate2
        import transformers

        self.gen = ctranslate2.Generator(req["ct2_dir"], device="cpu", compute_type=req["variant"],
                                         intra_threads=req["threads"], inter_threads=1)
        self.tok = transformers.AutoTokenizer.from_pretrained(req["hf_dir"])
        self.info = {"precision": req["variant"], "compute_type": self.gen.compute_type,
                     "version": _version("ctranslate2")}

    def decode(self, ids, n):
        tokens = self.tok.convert_ids_to_tokens(ids)
        stamps, toks = [], []
        t0 = time.perf_counter()

        def cb(step):
            stamps.append(time.perf_counter() - t0)
            toks.append(int(step.token_id))
            return False
        self.gen.generate_batch([tokens], max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                include_prompt_in_result=False, callback=cb)
        return stamps, toks


class Ct2DecodeBatch(Ct2Decode):
    """Its static batch: generate_batch with every prompt (one decode step for the batch; a finished sequence
    leaves the batch, none does here: min_length = max_length)."""

    def __init__(self, req):
        super().__init__(req)
        self.info["batching"] = "static batch (generate_batch; max_batch_size / batch_type to split)"

    def decode_batch(self, ids, n):
        prompts = [self.tok.convert_ids_to_tokens(r) for r in ids]
        stamps, toks = [], [[] for _ in ids]
        t0 = time.perf_counter()

        def cb(step):  # called for each sequence after each step: a step's stamp is its last sequence's
            toks[step.batch_id].append(int(step.token_id))
            if step.step == len(stamps):
                stamps.append(0.0)
            stamps[step.step] = time.perf_counter() - t0
            return False
        self.gen.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                include_prompt_in_result=False, callback=cb)
        return stamps, toks


class Ct2Encode:
    def __init__(self, req):
        import ctranslate2

        self.enc = ctranslate2.Encoder(req["ct2_dir"], device="cpu", compute_type=req["variant"],
                                       intra_threads=req["threads"], inter_threads=1)
        self.info = {"precision": req["variant"], "compute_type": self.enc.compute_type,
                     "version": _version("ctranslate2"), "graph": "BertModel (no classifier head)"}

    def encode(self, feeds):
        import numpy as np

        ids = feeds["input_ids"].tolist()
        t0 = time.perf_counter()
        out = self.enc.forward_batch(ids, token_type_ids=feeds["token_type_ids"].tolist())
        h = np.array(out.pooler_output if out.pooler_output is not None else out.last_hidden_state)
        s = time.perf_counter() - t0
        return s, h.ravel()[:4].tolist()


# --- OpenVINO -------------------------------------------------------------------------------------------------------

class OvEncode:
    def __init__(self, req):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(req["onnx_path"])
        length = req["length"]
        model.reshape({p.get_any_name(): ov.PartialShape([1, length]) for p in model.inputs})
        names = [p.get_any_name() for p in model.inputs]
        self.names = names
        if req["variant"] == "int8":
            import nncf

            calib = [{k: v for k, v in _feeds(c).items() if k in names} for c in req["calibration"]]
            model = nncf.quantize(model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calib))
        config = {"INFERENCE_NUM_THREADS": req["threads"], "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if req.get("precision_hint"):
            config["INFERENCE_PRECISION_HINT"] = req["precision_hint"]
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        hint = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))  # "<Type: 'bfloat16'>"
        hint = hint.split("'")[1] if hint.count("'") == 2 else hint
        self.info = {"precision": req["variant"], "INFERENCE_PRECISION_HINT": hint,
                     "asked_hint": req.get("precision_hint") or "(default)", "version": _version("openvino"),
                     "nncf": _version("nncf") if req["variant"] == "int8" else None}

    def encode(self, feeds):
        f = {k: v for k, v in feeds.items() if k in self.names}
        t0 = time.perf_counter()
        out = self.request.infer(f)
        s = time.perf_counter() - t0
        return s, next(iter(out.values())).ravel()[:4].tolist()


def _feeds(req) -> dict:
    import numpy as np

    return {"input_ids": np.array([req["ids"]], dtype=np.int64), "attention_mask": np.array([req["mask"]], dtype=np.int64),
            "token_type_ids": np.array([req["type_ids"]], dtype=np.int64)}


ADAPTERS = {("onnxpipe", "decode"): OnnxpipeDecode, ("onnxpipe", "encode"): OnnxpipeEncode,
            ("onnxruntime-genai", "decode"): GenaiDecode, ("llama.cpp", "decode"): LlamaDecode,
            ("ctranslate2", "decode"): Ct2Decode, ("ctranslate2", "encode"): Ct2Encode,
            ("openvino", "encode"): OvEncode,
            ("onnxpipe", "decode_batch"): OnnxpipeDecodeBatch, ("onnxruntime-genai", "decode_batch"): GenaiDecodeBatch,
            ("llama.cpp", "decode_batch"): LlamaDecodeBatch, ("ctranslate2", "decode_batch"): Ct2DecodeBatch}


def main() -> None:
    engine = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                reply({"ok": True})
                return
            if op == "load":
                os.environ["OMP_NUM_THREADS"] = str(req["threads"])
                engine = ADAPTERS[(req["engine"], req["workload"])](req)
                reply({"ok": True, "info": engine.info})
            elif op == "decode":
                stamps, toks = engine.decode(req["ids"], req["n"])
                reply({"ok": True, "stamps": stamps, "tokens": toks})
            elif op == "decode_batch":
                stamps, toks = engine.decode_batch(req["ids"], req["n"])
                reply({"ok": True, "stamps": stamps, "tokens": toks})
            elif op == "encode":
                s, head = engine.encode(_feeds(req))
                reply({"ok": True, "s": s, "head": head})
            elif op == "llama_quantize":
                reply({"ok": True, **llama_quantize(req["src"], req["dst"], req["ftype"])})
            elif op == "ct2_convert":
                reply({"ok": True, **ct2_convert(req["hf_dir"], req["out"], req["kind"])})
            else:
                reply({"ok": False, "error": f"unknown op {op}"})
        except Exception as e:
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


if __name__ == "__main__":
    main()
