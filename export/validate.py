"""Check an export against the torch model it came from, on several batch sizes and lengths.

`validate_export` runs every ONNX role (fp32) on the same inputs as torch and
records the max abs difference of each output, over real (unpadded)
positions only; `measure_fidelity` does the same for the int8 files and adds
top-1 agreement (logits) or the minimum cosine similarity (hidden states).
Decoders are checked at prefill and at two cached decode steps, driven by the
runtime's own KV-cache steppers (onnxpipe.generation.kv_cache: their feeds,
position ids and `present.*` fed back), so what passes here is what generation runs.
"""
from __future__ import annotations

import inspect

import numpy as np

SAMPLE_TEXTS = [
    "Hello world",
    "Hugging Face is based in DUMBO, New York City, and is very close to the Manhattan Bridge.",
    "Café crème brûlée — 서울은 대한민국의 수도입니다 😀 東京",
    "The quick brown fox jumps over the lazy dog. " * 12,
]


def validate_export(model, tokenizer, task, out_dir, roles, atol=1e-4, rtol=1e-4) -> dict:
    results = []
    by_index = task == "text-generation" and _keys_rotated_by_index(out_dir / roles["model"])
    for role, case, name, ref, got, mask in _compare_cases(model, tokenizer, task, out_dir, roles, by_index):
        diff = _masked_max_abs_diff(ref, got, mask)
        tol = atol + rtol * float(np.max(np.abs(ref))) if ref.size else atol
        results.append({"role": role, "case": case, "output": name, "max_abs_diff": diff,
                        "tolerance": tol, "passed": bool(diff <= tol)})
    return {"passed": all(r["passed"] for r in results), "atol": atol, "rtol": rtol, "results": results}


def measure_fidelity(model, tokenizer, task, out_dir, roles) -> dict:
    """int8 vs torch fp32: per role and output, over all sample inputs.

    Logits: max abs diff (worst case) and top-1 agreement (over all real positions). Hidden states: max abs diff, min and mean
    token cosine, and for feature-extraction the min cosine of mean-pooled sentence embeddings.
    """
    fidelity: dict = {}
    agreement: dict = {}
    for role, case, name, ref, got, mask in _compare_cases(model, tokenizer, task, out_dir, roles):
        if name.startswith("present") or "logits_to_keep" in case:
            continue
        entry = fidelity.setdefault(role, {}).setdefault(name, {"max_abs_diff": 0.0})
        entry["max_abs_diff"] = max(entry["max_abs_diff"], _masked_max_abs_diff(ref, got, mask))
        r, g = _masked_rows(ref, mask), _masked_rows(got, mask)
        if "logits" in name:  # pooled over every real position of every case (a case's 2 decode positions alone
            same = np.argmax(r, -1) == np.argmax(g, -1)  # would swing it between 0, 0.5 and 1)
            counts = agreement.setdefault((role, name), [0, 0])
            counts[0] += int(same.sum())
            counts[1] += int(same.size)
            entry["top1_agreement"] = counts[0] / counts[1]
            continue
        cos = _cosine(r, g)
        entry["min_cosine"] = min(entry.get("min_cosine", 1.0), float(np.min(cos)))
        entry["mean_cosine"] = min(entry.get("mean_cosine", 1.0), float(np.mean(cos)))
        if task == "feature-extraction" and name == "last_hidden_state" and mask is not None:
            m = mask[..., None].astype(np.float32)
            pooled = _cosine((ref * m).sum(1) / m.sum(1), (got * m).sum(1) / m.sum(1))
            entry["sentence_min_cosine"] = min(entry.get("sentence_min_cosine", 1.0), float(np.min(pooled)))
    return fidelity


def validate_fp16(model, tokenizer, task, out_dir, roles, atol, rtol) -> dict:
    """The fp16 files against torch fp32, per role and output over every sample case (prefill and cached decode
    steps for decoders): max abs diff over real positions, its tolerance atol + rtol * max|output| (the largest
    reference value of any case), and for logits the top-1 agreement. The KV cache (float16) is compared too;
    the LM-head-only-at-the-last-position runs (logits_to_keep=1) are left out: they repeat the logits case."""
    by_index = task == "text-generation" and _keys_rotated_by_index(out_dir / roles["model"])
    outputs: dict = {}
    agreement: dict = {}
    for role, case, name, ref, got, mask in _compare_cases(model, tokenizer, task, out_dir, roles, by_index):
        if "logits_to_keep" in case:
            continue
        got = np.asarray(got, dtype=np.float32)
        entry = outputs.setdefault(role, {}).setdefault(name, {"max_abs_diff": 0.0, "max_abs_ref": 0.0})
        diff = _masked_max_abs_diff(ref, got, mask)
        entry["max_abs_diff"] = max(entry["max_abs_diff"], float("inf") if np.isnan(diff) else diff)  # NaN: overflow
        if ref.size:
            entry["max_abs_ref"] = max(entry["max_abs_ref"], float(np.max(np.abs(_masked_rows(ref, mask)))))
        if "logits" in name:
            same = np.argmax(_masked_rows(ref, mask), -1) == np.argmax(_masked_rows(got, mask), -1)
            counts = agreement.setdefault((role, name), [0, 0])
            counts[0] += int(same.sum())
            counts[1] += int(same.size)
            entry["top1_agreement"] = counts[0] / counts[1]
    for per_role in outputs.values():
        for entry in per_role.values():
            entry["tolerance"] = atol + rtol * entry["max_abs_ref"]
            # NaN (an overflow) compares False: it fails
            entry["passed"] = bool(entry["max_abs_diff"] <= entry["tolerance"])
    passed = all(e["passed"] for per_role in outputs.values() for e in per_role.values())
    return {"passed": passed, "reference": "torch float32", "atol": atol, "rtol": rtol, "outputs": outputs}


def is_poor(entry: dict) -> bool:
    """The thresholds below which an int8 export gets a warning."""
    return (entry.get("top1_agreement", 1.0) < 0.9 or entry.get("mean_cosine", 1.0) < 0.98
            or entry.get("sentence_min_cosine", 1.0) < 0.98)


def _cosine(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


# --- the cases ---------------------------------------------------------------------------------

def _compare_cases(model, tokenizer, task, out_dir, roles, keys_rotated_by_index: bool = False):
    """keys_rotated_by_index: see _decoder_cases; measure_fidelity leaves it off (it skips present.*)."""
    sessions = {role: _session(out_dir / f) for role, f in roles.items()}
    if task == "text-generation":
        yield from _decoder_cases(model, tokenizer, sessions["model"], _kv_cache(model, task, out_dir, roles),
                                  keys_rotated_by_index)
    elif task == "text2text-generation":
        yield from _seq2seq_cases(model, tokenizer, sessions, _kv_cache(model, task, out_dir, roles))
    else:
        yield from _encoder_cases(model, tokenizer, sessions["model"])


def _encoder_cases(model, tokenizer, sess):
    import torch

    max_len = min(128, tokenizer.model_max_length)
    cases = {
        "batch=1": tokenizer([SAMPLE_TEXTS[0]], return_tensors="np"),
        "batch=3,padded": tokenizer(SAMPLE_TEXTS[:3], padding=True, return_tensors="np"),
        f"batch=2,len={max_len}": tokenizer(SAMPLE_TEXTS[2:], padding=True, truncation=True, max_length=max_len, return_tensors="np"),
        "pair,batch=2": tokenizer(SAMPLE_TEXTS[:2], SAMPLE_TEXTS[1:3], padding=True, return_tensors="np"),
    }
    input_names, output_names = sess.input_names, sess.output_names
    for case, enc in cases.items():
        feeds = {n: enc[n].astype(np.int64) for n in input_names if n in enc}
        if "token_type_ids" in input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        _require({"model": [n for n in input_names if n not in feeds]})
        got = sess.run(feeds)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        mask = feeds["attention_mask"]
        for name in output_names:
            r = ref[name].numpy()
            per_token = r.ndim == 3 or name in ("start_logits", "end_logits")
            yield "model", case, name, r, got[name], mask if per_token else None


def _decoder_cases(model, tokenizer, sess, kv_cache, keys_rotated_by_index: bool = False):
    """keys_rotated_by_index: the graph's attention (GroupQueryAttention, graph.fuse_group_query_attention)
    rotates a left-padded row's keys by their index rather than their position; its present.*.key is then
    compared with torch's cache from a second run fed those index positions (logits and values with the
    normal run's, which they equal: rotary attention sees only relative positions)."""
    import torch

    from onnxpipe.generation.kv_cache import DecoderStepper, position_ids_from_mask

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    try:
        prompts = {"batch=1": [SAMPLE_TEXTS[1]], "batch=2,left-padded": [SAMPLE_TEXTS[0], SAMPLE_TEXTS[2]]}
        for case, texts in prompts.items():
            enc = tokenizer(texts, return_tensors="np", padding=True) if tokenizer.pad_token_id is not None else \
                _left_pad([tokenizer(t)["input_ids"] for t in texts], pad)
            # the LM head at every position, each compared with torch's
            stepper = DecoderStepper(sess, kv_cache, logits_to_keep=0)
            _require({"model": stepper.unfed_inputs()})
            # generation's own setting: the LM head at the last position only, which must give the same logits
            last = DecoderStepper(sess, kv_cache) if "logits_to_keep" in sess.input_names else None
            runs = [s for s in (stepper, last) if s is not None]
            torch_cache = index_cache = None
            step_ids = enc["input_ids"].astype(np.int64)
            for step in range(3):
                for run in runs:
                    if step == 0:
                        run.prefill(step_ids, enc["attention_mask"])
                    else:
                        run.step(step_ids[:, 0])
                mask, logits, presents = stepper.attention_mask, stepper.logits, stepper.presents()
                name = "prefill" if step == 0 else f"decode step {step}"
                if last is not None:
                    yield "model", f"{case},{name},logits_to_keep=1", "logits", logits[:, -1:], last.logits, None
                pos = position_ids_from_mask(mask)[:, -step_ids.shape[1]:]
                with torch.no_grad():
                    kw = dict(input_ids=torch.from_numpy(step_ids), attention_mask=torch.from_numpy(mask),
                              past_key_values=torch_cache, use_cache=True)
                    if "position_ids" in sess.input_names:
                        kw["position_ids"] = torch.from_numpy(pos)
                    ref = model(**kw)
                torch_cache = ref.past_key_values
                keys = [k for k, _ in _cache_layers(torch_cache)]
                if keys_rotated_by_index:
                    total = mask.shape[1]
                    index_pos = np.broadcast_to(np.arange(total - step_ids.shape[1], total), step_ids.shape)
                    with torch.no_grad():
                        index_cache = model(**{**kw, "past_key_values": index_cache, "use_cache": True,
                                               "position_ids": torch.from_numpy(index_pos.copy())}
                                            ).past_key_values
                    keys = [k for k, _ in _cache_layers(index_cache)]
                step_mask = mask[:, -step_ids.shape[1]:]
                yield "model", f"{case},{name}", "logits", ref.logits.numpy(), logits, step_mask
                for i, (k, v) in enumerate(zip(keys, [v for _, v in _cache_layers(torch_cache)])):
                    for kind, t in (("key", k), ("value", v)):
                        yield "model", f"{case},{name}", f"present.{i}.{kind}", t.numpy(), presents[f"present.{i}.{kind}"], \
                            mask
                step_ids = np.argmax(logits[:, -1], -1)[:, None].astype(np.int64)
    finally:
        tokenizer.padding_side = old_side


def _seq2seq_cases(model, tokenizer, sessions, kv_cache):
    import types

    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from onnxpipe.generation.kv_cache import Seq2SeqStepper

    start = model.config.decoder_start_token_id
    for case, texts in {"batch=1": [SAMPLE_TEXTS[1]], "batch=2,padded": [SAMPLE_TEXTS[0], SAMPLE_TEXTS[2]]}.items():
        enc = tokenizer(texts, return_tensors="np", padding=True)
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        # the stepper takes its graphs from a model folder's session(role)
        stepper = Seq2SeqStepper(types.SimpleNamespace(session=sessions.__getitem__), kv_cache)
        _require(stepper.unfed_inputs())
        stepper.encode(ids, mask)
        with torch.no_grad():
            encoder = model.get_encoder()
            kw = {"use_cache": False} if "use_cache" in inspect.signature(encoder.forward).parameters else {}
            ref_enc = encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), return_dict=True, **kw)
        yield "encoder", case, "last_hidden_state", ref_enc.last_hidden_state.numpy(), stepper.encoder_hidden_states, mask
        dec_ids = np.full((ids.shape[0], 1), start, np.int64)
        logits = stepper.prefill(dec_ids)  # the last (and only) position's: [batch, vocab]
        with torch.no_grad():
            ref = model(encoder_outputs=BaseModelOutput(last_hidden_state=ref_enc.last_hidden_state),
                        attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(dec_ids), use_cache=True)
        yield "decoder", case, "logits", ref.logits.numpy(), logits[:, None], None
        cache = ref.past_key_values
        for step in (1, 2):
            nxt = np.argmax(logits, -1)[:, None].astype(np.int64)
            logits = stepper.step(nxt)
            with torch.no_grad():
                ref = model(encoder_outputs=BaseModelOutput(last_hidden_state=ref_enc.last_hidden_state),
                            attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(nxt),
                            past_key_values=cache, use_cache=True)
            cache = ref.past_key_values
            yield "decoder_with_past", f"{case},decode step {step}", "logits", ref.logits.numpy(), logits[:, None], None


# --- helpers -----------------------------------------------------------------------------------

def _keys_rotated_by_index(path) -> bool:
    import onnx

    return any(n.op_type == "GroupQueryAttention" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _kv_cache(model, task, out_dir, roles) -> dict:
    """The kv_cache section the manifest will have (shared_buffer off: the steppers feed the cache back)."""
    from onnxpipe.manifest_fields import kv_cache_section

    from . import manifest

    return kv_cache_section(task, {role: manifest._graph_io(out_dir / f) for role, f in roles.items()})


def _session(path):
    """onnxpipe's own CPU session (ONNX Runtime's full optimization, on the process's thread pool), not cached."""
    from onnxpipe.session import Session

    return Session(path, session_cache=False)


def _require(missing: dict):
    """missing: {role: the graph's inputs onnxpipe has nothing to feed} (a stepper's unfed_inputs)."""
    from .errors import ExportError

    for role, names in missing.items():
        if names:
            raise ExportError(f"exported {role} graph wants inputs onnxpipe does not know how to feed: {', '.join(names)}")


def _left_pad(seqs, pad):
    n = max(len(s) for s in seqs)
    ids = np.array([[pad] * (n - len(s)) + s for s in seqs], np.int64)
    mask = np.array([[0] * (n - len(s)) + [1] * len(s) for s in seqs], np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def _cache_layers(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return cache.to_legacy_cache()
    return cache


def _masked_rows(x, mask):
    """Rows (positions) of x that are real tokens, flattened to [n, last_dim]."""
    if mask is None:
        return x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x[None]
    m = mask.astype(bool)
    if x.ndim == 4 and x.shape[0] == m.shape[0] and x.shape[2] == m.shape[1]:
        # KV cache [batch, heads, seq, head_dim]: the mask is on axis 2
        return np.concatenate([x[b][:, m[b]].reshape(-1, x.shape[-1]) for b in range(x.shape[0])])
    if x.ndim >= 2 and x.shape[:2] == m.shape:
        return x[m].reshape(-1, x.shape[-1]) if x.ndim > 2 else x[m][:, None]
    return x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x[None]


def _masked_max_abs_diff(ref, got, mask):
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    r, g = _masked_rows(ref, mask), _masked_rows(got, mask)
    return float(np.max(np.abs(r - g))) if r.size else 0.0
