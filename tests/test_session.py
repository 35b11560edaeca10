"""Session: provider choice, the CUDA fallback warning, threads, and errors naming what was wrong."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest

import onnxpipe
from onnxpipe import session as session_mod
from onnxpipe.session import Session, parse_device

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("device,expected", [("cpu", ("cpu", 0)), (None, ("cpu", 0)), (-1, ("cpu", 0)), ("cuda", ("cuda", 0)),
                                             ("cuda:1", ("cuda", 1)), (0, ("cuda", 0)), ("GPU", ("cuda", 0))])
def test_parse_device_accepts_transformers_forms(device, expected):
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:"])
def test_unknown_device_is_a_clear_error(device):
    with pytest.raises(ValueError, match="device="):
        parse_device(device)


def test_cpu_session_runs_with_threads_and_reports_its_provider(tiny):
    path = tiny.export("bert", "text-classification") / "model.onnx"
    s = Session(path, intra_op_num_threads=1)
    assert s.provider == "CPUExecutionProvider" and s.device == "cpu"
    feeds = {"input_ids": np.array([[2, 5, 3]]), "attention_mask": np.ones((1, 3), np.int64),
             "token_type_ids": np.zeros((1, 3), np.int64), "unused": np.zeros(1)}
    assert s.run(feeds)["logits"].shape == (1, 2)


def test_missing_input_names_the_input(tiny):
    s = Session(tiny.export("bert", "text-classification") / "model.onnx")
    with pytest.raises(ValueError, match="needs inputs token_type_ids"):
        s.run({"input_ids": np.array([[2, 3]]), "attention_mask": np.ones((1, 2), np.int64)})


def test_corrupt_onnx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="cannot load ONNX model .*export the model again"):
        Session(bad)


@pytest.mark.parametrize("damage", ["weights-deleted", "weights-truncated"])
def test_missing_or_truncated_weights_file_is_a_clear_error(tiny, tmp_path, damage):
    folder = tmp_path / "m"
    shutil.copytree(tiny.export("bert", "text-classification"), folder)
    data = folder / "model.onnx.data"
    if damage == "weights-deleted":
        data.unlink()
        with pytest.raises(ValueError, match=r"incomplete: model.onnx.data \(model, fp32\) is missing; export it again"):
            onnxpipe.pipeline("text-classification", model=folder)
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        pipe = onnxpipe.pipeline("text-classification", model=folder)
        with pytest.raises(ValueError, match="cannot load ONNX model .*model.onnx.*export the model again"):
            pipe("hello")


@pytest.mark.skipif(HAS_CUDA, reason="this checks the fallback on a machine without CUDA")
def test_cuda_without_cuda_warns_once_and_runs_on_cpu(tiny, monkeypatch):
    monkeypatch.setattr(session_mod, "_warned", set())
    path = tiny.export("bert", "text-classification")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = onnxpipe.pipeline("text-classification", model=path, device="cuda")
        pipe2 = onnxpipe.pipeline("text-classification", model=path, device="cuda")
        result = pipe("hello")
        pipe2("hello")
    cuda_warnings = [w for w in caught if "CUDA was asked for" in str(w.message)]
    assert len(cuda_warnings) == 1, "warned once, not per session"
    assert "Running on CPU" in str(cuda_warnings[0].message)
    assert pipe.model.session().provider == "CPUExecutionProvider"
    assert result[0]["label"] in ("NEGATIVE", "POSITIVE")


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_session_runs_on_cuda_and_matches_cpu(tiny):
    path = tiny.export("bert", "text-classification")
    cpu = onnxpipe.pipeline("text-classification", model=path, device="cpu")
    gpu = onnxpipe.pipeline("text-classification", model=path, device="cuda")
    assert gpu.model.session().provider == "CUDAExecutionProvider"
    a, b = cpu("hello world", top_k=None), gpu("hello world", top_k=None)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert np.allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-4)
