"""Write `onnxpipe.json`: everything the runtime needs, so it never reads a transformers config.

The fields are described in docs/MANIFEST.md.
"""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from onnxpipe.models.sources import sha256_file  # one hashing helper for exports and model builds

FORMAT_VERSION = 1
MANIFEST_NAME = "onnxpipe.json"


def write_manifest(out: Path, *, task, config, tokenizer, model, roles, validation, optimization, quantization,
                   source, hf_dir, graph_edits=None) -> dict:
    files = {role: {"fp32": _file_entry(out, name)} for role, name in roles.items()}
    for role, name in roles.items():
        for precision in ("int8", "int4"):
            q = out / name.replace(".onnx", f".{precision}.onnx")
            if q.exists():
                files[role][precision] = _file_entry(out, q.name)
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
        "kv_cache": _kv_cache(task, io, config, bool((optimization or {}).get("kv_shared_buffer"))),
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
        "sentence_embedding": _sentence_embedding(task, Path(hf_dir)),
        "optimization": optimization,
        "quantization": quantization or None,
        "validation": validation,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"checkpoint": str(Path(source.path).resolve()), "gguf_file": source.gguf_file},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=_json_default) + "\n",
                                     encoding="utf-8")
    return manifest


def _file_entry(out: Path, name: str) -> dict:
    path = out / name
    size = path.stat().st_size
    data = out / (name + ".data")  # external weights (> 2 GB models)
    entry = {"path": name, "sha256": sha256_file(path), "bytes": size}
    if data.exists():
        entry["external_data"] = {"path": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size}
    return entry


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


def _kv_cache(task, io, config, shared_buffer: bool = False):
    if task == "text-generation":
        inputs = io["model"]["inputs"]
        outputs = io["model"]["outputs"]
    elif task == "text2text-generation":
        inputs = io["decoder_with_past"]["inputs"]
        outputs = io["decoder"]["outputs"]
    else:
        return None
    past = [i for i in inputs if i["name"].startswith("past_key_values.")]
    if not past:
        return None
    layers = {int(p["name"].split(".")[1]) for p in past}
    self_past = [p for p in past if ".encoder." not in p["name"]]
    cross = [p for p in past if ".encoder." in p["name"]]
    info = {
        "num_layers": len(layers),
        "num_kv_heads": self_past[0]["shape"][1],
        "head_dim": self_past[0]["shape"][3],
        "dtype": self_past[0]["dtype"],
        "layout": "batch,num_kv_heads,past_sequence_length,head_dim",
        "past_names": [p["name"] for p in past],
        "present_names": [o["name"] for o in outputs if o["name"].startswith("present.")],
    }
    if cross:
        info["encoder_num_kv_heads"] = cross[0]["shape"][1]
    if task == "text-generation":
        # true: past_key_values.{i}.* and present.{i}.* may be bound to one [batch, kv_heads, capacity, head_dim]
        # buffer per tensor (the graph appends in place and reads the cache length from attention_mask)
        info["shared_buffer"] = shared_buffer
    return info


def _capped(positions, cap):
    return min(positions, cap) if positions and cap else positions


def _max_positions(config):
    for attr in ("max_position_embeddings", "n_positions", "max_positions"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            if config.model_type in ("roberta", "xlm-roberta", "camembert"):
                return v - 2  # positions start after padding_idx: 514 rows hold 512 tokens
            return v
    return None


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


def _sentence_embedding(task, hf_dir: Path):
    if task != "feature-extraction":
        return None
    info = {"pooling": "mean", "normalize": False, "source": "default"}
    modules = hf_dir / "modules.json"
    if modules.exists():
        try:
            mods = json.loads(modules.read_text())
            info["source"] = "sentence-transformers modules.json"
            info["normalize"] = any(m.get("type", "").endswith("Normalize") for m in mods)
            for m in mods:
                if m.get("type", "").endswith("Pooling"):
                    pcfg = json.loads((hf_dir / m["path"] / "config.json").read_text())
                    for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken"):
                        if pcfg.get(f"pooling_mode_{mode}"):
                            info["pooling"] = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max",
                                               "mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "last"}[mode]
                            break
        except (OSError, ValueError, KeyError):
            pass
    st_config = hf_dir / "sentence_bert_config.json"
    if st_config.exists():
        try:
            # sentence-transformers cuts at its own max_seq_length (256 for MiniLM), below the model's 512
            info["max_seq_length"] = int(json.loads(st_config.read_text())["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return info


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("onnxpipe", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, set):
        return sorted(o)
    return str(o)
