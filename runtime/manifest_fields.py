"""Manifest fields computed from plain files: config.json as a dict, the graphs' inputs/outputs, sentence-transformers'
JSON files. The exporter (export/manifest.py) and the importer of ready-made ONNX repos (onnx_import.py) both write
them with these functions, so an exported folder and an imported one describe the same model the same way.

Standard library only: the importer runs at serve time, without torch or transformers.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Mapping

from onnxpipe.models.sources import sha256_file

# Where a graph's weights may live beside it: onnxpipe's exporter writes `<name>.data`; optimum and transformers.js
# write `<name>_data`. ONNX Runtime finds them by the name recorded in the graph; the manifest lists them so that a
# folder missing them is refused before a session is made.
EXTERNAL_DATA_SUFFIXES = (".data", "_data")


def file_entry(folder: Path, name: str) -> dict:
    """files.<role>.<precision>: the graph's path (relative to the folder), sha256 and size, and its weights file."""
    path = folder / name
    entry = {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    for suffix in EXTERNAL_DATA_SUFFIXES:
        data = folder / (name + suffix)
        if data.exists():
            entry["external_data"] = {"path": name + suffix, "sha256": sha256_file(data), "bytes": data.stat().st_size}
            break
    return entry


def kv_cache_section(task: str, io: dict, shared_buffer: bool = False, rotary: dict | None = None) -> dict | None:
    """kv_cache: the past/present names and the cache layout, read from the graphs' inputs and outputs.

    io: role -> {"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}. The head count and head size are the
    cache inputs' fixed dims [batch, kv_heads, past_length, head_dim]; None for tasks without a cache."""
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
        if rotary:
            # keys rotated by their cache index (GroupQueryAttention): the tables to move a cache to other indices
            info["rotary"] = rotary
    return info


# BERT-family encoders (config.json's model_type): ONNX Runtime's transformer optimizer fuses them as "bert" models.
BERT_FAMILY = frozenset({"bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "mpnet",
                         "deberta-v2"})
# ONNX Runtime optimizers a BERT-family encoder's sessions turn off (manifest optimization.runtime_disabled_optimizers):
# residual Add + LayerNormalization stay as they are. ONNX Runtime 1.32's SkipLayerNormalization CPU kernel takes
# 309 us at 128 x 768 where Add + Add + LayerNormalization take 100 (its float loop is scalar): BERT-base --optimize
# L128 int8 1.17x, fp32 1.07x, L16 1.05x; the plain MiniLM-L6 default int8 1.10x (L16) and 1.12x (L128), fp32 the
# same (Intel Xeon AMX, interleaved A/Bs of 16 rounds: issue 26). Without the word ONNX Runtime's own level-2
# optimizer fuses them at load.
ENCODER_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def runtime_optimization(model_type: str | None, roles) -> dict:
    """The optimization section's runtime part: {"runtime_disabled_optimizers": [...]} for a one-graph BERT-family
    encoder, else {}. Exported and imported folders alike."""
    if model_type in BERT_FAMILY and set(roles) == {"model"}:
        return {"runtime_disabled_optimizers": list(ENCODER_DISABLED_OPTIMIZERS)}
    return {}


def max_positions(config: Mapping) -> int | None:
    """The model's own position limit from config.json's fields (None when positions are relative, e.g. T5)."""
    for key in ("max_position_embeddings", "n_positions", "max_positions"):
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
                return v - 2  # positions start after padding_idx: 514 rows hold 512 tokens
            return v
    return None


def sentence_embedding_section(task: str, folder: Path) -> dict | None:
    """sentence_embedding (feature-extraction): pooling and normalization from sentence-transformers' modules.json,
    mean pooling without normalization when the folder has none."""
    if task != "feature-extraction":
        return None
    info = {"pooling": "mean", "normalize": False, "source": "default"}
    modules = folder / "modules.json"
    if modules.exists():
        try:
            mods = json.loads(modules.read_text())
            info["source"] = "sentence-transformers modules.json"
            info["normalize"] = any(m.get("type", "").endswith("Normalize") for m in mods)
            for m in mods:
                if m.get("type", "").endswith("Pooling"):
                    pcfg = json.loads((folder / m["path"] / "config.json").read_text())
                    for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken"):
                        if pcfg.get(f"pooling_mode_{mode}"):
                            info["pooling"] = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max",
                                               "mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "last"}[mode]
                            break
        except (OSError, ValueError, KeyError):
            pass
    st_config = folder / "sentence_bert_config.json"
    if st_config.exists():
        try:
            # sentence-transformers cuts at its own max_seq_length (256 for MiniLM), below the model's 512
            info["max_seq_length"] = int(json.loads(st_config.read_text())["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return info


# sentence-transformers' files the sentence_embedding section reads (the Pooling module's config is under its path)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "*_Pooling/config.json")


def versions() -> dict:
    """The versions of the packages that made the folder (those installed)."""
    out = {"python": platform.python_version()}
    for pkg in ("onnxpipe", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
                "onnxruntime-gpu", "tokenizers", "huggingface_hub"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
