"""`export_model`: a transformers checkpoint folder -> a verified onnxpipe model folder.

Steps: check the checkpoint, (GGUF -> HF), load it in torch, export with
optimum-onnx (dynamic axes, KV cache for decoders), optionally fuse with ONNX
Runtime's transformer optimizer, validate against torch, optionally quantize
to int8 / int4 and measure their fidelity, move the weights of every graph to an
external `<name>.onnx.data` file (faster to load, less memory), then write the manifest. Everything is built
in a temporary sibling folder and renamed into place at the end, so a failed
export never leaves a folder that looks valid.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from onnxpipe.folder_install import install_folder
from onnxpipe.manifest_fields import BERT_FAMILY, runtime_optimization
from onnxpipe.hub import is_repo_id
from onnxpipe.task_table import EXPORT_TASKS, export_task, task_for_architectures

from .errors import ExportError
from . import checkpoint as ckpt_mod
from .quantize import INT4_METHODS

log = logging.getLogger("onnxpipe.export")

# The tasks and aliases `--task` takes come from the one task table (onnxpipe.task_table).
TASKS = EXPORT_TASKS
# Model types whose exports ONNX Runtime's transformer optimizer fuses well (STACK.md):
# encoders only. T5 fuses into RelativePositionBias, which the CPU provider cannot run.
OPTIMIZER_MODEL_TYPES = {**{t: "bert" for t in BERT_FAMILY},
                         # Llama-family decoders: ONNX Runtime's GPT-2 optimizer (which it also uses for Qwen3) fuses
                         # RMSNorm + residual into SkipSimplifiedLayerNormalization: SmolLM2 fp32 decode +12% here;
                         # then graph.py fuses each layer's attention and RoPE into ONNX Attention / RotaryEmbedding
                         # (opset 23): 3,625 -> 1,285 nodes, fp32 decode step 40-44 -> 36 ms here
                         "llama": "gpt2", "mistral": "gpt2", "qwen2": "gpt2", "qwen3": "gpt2"}
# Attention of a Llama-family decoder fused by --optimize: "gqa" is com.microsoft GroupQueryAttention
# (packed QKV, RoPE inside, the cache appended in place; SmolLM2 fp32 pipeline step 17.8 -> 16.4 ms here),
# whose CUDA kernel is float16 only (fp32 graphs run those nodes on the CPU); "onnx" keeps ONNX Attention +
# RotaryEmbedding (opset 23).
ATTENTION_KINDS = ("gqa", "onnx")
# GroupQueryAttention reads RoPE from cos/sin tables of this many positions at most (a 128-dim head: 8 MiB
# each); the manifest's max_positions is capped to it, so generation stops there.
GQA_MAX_POSITIONS = 32768
WEIGHT_TYPES = ("quint8", "qint8")
# Measured here (AVX2, no VNNI; bench/quantization_choice.py, README "int8 defaults"): with per-channel
# scales QInt8 was as faithful as QUInt8 (MiniLM sentence cosine 0.971 vs 0.971; SmolLM2 perplexity 57 vs 62,
# fp32 29) and STACK.md measured it faster on BERT (93 vs 119 ms at len 128); per-channel was the change
# that mattered (MiniLM 0.926 -> 0.971 min sentence cosine).
DEFAULT_WEIGHT_TYPE = "qint8"
DEFAULT_PER_CHANNEL = True
# int8 for decoders (text-generation): weight-only 8-bit MatMulNBits, measured on SmolLM2-135M here
# (bench/, README "Benchmarks"): dynamic int8 cost +68% perplexity on real news text whatever its
# weight type, weight-only 8-bit blocks +0.3%, and decoded fastest of all. "auto" picks it for
# text-generation and dynamic int8 (which the encoders' figures were measured with) elsewhere.
INT8_METHODS = ("auto", "dynamic", "weight-only")
WEIGHT_ONLY_INT8_BLOCK = 64  # SmolLM2 perplexity +0.44% (blocks of 32: +0.36%, 128: +1.35%), decode ~10% faster than 32


def export_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    task: str = "auto",
    *,
    quantize: str | list[str] | None = None,
    weight_type: str = DEFAULT_WEIGHT_TYPE,
    per_channel: bool = DEFAULT_PER_CHANNEL,
    reduce_range: bool = False,
    int8_method: str = "auto",
    int4_method: str = "asymmetric",
    optimize: bool = False,
    attention: str = "gqa",
    dtype: str = "fp32",
    fp16_atol: float | None = None,
    fp16_rtol: float | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    validate: bool = True,
    overwrite: bool = True,
    revision: str | None = None,
    token=None,
    trust_remote_code: bool = False,
    hub_source: dict | None = None,
) -> Path:
    """Export `checkpoint` for `task` into the model folder `out` and return its path.

    checkpoint: a folder, or a Hugging Face Hub id ("ORG/NAME") downloaded with huggingface_hub (the `hub` extra) at
    `revision` (default main) with `token` (default: HF_TOKEN or `hf auth login`'s): config, safetensors weights
    (PyTorch .bin where there are none) and tokenizer files only. trust_remote_code: let transformers run a
    checkpoint's own model code (refused unless True). hub_source: {"repo_id", "revision", "commit"} of a folder
    already downloaded, recorded in the manifest's source.

    dtype: "fp32" (default), or "fp16" to also write `<name>.fp16.onnx` beside each fp32 graph (export/fp16.py:
    float16 weights and activations, the KV cache float16, other inputs/outputs float32), checked against torch
    fp32 within fp16_atol + fp16_rtol * max|output| per output (defaults FP16_ATOL / FP16_RTOL); the fp32 files stay
    (the reference, and what CPU serving should use).

    Raises ExportError (a ValueError) with a one-line message on bad input or a
    failed validation; nothing is left at `out` in that case.
    """
    out = Path(out)
    precisions = _parse_quantize(quantize)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)} (fp16 is written beside "
                          "the fp32 files)")
    if attention not in ATTENTION_KINDS:
        raise ExportError(f"--attention {attention!r} is not supported: use one of {', '.join(ATTENTION_KINDS)}")
    if weight_type.lower() not in WEIGHT_TYPES:
        raise ExportError(f"--weight-type {weight_type!r} is not supported: use one of {', '.join(WEIGHT_TYPES)}")
    if int8_method not in INT8_METHODS:
        raise ExportError(f"--int8-method {int8_method!r} is not supported: use one of {', '.join(INT8_METHODS)}")
    if int4_method not in INT4_METHODS:
        raise ExportError(f"--int4-method {int4_method!r} is not supported: use one of {', '.join(INT4_METHODS)}")
    _check_out_dir(out, overwrite)
    if isinstance(checkpoint, str) and is_repo_id(checkpoint):
        from onnxpipe.hub import HubError, download_checkpoint

        try:
            checkpoint, hub_source = download_checkpoint(checkpoint, revision=revision, token=token,
                                                         trust_remote_code=trust_remote_code)
        except HubError as e:
            raise ExportError(str(e)) from None
    source = ckpt_mod.inspect_checkpoint(checkpoint)
    source.hub = hub_source

    import torch  # heavy imports only after the cheap checks

    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="onnxpipe-export-") as scratch:
        hf_dir = source.path
        if source.gguf_file:
            log.info("converting GGUF %s to a transformers checkpoint", source.gguf_file)
            hf_dir = ckpt_mod.gguf_to_hf(source.path, source.gguf_file, Path(scratch) / "hf")
        config = ckpt_mod.load_config(hf_dir, trust_remote_code)
        task = resolve_task(task, config)
        ckpt_mod.check_task_supported(config, task)
        tokenizer = ckpt_mod.load_tokenizer(hf_dir, trust_remote_code)
        model = ckpt_mod.load_model(hf_dir, task, trust_remote_code)

        tmp_out = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            roles = _export_onnx(model, task, tmp_out, opset)
            graph_edits = {}
            if task == "text-generation":
                from .graph import add_logits_to_keep
                graph_edits["logits_to_keep"] = add_logits_to_keep(tmp_out / roles["model"])
            tokenizer.save_pretrained(tmp_out)
            _prune_tokenizer_sources(tmp_out)
            if not (tmp_out / "tokenizer.json").exists():
                raise ExportError(f"checkpoint {source.path} has a tokenizer without a fast (tokenizer.json) form; "
                                  "onnxpipe needs one: save it with a transformers *TokenizerFast first")
            optimization = _maybe_optimize(tmp_out, roles, config, optimize, attention)
            from .validate import validate_export, measure_fidelity
            validation = validate_export(model, tokenizer, task, tmp_out, roles, atol=atol, rtol=rtol) if validate \
                else {"passed": None, "skipped": True, "results": []}
            if validate and not validation["passed"]:
                worst = max(validation["results"], key=lambda r: r["max_abs_diff"] / max(r["tolerance"], 1e-30))
                raise ExportError(
                    f"validation failed: {worst['role']}/{worst['output']} differs from torch by "
                    f"{worst['max_abs_diff']:.3g} > tolerance {worst['tolerance']:.3g} ({worst['case']}); "
                    "raise --atol/--rtol if this model is known to be less exact")
            quantization = {}
            if "int8" in precisions:
                method = int8_method if int8_method != "auto" else \
                    ("weight-only" if task == "text-generation" else "dynamic")
                if method == "weight-only":
                    from .quantize import quantize_weight_only
                    int8_roles = quantize_weight_only(tmp_out, roles, bits=8, block_size=WEIGHT_ONLY_INT8_BLOCK,
                                                      accuracy_level=4, suffix="int8")
                    info = {"method": "weight-only 8-bit blocks (MatMulNBits)", "block_size": WEIGHT_ONLY_INT8_BLOCK,
                            "symmetric": True, "accuracy_level": 4, "lm_head": "untied and quantized"}
                else:
                    from .quantize import quantize_int8
                    int8_roles = quantize_int8(tmp_out, roles, weight_type=weight_type, per_channel=per_channel,
                                               reduce_range=reduce_range)
                    info = {"method": "dynamic (weights int8, activations quantized per call)",
                            "weight_type": _wt_name(weight_type), "per_channel": per_channel,
                            "reduce_range": reduce_range}
                fidelity = measure_fidelity(model, tokenizer, task, tmp_out, int8_roles)
                quantization["int8"] = {**info, "fidelity": fidelity}
                _warn_if_poor("int8", fidelity)
            if "int4" in precisions:
                from .quantize import int4_info, quantize_int4
                int4_roles = quantize_int4(tmp_out, roles, int4_method)
                fidelity = measure_fidelity(model, tokenizer, task, tmp_out, int4_roles)
                quantization["int4"] = {**int4_info(int4_method), "fidelity": fidelity}
                _warn_if_poor("int4", fidelity)
            fp16 = _export_fp16(model, tokenizer, task, tmp_out, roles, config, fp16_atol, fp16_rtol, validate) \
                if dtype == "fp16" else None
            from .graph import externalize_weights
            for onnx_file in sorted(tmp_out.glob("*.onnx")):
                externalize_weights(onnx_file)
            from .manifest import write_manifest
            write_manifest(tmp_out, task=task, config=config, tokenizer=tokenizer, model=model, roles=roles,
                           validation=validation, optimization=optimization, quantization=quantization,
                           source=source, hf_dir=hf_dir, graph_edits=graph_edits, fp16=fp16)
            install_folder(tmp_out, out)
        except BaseException:
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise
    return out


QUANTIZE_CHOICES = ("int8", "int4")
# --dtype: the float type of the graphs written besides quantized ones; fp16 adds *.fp16.onnx next to fp32
DTYPES = ("fp32", "fp16")


def _export_fp16(model, tokenizer, task, out: Path, roles: dict, config, atol, rtol, validate: bool = True) -> dict:
    """Write and check the fp16 twins; return the manifest's fp16 section. A failed check is an ExportError, as
    for fp32. What ONNX Runtime's CPU provider ran in float32 (no float16 kernel) is recorded and logged."""
    from .fp16 import FP16_ATOL, FP16_RTOL, convert_fp16, cpu_float32_ops
    from .validate import validate_fp16

    atol = FP16_ATOL if atol is None else atol
    rtol = FP16_RTOL if rtol is None else rtol
    fp16_roles, info = convert_fp16(out, roles, config.model_type)
    validation = validate_fp16(model, tokenizer, task, out, fp16_roles, atol=atol, rtol=rtol) if validate \
        else {"passed": None, "skipped": True, "outputs": {}}
    cpu_fp32 = {role: cpu_float32_ops(out / name) for role, name in fp16_roles.items()}
    not_run = sorted({op for ops in cpu_fp32.values() for op in ops})
    note = ("checked on ONNX Runtime's CPU provider, which has no float16 kernel for "
            f"{', '.join(not_run)}: it computed those in float32 between float16 tensors, so these figures are the "
            "float16 weights' and stored activations' error, not float16 arithmetic's; the CUDA provider's float16 "
            "kernels were not run here") if not_run else "every op ran in float16 on ONNX Runtime's CPU provider"
    log.warning("fp16: %s", note)
    if validate and not validation["passed"]:
        role, name, worst = max(((r, n, e) for r, outs in validation["outputs"].items() for n, e in outs.items()),
                                key=lambda t: t[2]["max_abs_diff"] / max(t[2]["tolerance"], 1e-30))
        raise ExportError(f"fp16 validation failed: {role}/{name} differs from torch fp32 by {worst['max_abs_diff']:.3g} "
                          f"> tolerance {worst['tolerance']:.3g}; this model may overflow float16 (export without "
                          "--dtype fp16), or pass export_model(fp16_atol=..., fp16_rtol=...) if it is known to be less exact")
    return {**info, "validation": validation, "cpu_float32_ops": cpu_fp32, "not_run_in_float16": not_run,
            "note": note}


def _parse_quantize(quantize) -> list[str]:
    if quantize is None:
        return []
    items = quantize.split(",") if isinstance(quantize, str) else list(quantize)
    items = [str(i).strip().lower() for i in items if str(i).strip()]
    bad = [i for i in items if i not in QUANTIZE_CHOICES]
    if bad:
        raise ExportError(f"--quantize {','.join(bad)!s} is not supported: use int8 (dynamic), int4 (weight-only "
                          "MatMulNBits) or both as int8,int4; leave it out for fp32 only")
    return items


def resolve_task(task: str, config) -> str:
    """--task (an export task, any pipeline task or alias, or auto) -> the export task."""
    if task == "auto":
        return infer_task(config)
    try:
        return export_task(task)
    except (ValueError, TypeError) as e:
        raise ExportError(f"{e}, or auto") from None


def infer_task(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    task = task_for_architectures(archs, bool(getattr(config, "is_encoder_decoder", False)))
    if task is None:
        raise ExportError(f"cannot infer the task from architectures {archs or 'None'} in config.json: "
                          f"pass --task (one of {', '.join(TASKS)})")
    return task


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"output {out} exists and is not a folder: choose another --out")
        entries = [p for p in out.iterdir()]
        if entries and not (out / "onnxpipe.json").exists():
            raise ExportError(f"output folder {out} is not empty and is not an onnxpipe model folder: "
                              "choose an empty or new --out")
        if entries and not overwrite:
            raise ExportError(f"output folder {out} already holds a model: remove it or allow overwriting")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder's parent {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {out} is not writable (no write permission on {parent}): choose another --out")


def _export_onnx(model, task: str, out: Path, opset: int | None) -> dict[str, str]:
    """Run optimum's exporter; return role -> fp32 onnx file name."""
    from optimum.exporters.onnx import onnx_export_from_model

    optimum_task = task + "-with-past" if task in ("text-generation", "text2text-generation") else task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_export_from_model(model, output=out, task=optimum_task, opset=opset, do_validation=False,
                                   no_post_process=False)  # post-processing dedups tied weights
        except ExportError:
            raise
        except Exception as e:  # optimum raises many kinds; keep the one line that says why
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"optimum's ONNX exporter failed for {model.config.model_type} / {task}: {msg}") from e
    if task == "text2text-generation":
        roles = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
                 "decoder_with_past": "decoder_with_past_model.onnx"}
        for extra in ("decoder_model_merged.onnx",):
            (out / extra).unlink(missing_ok=True)
    else:
        roles = {"model": "model.onnx"}
    for name in roles.values():
        if not (out / name).exists():
            raise ExportError(f"optimum's exporter did not write {name} for {task}: this architecture is not supported")
    return roles


# Slow-tokenizer sources the runtime never reads (tokenizer.json has it all); SmolLM2's GGUF
# tokenizer.model alone is 98 MB.
_TOKENIZER_SOURCES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt")


def _prune_tokenizer_sources(out: Path) -> None:
    for name in _TOKENIZER_SOURCES:
        (out / name).unlink(missing_ok=True)


def _maybe_optimize(out: Path, roles: dict, config, optimize: bool, attention: str = "gqa") -> dict:
    model_type = OPTIMIZER_MODEL_TYPES.get(config.model_type)
    runtime = runtime_optimization(config.model_type, roles)
    encoder = bool(runtime)
    if not optimize:
        return {"applied": False, "note": "not requested (--optimize)", **runtime}
    if model_type is None or set(roles) != {"model"}:
        note = (f"skipped: ONNX Runtime's transformer fusions are applied to encoders and Llama-family decoders only "
                f"({', '.join(sorted(OPTIMIZER_MODEL_TYPES))}); {config.model_type} gains nothing or breaks "
                "(T5 fuses into RelativePositionBias, which the CPU provider cannot run)")
        log.warning(note)
        return {"applied": False, "note": note}
    from onnxruntime.transformers.optimizer import optimize_model

    path = out / roles["model"]
    num_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", 0)
    options, extra = None, ({"attention": attention} if model_type == "gpt2" else dict(runtime))
    if encoder:  # the residual Add + LayerNormalization left unfused (manifest_fields.ENCODER_DISABLED_OPTIMIZERS)
        from onnxruntime.transformers.fusion_options import FusionOptions

        options = FusionOptions("bert")
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(path), model_type=model_type, num_heads=num_heads, hidden_size=hidden, opt_level=1,
                             optimization_options=options)
    before = _count_nodes(path)
    from .graph import fuse_llama_decoder, retie_transposed_weights
    retie_transposed_weights(opt.model)  # keep a tied LM head tied on disk
    fused_ops = opt.get_fused_operator_statistics()
    if model_type == "gpt2":  # Llama-family decoders: attention and RoPE as ONNX opset-23 ops (export/graph/)
        from .manifest import _max_positions
        kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        positions = min(_max_positions(config) or 0, GQA_MAX_POSITIONS)  # GroupQueryAttention's RoPE tables
        fused, fusion_extra = fuse_llama_decoder(opt.model, num_heads=num_heads, num_kv_heads=kv_heads,
                                                 attention=attention, max_positions=positions)
        fused_ops.update(fused)
        extra.update(fusion_extra)
        if fused.get("GroupQueryAttention"):
            extra["rotary"] = _save_rotary_tables(opt.model, out)
    opt.save_model_to_file(str(path))
    return {"applied": True, "optimizer": "onnxruntime.transformers.optimizer", "model_type": model_type,
            "nodes_before": before, "nodes_after": _count_nodes(path), "fused_ops": fused_ops, **extra}


def _save_rotary_tables(model, out: Path) -> dict | None:
    """GroupQueryAttention rotates keys by their index in the cache (export/graph/group_query_attention.py): the
    runtime's continuous batching moves a sequence's cache to other indices when it joins a batch, and must then
    rotate its keys by the same offset. The graph's own cos/sin tables are written beside it for that
    (rotary.npz), when they are pure rotations linear in the position (RoPE, its linear/NTK scalings); else
    None, and the runtime does not move such a cache."""
    import numpy as np
    from onnx import numpy_helper

    from .graph._util import _attr

    tables = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name in ("gqa/cos_cache", "gqa/sin_cache")}
    if len(tables) != 2:
        return None
    cos, sin = tables["gqa/cos_cache"].astype(np.float64), tables["gqa/sin_cache"].astype(np.float64)
    # each dimension pair's angle, unwrapped along the positions, must grow by one step per position; the tables
    # are float32 (the model's own), so far positions carry ~1e-3 of rounding
    angle = np.unwrap(np.arctan2(sin, cos), axis=0)
    step = angle[-1] / max(len(angle) - 1, 1)
    linear = np.allclose(angle, np.arange(len(angle))[:, None] * step, atol=1e-2)
    if not linear or not np.allclose(cos ** 2 + sin ** 2, 1, atol=1e-3):
        return None
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    np.savez(out / "rotary.npz", cos=tables["gqa/cos_cache"], sin=tables["gqa/sin_cache"])
    return {"file": "rotary.npz", "interleaved": bool(_attr(gqa, "rotary_interleaved", 0))}


def _count_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _wt_name(weight_type: str) -> str:
    return {"quint8": "QUInt8", "qint8": "QInt8"}[weight_type.lower()]


def _warn_if_poor(precision: str, fidelity: dict) -> None:
    from .validate import is_poor

    hint = {"int8": ", or try --int8-method / --weight-type / --per-channel / --reduce-range"}.get(precision, "")
    for role, outputs in fidelity.items():
        for name, f in outputs.items():
            if is_poor(f):
                figures = ", ".join(f"{k} {v:.3g}" for k, v in f.items())
                warnings.warn(f"{precision} {role}/{name} is far from fp32 ({figures}): check accuracy before serving "
                              f"the *.{precision}.onnx files{hint}", stacklevel=3)
