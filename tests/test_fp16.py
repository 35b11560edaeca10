"""`export --dtype fp16`: float16 twins beside the fp32 graphs, checked on the CPU provider where it can run them;
the runtime's precision="fp16" (a warning on CPU, the fp16 file on CUDA). The `cuda`-marked tests need onnxruntime-gpu
and a GPU (`make gpu-check` runs them)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxpipe
from onnxpipe.generation.kv_cache import DecoderStepper
from onnxpipe.model_dir import ModelDir

from conftest import CACHE, _export_code_hash, tiny_checkpoint, tiny_export

# name: (tiny architecture, task, config overrides, --optimize). "llama-gqa": fused into GroupQueryAttention (its CPU
# kernel wants head_dim % 16 == 0, hence the overrides)
FAMILIES = {
    "bert": ("bert", "text-classification", {}, False),
    "gpt2": ("gpt2", "text-generation", {}, False),
    "llama-gqa": ("llama", "text-generation", {"hidden_size": 64, "head_dim": 16}, True),
    "t5": ("t5", "text2text-generation", {}, False),
}
# ONNX Runtime registers these contrib ops in the ONNX domain itself (no ONNX schema: the checker rejects them in
# the fp32 graph alike); the checker runs on a copy that names their real home, com.microsoft, so it checks the rest
ORT_OPS_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}


def fp16_export(family: str) -> Path:
    """The tiny model of `family` exported with --dtype fp16 (fp32 beside it), once per exporter version; on a GPU
    machine without the export extra, the copy `make gpu-wheels` carried ($ONNXPIPE_GPU_MODELS/<family>)."""
    carried = os.environ.get("ONNXPIPE_GPU_MODELS")
    if carried:
        return Path(carried) / family
    from onnxpipe.export import export_model

    arch, task, overrides, optimize = FAMILIES[family]
    ckpt = tiny_checkpoint(arch, task, **overrides)
    key = hashlib.sha256(json.dumps([str(ckpt), optimize, _export_code_hash()]).encode()).hexdigest()[:8]
    out = CACHE / "exports" / f"{ckpt.name}-fp16-{key}"
    if not (out / "onnxpipe.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        export_model(ckpt, out, task, optimize=optimize, dtype="fp16")
    return out


def _manifest(path: Path) -> dict:
    return json.loads((path / "onnxpipe.json").read_text())


def _weight_bytes(folder: Path, entry: dict) -> int:
    """The graph's weights file (<name>.onnx.data): the graph file itself is a few KiB of nodes whatever the
    precision, which would dominate a tiny model's total."""
    return (folder / entry["external_data"]["path"]).stat().st_size


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp16_export_is_checked_half_size_and_within_its_stated_tolerance(family):
    out = fp16_export(family)
    m = _manifest(out)
    fp16 = m["fp16"]
    assert fp16["validation"]["passed"] is True and fp16["validation"]["reference"] == "torch float32"
    for role, files in m["files"].items():
        assert {"fp32", "fp16"} <= set(files), "fp16 written beside fp32, not instead"
        path = out / files["fp16"]["path"]
        model = onnx.load(str(path))
        checked = onnx.ModelProto()
        checked.CopyFrom(model)
        for node in checked.graph.node:
            if node.op_type in ORT_OPS_IN_ONNX_DOMAIN and node.domain in ("", "ai.onnx"):
                node.domain = "com.microsoft"
        onnx.checker.check_model(checked)
        dtypes = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
        for init in model.graph.initializer:
            if init.data_type in dtypes:
                dtypes[init.data_type] += int(np.prod(init.dims))
        assert dtypes[onnx.TensorProto.FLOAT16] > 10 * dtypes[onnx.TensorProto.FLOAT], f"{role}: weights float16"
        ratio = _weight_bytes(out, files["fp16"]) / _weight_bytes(out, files["fp32"])
        assert 0.45 < ratio < 0.55, f"{role}: fp16 weights are {ratio:.2f} of fp32's"
        # inputs and outputs keep the fp32 graph's types, but for the KV cache, which is float16
        fp32_io = {v["name"]: v["dtype"] for v in m["io"][role]["inputs"] + m["io"][role]["outputs"]}
        graph = model.graph
        for v in list(graph.input) + list(graph.output):
            if v.name not in fp32_io:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            cache = v.name.startswith(("past_key_values.", "present."))
            assert dtype == ("float16" if cache and fp32_io[v.name] == "float32" else fp32_io[v.name]), v.name
        # each output's tolerance is written, and its error is within it
        for name, entry in fp16["validation"]["outputs"][role].items():
            assert entry["max_abs_diff"] <= entry["tolerance"], (role, name)
            assert entry["tolerance"] == pytest.approx(fp16["validation"]["atol"] + fp16["validation"]["rtol"]
                                                       * entry["max_abs_ref"])
    assert fp16["kv_cache_dtype"] == (None if family == "bert" else "float16")
    # what the CPU provider computed in float32 is said, per role and in one list
    assert fp16["not_run_in_float16"] == sorted({op for ops in fp16["cpu_float32_ops"].values() for op in ops})
    if fp16["not_run_in_float16"]:
        assert "not float16 arithmetic" in fp16["note"] and "CUDA" in fp16["note"]


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_fp16_decoder_runs_on_cpu_with_a_float16_cache_and_matches_fp32(family):
    """The runtime's own stepper feeds the fp16 graph a float16 cache (read from the session, not the manifest's
    fp32 kv_cache.dtype), llama-gqa's in one shared buffer; logits match the fp32 graph's within the manifest's
    tolerance at prefill and at cached steps, and the top token is the same wherever fp32's margin exceeds it."""
    out = fp16_export(family)
    m = _manifest(out)
    tolerance = m["fp16"]["validation"]["outputs"]["model"]["logits"]["tolerance"]
    ids = np.array([[7, 7, 7, 30, 41, 52], [11, 12, 13, 14, 15, 16]], np.int64)
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 on CPU: tested below
        steppers = {p: DecoderStepper(ModelDir(out, precision=p).session(), m["kv_cache"]) for p in ("fp32", "fp16")}
    assert steppers["fp16"].dtype == np.float16 and steppers["fp32"].dtype == np.float32
    assert (steppers["fp16"].shared is not None) == bool(m["kv_cache"]["shared_buffer"])
    logits = {p: s.prefill(ids, mask) for p, s in steppers.items()}
    for step in range(3):
        ref, got = logits["fp32"], logits["fp16"]
        assert np.isfinite(got).all()
        assert np.max(np.abs(ref - got)) <= tolerance, f"step {step}"
        top2 = np.sort(ref, -1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
        assert (np.argmax(ref, -1) == np.argmax(got, -1))[clear].all()
        nxt = np.argmax(ref, -1)  # both fed fp32's token: the same sequence
        logits = {p: s.step(nxt) for p, s in steppers.items()}


def test_fp16_pipelines_run_on_cpu_and_agree_with_fp32():
    """text-classification: the same labels, scores within the stated tolerance of the logits; text2text: the
    encoder-decoder runs its float16 cache to the end."""
    out = fp16_export("bert")
    tolerance = _manifest(out)["fp16"]["validation"]["outputs"]["model"]["logits"]["tolerance"]
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = onnxpipe.pipeline("text-classification", model=out)(texts, top_k=None)
        b = onnxpipe.pipeline("text-classification", model=out, precision="fp16")(texts, top_k=None)
        t5 = onnxpipe.pipeline("text2text-generation", model=fp16_export("t5"), precision="fp16")
        generated = t5("summarize: the quick brown fox", max_new_tokens=5, do_sample=False)
    for x, y in zip(a, b):
        assert [r["label"] for r in x] == [r["label"] for r in y]
        assert np.allclose([r["score"] for r in x], [r["score"] for r in y], atol=tolerance)
    assert isinstance(generated[0]["generated_text"], str)


def test_fp16_on_cpu_warns_that_it_is_emulated_and_names_cuda(monkeypatch):
    from onnxpipe import session as session_mod

    out = fp16_export("llama-gqa")
    monkeypatch.setattr(session_mod, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = onnxpipe.pipeline("text-generation", model=out, precision="fp16")
        pipe("Hello", max_new_tokens=2, do_sample=False)
    messages = [str(w.message) for w in caught if "precision='fp16' on CPU" in str(w.message)]
    assert len(messages) == 1
    assert "device='cuda'" in messages[0] and "GroupQueryAttention" in messages[0]
    assert pipe.model.precision == "fp16" and pipe.model.device == "cpu"


def test_fp16_asked_of_a_folder_without_it_names_the_export_flag():
    out = tiny_export("bert", "text-classification", quantize=None)
    with pytest.raises(ValueError, match="--dtype fp16"):
        ModelDir(out, precision="fp16")


def test_unknown_dtype_is_refused(tmp_path):
    from onnxpipe.export import ExportError, export_model

    with pytest.raises(ExportError, match="--dtype 'bf16'"):
        export_model(tiny_checkpoint("bert", "text-classification"), tmp_path / "x", "text-classification", dtype="bf16")


# --- CUDA (make gpu-check) ------------------------------------------------------------------------------------------

def _cuda_or_skip():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime build")


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_runs_the_fp16_file_on_the_gpu_and_matches_cpu_fp32(family):
    """On CUDA precision='fp16' loads *.fp16.onnx on the CUDA provider (no GroupQueryAttention-on-CPU warning) and
    its outputs match the CPU fp32 ones within the manifest's tolerance: labels / greedy tokens equal."""
    _cuda_or_skip()
    out = fp16_export(family)
    m = _manifest(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpu = ModelDir(out, precision="fp16", device="cuda")
        session = gpu.session(gpu.roles[0])
    if session.device != "cuda":
        pytest.skip("the CUDA provider could not be created on this machine")
    assert session.path.name.endswith(".fp16.onnx")
    assert not [w for w in caught if "GroupQueryAttention" in str(w.message) or "on CPU" in str(w.message)]
    task = m["task"]
    if task == "text-classification":
        texts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
        cpu = onnxpipe.pipeline(task, model=out)(texts, top_k=None)
        cuda = onnxpipe.pipeline(task, model=gpu)(texts, top_k=None)
        tolerance = m["fp16"]["validation"]["outputs"]["model"]["logits"]["tolerance"]
        for x, y in zip(cpu, cuda):
            assert [r["label"] for r in x] == [r["label"] for r in y]
            assert np.allclose([r["score"] for r in x], [r["score"] for r in y], atol=tolerance)
        return
    prompt = "Hello world" if task == "text-generation" else "summarize: the quick brown fox"
    cpu = onnxpipe.pipeline(task, model=out)(prompt, max_new_tokens=8, do_sample=False)
    cuda = onnxpipe.pipeline(task, model=gpu)(prompt, max_new_tokens=8, do_sample=False)
    assert cuda == cpu, "greedy tokens equal (tiny random models can tie; a difference names the family)"


@pytest.mark.cuda
def test_cuda_decode_keeps_the_float16_cache_on_the_device():
    """The decoder loop on CUDA binds each step's present.* OrtValues (float16, on the GPU) as the next past."""
    _cuda_or_skip()
    out = fp16_export("llama-gqa")
    gpu = ModelDir(out, precision="fp16", device="cuda")
    session = gpu.session()
    if session.device != "cuda":
        pytest.skip("the CUDA provider could not be created on this machine")
    stepper = DecoderStepper(session, gpu.manifest["kv_cache"])
    assert stepper.dtype == np.float16 and stepper.runner.on_device
    stepper.prefill(np.array([[11, 12, 13]], np.int64), np.ones((1, 3), np.int64))
    stepper.step(np.array([14]))
    value = next(iter(stepper.cache.values()))
    assert value.device_name() == "cuda" and value.data_type() == "tensor(float16)"
