"""Write `onnxpipe.json`: everything the runtime needs, so it never reads a transformers config.

The fields are described in docs/MANIFEST.md.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from onnxpipe.manifest_fields import file_entry, kv_cache_section, max_positions, sentence_embedding_section, versions

FORMAT_VERSION = 1
MANIFEST_NAME = "onnxpipe.json"


def write_manifest(out: Path, *, task, config, tokenizer, model, roles, validation, optimization, quantization,
                   source, hf_dir, graph_edits=None, fp16=None) -> dict:
    files = {role: {"fp32": file_entry(out, name)} for role, name in roles.items()}
    for role, name in roles.items():
        for precision in ("int8", "int4", "fp16"):
            q = out / name.replace(".onnx", f".{precision}.onnx")
            if q.exists():
                files[role][precision] = file_entry(out, q.name)
    io = {role: _graph_io(out / name) for role, name in roles.items()}
    id2label = label2id = None
    if task in ("text-classification", "token-classification"):
        id2label = {str(k): v for k, v in config.id2label.items()}
        label2id = {k: int(v) for k, v in config.label2id.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "is_encoder_decoder": bool(getattr(config, "is_encoder_decoder", False)),
        "files": files,
        "io": io,
        "kv_cache": kv_cache_section(task, io, bool((optimization or {}).get("kv_shared_buffer")),
                                     (optimization or {}).get("rotary")),
        # int64 [1] input: LM-head positions to compute, counted from the end (0 = all); null when absent
        "logits_to_keep_input": "logits_to_keep" if (graph_edits or {}).get("logits_to_keep") else None,
        "id2label": id2label,
        "label2id": label2id,
        "problem_type": getattr(config, "problem_type", None),
        "num_labels": getattr(config, "num_labels", None) if id2label else None,
        "max_positions": _capped(_max_positions(config), (optimization or {}).get("rotary_table_positions")),
        "tokenizer": _tokenizer_info(tokenizer, config),
        "generation": _generation(model),
        "chat_template": getattr(tokenizer, "chat_template", None),
        # transformers' pipelines prepend config.prefix and apply task_specific_params (T5's "summarize: ")
        "prefix": getattr(config, "prefix", None),
        "task_specific_params": getattr(config, "task_specific_params", None),
        "sentence_embedding": sentence_embedding_section(task, Path(hf_dir)),
        "optimization": optimization,
        "quantization": quantization or None,
        # --dtype fp16: how the *.fp16.onnx files were made (their KV cache dtype, the float32 inputs/outputs), their
        # validation against torch fp32 with per-output tolerances, and what the CPU provider did not run in float16
        "fp16": fp16,
        "validation": validation,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"checkpoint": str(Path(source.path).resolve()), "gguf_file": source.gguf_file,
                   "hub": source.hub},  # {"repo_id", "revision", "commit"} when exported from a Hub id
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=_json_default) + "\n",
                                     encoding="utf-8")
    return manifest


def _graph_io(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [describe(v) for v in graph.input if v.name not in initializers],
            "outputs": [describe(v) for v in graph.output]}


def _max_positions(config):
    return max_positions(config.to_dict())


def _capped(positions, cap):
    return min(positions, cap) if positions and cap else positions


def _tokenizer_info(tok, config) -> dict:
    mml = tok.model_max_length
    if mml is None or mml > 1_000_000:
        mml = None
    names = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    special = {n: tok.special_tokens_map.get(n) for n in names}
    special_ids = {n + "_id": (tok.convert_tokens_to_ids(v) if v is not None else None) for n, v in special.items()}
    return {
        "file": "tokenizer.json",
        "class": type(tok).__name__,
        "model_max_length": mml,
        "padding_side": tok.padding_side,
        "truncation_side": tok.truncation_side,
        "clean_up_tokenization_spaces": bool(getattr(tok, "clean_up_tokenization_spaces", False)),
        "do_lower_case": getattr(tok, "do_lower_case", None),
        "add_prefix_space": getattr(tok, "add_prefix_space", None),
        "special_tokens": {k: str(v) if v is not None else None for k, v in special.items()},
        "special_token_ids": special_ids,
        "all_special_ids": sorted(set(tok.all_special_ids)),
        "all_special_tokens": list(tok.all_special_tokens),
        "model_input_names": list(tok.model_input_names),
    }


def _generation(model):
    if not model.can_generate():
        return None
    gen = model.generation_config.to_dict()
    cfg = model.config
    for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and getattr(cfg, key, None) is not None:
            gen[key] = getattr(cfg, key)
    gen.pop("transformers_version", None)
    return gen


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, set):
        return sorted(o)
    return str(o)
