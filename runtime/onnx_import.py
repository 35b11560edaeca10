"""Ready-made ONNX exports (Optimum's, or a transformers.js repo's) as onnxpipe model folders, without torch.

    import_onnx_folder("Xenova-distilbert-squad/", "models/squad")   # writes models/squad/onnxpipe.json

Optimum puts its graphs beside config.json (`model.onnx`; `encoder_model.onnx`, `decoder_model.onnx`,
`decoder_with_past_model.onnx`); transformers.js repos put the same graphs under `onnx/`, with quantized twins
(`model_quantized.onnx`, `model_q4.onnx`, ...), older ones a merged decoder (`decoder_model_merged.onnx`). The manifest is derived from what those folders hold:
config.json read as plain JSON (task from `architectures`, labels, max positions, generation settings),
tokenizer_config.json / special_tokens_map.json / tokenizer.json (special tokens and their ids), and each graph's own
inputs and outputs, read with ONNX Runtime (the KV-cache names and layout). What cannot be derived is an
OnnxImportError naming what is missing; nothing is guessed.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from .folder_install import build_folder, link_or_copy
from .manifest_fields import (EXTERNAL_DATA_SUFFIXES, file_entry, kv_cache_section, max_positions,
                              runtime_optimization, sentence_embedding_section, versions)
from .task_table import ENCODER_EXPORT_TASKS, export_task, task_for_architectures

MANIFEST_NAME = "onnxpipe.json"
FORMAT_VERSION = 1
# Graph file name endings -> the runtime's precision, best first. transformers.js: "_quantized" is its q8 (dynamic
# int8), "_q4" 4-bit MatMulNBits blocks with fp32 activations, as onnxpipe's int4. Its fp16, q4f16 and bnb4 files have
# no runtime precision here and are left out.
PRECISION_SUFFIXES = {"fp32": ("",), "int8": ("_quantized", "_int8", "_uint8"), "int4": ("_q4",)}
# role -> graph file stem, per kind of model. A merged decoder (one graph with both decoders behind an If on
# `use_cache_branch`, as older transformers.js repos ship them) serves where the separate graphs are missing: for an
# encoder-decoder it is both decoder roles (two sessions of one file: the separate graphs, where a repo has them, are
# preferred).
MERGED = "decoder_model_merged"
ENCODER_ROLES = {"model": "model"}
SEQ2SEQ_ROLES = {"encoder": "encoder_model", "decoder": "decoder_model", "decoder_with_past": "decoder_with_past_model"}
SEQ2SEQ_MERGED_ROLES = {"encoder": "encoder_model", "decoder": MERGED, "decoder_with_past": MERGED}
# The inputs onnxpipe's pipelines and steppers (generation/kv_cache.py) feed each role, besides the KV cache; a graph
# that needs any other cannot be run, and is refused now rather than failing at the first call.
FED_INPUTS = {
    "model": {"input_ids", "attention_mask", "token_type_ids", "position_ids", "logits_to_keep", "use_cache_branch"},
    "encoder": {"input_ids", "attention_mask"},
    "decoder": {"input_ids", "encoder_attention_mask", "encoder_hidden_states", "use_cache_branch"},
    "decoder_with_past": {"input_ids", "encoder_attention_mask", "encoder_hidden_states", "use_cache_branch"},
}
# Files kept beside the graphs for people to read (the runtime reads only the manifest, the graphs and tokenizer.json).
KEPT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers 4.57's fast tokenizer classes that pad on the left by default (every other class pads on the right)
LEFT_PADDING_CLASSES = {"LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer", "CohereTokenizer", "XLNetTokenizer"}


class OnnxImportError(ValueError):
    """The folder is not an ONNX export onnxpipe can run, or lacks what its manifest needs; the message says which."""


def import_onnx_folder(src: str | os.PathLike, out: str | os.PathLike, *, task: str | None = None,
                       precisions: list[str] | None = None, hub: dict | None = None, where: str | None = None) -> Path:
    """Write an onnxpipe model folder at `out` from the ONNX export in `src` and return its path.

    task: a pipeline or export task, when the graph alone cannot tell (None: from the graphs and config.json).
    precisions: which of fp32/int8/int4 to take (None: all the folder has). hub: {"repo_id", "revision", "commit"}
    recorded as the source. where: how errors name the source (default: the folder). `out` may be `src` itself:
    then only onnxpipe.json is written into it. Otherwise the files are hard-linked (or copied) into a new folder
    built beside `out` and renamed into place.
    """
    src, out = Path(src), Path(out)
    manifest, used = derive_manifest(src, task=task, precisions=precisions, hub=hub, where=where)
    if out.exists() and out.resolve() == src.resolve():
        _write_manifest(src, manifest)
        return out
    _check_out(out)

    def fill(folder: Path) -> None:
        for name in used:
            link_or_copy(src / name, folder / name)
        _write_manifest(folder, manifest)

    return build_folder(out, fill)


def derive_manifest(folder: str | os.PathLike, *, task: str | None = None, precisions: list[str] | None = None,
                    hub: dict | None = None, where: str | None = None) -> tuple[dict, list[str]]:
    """The manifest for the ONNX export in `folder`, and the files (relative paths) the model folder needs."""
    folder = Path(folder)
    where = where or f"'{folder}'"
    if not folder.is_dir():
        raise OnnxImportError(f"{where} is not a folder: pass a folder holding config.json, tokenizer.json and "
                              "model.onnx (or onnx/model.onnx)")
    config = _read_json(folder, "config.json", where, required=True)
    if not (folder / "tokenizer.json").exists():
        raise OnnxImportError(f"{where} has no tokenizer.json: onnxpipe's runtime needs the fast tokenizer file "
                              "(save the tokenizer with a transformers *TokenizerFast into the folder)")
    layout, graphs = find_graphs(_relative_names(folder), where)
    roles = _roles(graphs, where, precisions)
    precisions = _precisions(roles, graphs, precisions, where)
    files = {role: {p: graphs[stem][p] for p in precisions} for role, stem in roles.items()}
    io = {role: graph_io(folder / entry[precisions[0]]) for role, entry in files.items()}
    _check_inputs(io, where)
    task = _task(io, config, task, where)
    kv_cache = kv_cache_section(task, io)
    _check_cache(task, kv_cache, where)
    id2label = _labels(task, io, config, where)
    tok_config = _read_json(folder, "tokenizer_config.json", where)
    first_role = "encoder" if "encoder" in io else "model"
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [None])[0],
        "is_encoder_decoder": bool(config.get("is_encoder_decoder", False)),
        "files": {role: {p: file_entry(folder, name) for p, name in entry.items()} for role, entry in files.items()},
        "io": io,
        "kv_cache": kv_cache,
        "logits_to_keep_input": "logits_to_keep" if any(i["name"] == "logits_to_keep" for i in io[first_role]["inputs"])
        else None,
        "id2label": id2label,
        "label2id": {label: int(i) for i, label in id2label.items()} if id2label else None,
        "problem_type": config.get("problem_type"),
        "num_labels": len(id2label) if id2label else None,
        "max_positions": max_positions(config),
        "tokenizer": tokenizer_section(folder, tok_config, io[first_role]["inputs"], where),
        "generation": _generation(folder, config, where) if kv_cache else None,
        "chat_template": _chat_template(folder, tok_config),
        "prefix": config.get("prefix"),
        "task_specific_params": config.get("task_specific_params"),
        "sentence_embedding": sentence_embedding_section(task, folder),
        "optimization": {"applied": False, "note": "imported as published; onnxpipe's graph fusions were not applied",
                         **runtime_optimization(config.get("model_type"), io)},
        "quantization": {p: {"method": f"as published ({_suffix_of(files, p)} files); fidelity not measured"}
                         for p in precisions if p != "fp32"} or None,
        "validation": {"passed": None, "skipped": True, "results": [],
                       "note": "imported from a ready-made ONNX export: not compared with torch"},
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"checkpoint": None, "gguf_file": None, "imported_from": str(folder.resolve()), "layout": layout,
                   "hub": hub},
    }
    used = [n for entry in manifest["files"].values() for e in entry.values()
            for n in (e["path"], (e.get("external_data") or {}).get("path")) if n]
    used += ["tokenizer.json"] + [n for n in KEPT_FILES if (folder / n).exists()]
    return manifest, list(dict.fromkeys(used))


def graph_io(path: Path) -> dict:
    """A graph's inputs and outputs as ONNX Runtime reports them: [{"name", "dtype", "shape"}] (the onnx package is
    not needed, so this runs at serve time)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the signature is read
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own kinds; keep the line that says why
        raise OnnxImportError(f"ONNX Runtime cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from None

    def describe(arg) -> dict:
        dtype = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else arg.type
        return {"name": arg.name, "dtype": _NUMPY_DTYPES.get(dtype, dtype), "shape": list(arg.shape)}

    return {"inputs": [describe(a) for a in session.get_inputs()],
            "outputs": [describe(a) for a in session.get_outputs()]}


_NUMPY_DTYPES = {"float": "float32", "double": "float64", "float16": "float16", "int64": "int64", "int32": "int32",
                 "bool": "bool", "int8": "int8", "uint8": "uint8"}


def tokenizer_section(folder: Path, tok_config: dict, graph_inputs: list[dict], where: str) -> dict:
    """The manifest's tokenizer section from tokenizer_config.json / special_tokens_map.json (as transformers reads
    them) and the ids tokenizer.json gives their tokens."""
    from tokenizers import Tokenizer

    special_map = _read_json(folder, "special_tokens_map.json", where)
    if "added_tokens_decoder" not in tok_config and not special_map:
        raise OnnxImportError(f"{where} does not say its special tokens: its tokenizer_config.json has no "
                              "added_tokens_decoder (it was not saved by transformers >= 4.34) and there is no "
                              "special_tokens_map.json; save the tokenizer again with transformers")
    # transformers reads special_tokens_map.json only for a tokenizer_config.json without added_tokens_decoder, and
    # then lets it override the config's entries
    declared = dict(tok_config) if "added_tokens_decoder" in tok_config else {**tok_config, **special_map}
    special = {name: _token_text(declared.get(name)) for name in SPECIAL_TOKENS}
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    unk_id = backend.token_to_id(special["unk_token"]) if special["unk_token"] else None

    def token_id(token):  # transformers' convert_tokens_to_ids: an unknown token is the unk id
        if token is None:
            return None
        found = backend.token_to_id(token)
        return found if found is not None else unk_id

    extra = [_token_text(t) for t in declared.get("additional_special_tokens") or []]
    all_tokens = list(dict.fromkeys(t for t in [*special.values(), *extra] if t is not None))
    mml = tok_config.get("model_max_length")
    tokenizer_class = tok_config.get("tokenizer_class") or ""
    base_class = tokenizer_class[:-4] if tokenizer_class.endswith("Fast") else tokenizer_class
    graph_names = {i["name"] for i in graph_inputs}
    return {
        "file": "tokenizer.json",
        "class": f"{base_class}Fast" if base_class else None,
        "model_max_length": mml if isinstance(mml, int) and 0 < mml <= 1_000_000 else None,
        "padding_side": tok_config.get("padding_side") or ("left" if base_class in LEFT_PADDING_CLASSES else "right"),
        "truncation_side": tok_config.get("truncation_side") or "right",
        # transformers 4.57's default for every fast tokenizer class when the config does not say
        "clean_up_tokenization_spaces": bool(tok_config.get("clean_up_tokenization_spaces", False)),
        "do_lower_case": tok_config.get("do_lower_case"),
        "add_prefix_space": tok_config.get("add_prefix_space", False),  # PreTrainedTokenizerFast's default
        "special_tokens": special,
        "special_token_ids": {f"{name}_id": token_id(token) for name, token in special.items()},
        "all_special_ids": sorted({i for i in map(token_id, all_tokens) if i is not None}),
        "all_special_tokens": all_tokens,
        "model_input_names": tok_config.get("model_input_names")
        or [n for n in ("input_ids", "token_type_ids", "attention_mask") if n in graph_names],
    }


def find_graphs(names: set[str], where: str = "the folder") -> tuple[str, dict[str, dict[str, str]]]:
    """names: the folder's (or repo's) files, relative. -> (layout, {graph stem: {precision: relative path}}):
    Optimum's graphs beside config.json, else transformers.js's under onnx/."""
    stems = (*ENCODER_ROLES.values(), *SEQ2SEQ_ROLES.values(), MERGED)
    for layout, sub in (("optimum", ""), ("transformers.js", "onnx/")):
        graphs: dict[str, dict[str, str]] = {}
        for stem in stems:
            for precision, suffixes in PRECISION_SUFFIXES.items():
                name = next((f"{sub}{stem}{s}.onnx" for s in suffixes if f"{sub}{stem}{s}.onnx" in names), None)
                if name:
                    graphs.setdefault(stem, {})[precision] = name
        if graphs:
            return layout, graphs
    found = sorted(n for n in names if n.endswith(".onnx") and n.count("/") <= 1)
    raise OnnxImportError(f"{where} has no ONNX graph onnxpipe can run: expected model.onnx (or encoder_model.onnx "
                          "with decoder_model.onnx and decoder_with_past_model.onnx) beside config.json or under "
                          f"onnx/, fp32 or quantized (_quantized, _int8, _uint8, _q4); found "
                          f"{', '.join(found[:12]) or 'no .onnx file'}")


def graph_files(names: set[str], precision: str, where: str = "the repo") -> list[str]:
    """The files of `precision`'s graphs (each with its external weights file, where it has one) among `names`."""
    _, graphs = find_graphs(names, where)
    roles = _roles(graphs, where, [precision])
    _precisions(roles, graphs, [precision], where)
    files = []
    for stem in dict.fromkeys(roles.values()):
        graph = graphs[stem][precision]
        files += [graph] + [graph + s for s in EXTERNAL_DATA_SUFFIXES if graph + s in names]
    return files


def _roles(graphs: dict, where: str, precisions: list[str] | None = None) -> dict[str, str]:
    """role -> graph stem: the separate graphs where they are there (in every precision asked for), else the merged
    decoder."""
    if "encoder_model" in graphs:
        candidates = [r for r in (SEQ2SEQ_ROLES, SEQ2SEQ_MERGED_ROLES) if all(s in graphs for s in r.values())]
    else:
        candidates = [{"model": stem} for stem in ("model", MERGED) if stem in graphs]
    for roles in candidates:
        if all(p in graphs[stem] for stem in roles.values() for p in precisions or ()):
            return dict(roles)
    if candidates:
        return dict(candidates[0])  # _precisions says which precision it lacks
    if "encoder_model" in graphs:
        raise OnnxImportError(f"{where} is an encoder-decoder export without its decoder: onnxpipe runs "
                              "encoder_model.onnx with decoder_model.onnx and decoder_with_past_model.onnx, or with "
                              "decoder_model_merged.onnx (`optimum-cli export onnx --task "
                              f"text2text-generation-with-past` writes them); it has {', '.join(s + '.onnx' for s in graphs)}")
    raise OnnxImportError(f"{where} has {', '.join(s + '.onnx' for s in graphs)} but no model.onnx: onnxpipe runs a "
                          "decoder exported as one model.onnx with its KV cache (`optimum-cli export onnx --task "
                          "text-generation-with-past` writes it), or as decoder_model_merged.onnx")


def _precisions(roles: dict, graphs: dict, wanted, where: str) -> list[str]:
    have = [p for p in PRECISION_SUFFIXES if all(p in graphs[stem] for stem in roles.values())]
    if not have:
        raise OnnxImportError(f"{where} has no precision with a graph for every role ({', '.join(roles.values())})")
    if wanted is None:
        return have
    missing = [p for p in wanted if p not in have]
    if missing:
        raise OnnxImportError(f"{where} has no {', '.join(missing)} graphs (it has {', '.join(have)}; int8 is "
                              "model_quantized.onnx, int4 model_q4.onnx): ask for one of those")
    return list(dict.fromkeys(wanted))


def _relative_names(folder: Path) -> set[str]:
    """The files beside config.json and under onnx/, as paths relative to the folder."""
    return {str(p.relative_to(folder)) for p in [*folder.glob("*"), *folder.glob("onnx/*")] if p.is_file()}


def _check_inputs(io: dict, where: str) -> None:
    for role, sig in io.items():
        unfed = [i["name"] for i in sig["inputs"]
                 if i["name"] not in FED_INPUTS[role] and not i["name"].startswith("past_key_values.")]
        if unfed:
            raise OnnxImportError(f"{where}: the {role} graph takes {', '.join(unfed)}, which onnxpipe does not feed "
                                  f"(it feeds {', '.join(sorted(FED_INPUTS[role]))} and the KV cache)")


def _task(io: dict, config: dict, asked: str | None, where: str) -> str:
    """The export task: what the graphs compute, with config.json's architectures deciding where the graph alone
    cannot (a [batch, tokens, n] `logits` is token classification or masked LM)."""
    runs = _graph_tasks(io)
    archs = config.get("architectures") or []
    if not runs:
        outputs = ", ".join(o["name"] for o in io.get("model", io.get("decoder", {})).get("outputs", []))
        raise OnnxImportError(f"{where}: the graph's outputs ({outputs}) are none of onnxpipe's tasks")
    if asked is not None:
        wanted = export_task(asked)
        if wanted not in runs:
            raise OnnxImportError(f"{where} cannot run {asked!r}: its graph computes {' or '.join(sorted(runs))}")
        return wanted
    from_config = task_for_architectures(archs, bool(config.get("is_encoder_decoder", False)))
    if from_config == "text-generation" and "text-generation" not in runs:
        raise OnnxImportError(f"{where} holds a decoder ({', '.join(archs)}) exported without its KV cache (no "
                              "past_key_values.* inputs): export it with --task text-generation-with-past")
    if len(runs) == 1:
        return next(iter(runs))
    if from_config in runs:
        return from_config
    raise OnnxImportError(f"{where}: cannot tell whether the graph is for {' or '.join(sorted(runs))}: "
                          f"config.json's architectures ({', '.join(archs) or 'missing'}) name neither; pass the task")


def _graph_tasks(io: dict) -> set[str]:
    if "encoder" in io:
        return {"text2text-generation"}
    outputs = {o["name"]: o for o in io["model"]["outputs"]}
    if any(n.startswith("present.") for n in outputs):
        return {"text-generation"} if "logits" in outputs else set()
    if "start_logits" in outputs and "end_logits" in outputs:
        return {"question-answering"}
    if "logits" in outputs:
        rank = len(outputs["logits"]["shape"])
        return {2: {"text-classification"}, 3: {"token-classification", "fill-mask"}}.get(rank, set())
    if "last_hidden_state" in outputs:
        return {"feature-extraction"}
    return set()


def _check_cache(task: str, kv_cache: dict | None, where: str) -> None:
    if task in ENCODER_EXPORT_TASKS:
        return
    if kv_cache is None:
        raise OnnxImportError(f"{where}: the {task} graphs have no past_key_values.* inputs: onnxpipe generates with "
                              f"a KV cache; export with --task {task}-with-past")
    for key in ("num_kv_heads", "head_dim") + (("encoder_num_kv_heads",) if "encoder_num_kv_heads" in kv_cache else ()):
        if not isinstance(kv_cache[key], int):
            raise OnnxImportError(f"{where}: the KV-cache input {kv_cache['past_names'][0]} has no fixed {key} "
                                  f"(dims [batch, kv_heads, past_length, head_dim] read {kv_cache[key]!r})")


def _labels(task: str, io: dict, config: dict, where: str) -> dict | None:
    if task not in ("text-classification", "token-classification"):
        return None
    width = next(o for o in io["model"]["outputs"] if o["name"] == "logits")["shape"][-1]
    raw = config.get("id2label")
    if raw is None:  # transformers' PretrainedConfig names unnamed labels LABEL_i
        if not isinstance(width, int):
            raise OnnxImportError(f"{where}: config.json has no id2label and the graph's logits have no fixed "
                                  "width: cannot tell the labels")
        raw = {str(i): f"LABEL_{i}" for i in range(width)}
    id2label = {str(k): str(v) for k, v in raw.items()}
    if isinstance(width, int) and len(id2label) != width:
        raise OnnxImportError(f"{where}: config.json's id2label has {len(id2label)} labels but the graph's logits "
                              f"have {width}")
    return id2label


def _generation(folder: Path, config: dict, where: str) -> dict:
    """generation_config.json as transformers loads it (or, without one, the generation fields of config.json, as
    GenerationConfig.from_model_config takes them), its special ids completed from config.json as the exporter does."""
    from .generation.config import GLOBAL_DEFAULTS

    gen = _read_json(folder, "generation_config.json", where) \
        or {k: v for k, v in config.items() if k in GLOBAL_DEFAULTS}
    gen = {k: v for k, v in gen.items() if k not in ("_from_model_config", "transformers_version")}
    for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and config.get(key) is not None:
            gen[key] = config[key]
    return gen


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers' apply_chat_template uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _suffix_of(files: dict, precision: str) -> str:
    name = Path(next(iter(files.values()))[precision]).name
    return next(s for s in PRECISION_SUFFIXES[precision] if name.endswith(f"{s}.onnx"))


def _token_text(value):
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(folder: Path, name: str, where: str, required: bool = False) -> dict:
    path = folder / name
    if not path.exists():
        if required:
            raise OnnxImportError(f"{where} has no {name}: an ONNX export keeps the model's {name} beside its "
                                  "graphs; copy it there")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OnnxImportError(f"{where}: {name} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise OnnxImportError(f"{where}: {name} must hold a JSON object, not {type(data).__name__}")
    return data


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise OnnxImportError(f"output {out} exists and is not an onnxpipe model folder: choose an empty or new --out")


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
