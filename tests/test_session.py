"""Session: provider choice, the CUDA fallback warning, threads, and errors naming what was wrong."""
from __future__ import annotations

import json
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


def test_group_query_attention_export_on_cuda_warns_that_its_attention_runs_on_cpu(monkeypatch):
    """ONNX Runtime's CUDA GroupQueryAttention is float16-only: an --attention gqa export on CUDA says so and
    names the export option that avoids it (the CUDA session is simulated: no GPU here)."""
    from conftest import tiny_export

    # exported first: export validation runs the graphs through Session, which must stay on the CPU for it
    gqa = tiny_export("llama", "text-generation", optimize=True, hidden_size=64, head_dim=16)
    onnx_attention = tiny_export("llama", "text-generation", optimize=True, hidden_size=64, head_dim=16,
                                 attention="onnx")
    monkeypatch.setattr(session_mod, "_warned", set())
    finish = Session._finish

    def on_cuda(self, kind, index, ort_mod):
        finish(self, kind, index, ort_mod)
        self.device = "cuda"

    monkeypatch.setattr(Session, "_finish", on_cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnxpipe.ModelDir(gqa, device="cuda").session()
        onnxpipe.ModelDir(onnx_attention, device="cuda").session()
    messages = [str(w.message) for w in caught if "GroupQueryAttention" in str(w.message)]
    assert len(messages) == 1 and "--attention onnx" in messages[0] and "run on the CPU" in messages[0]


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_session_runs_on_cuda_and_matches_cpu(tiny):
    path = tiny.export("bert", "text-classification")
    cpu = onnxpipe.pipeline("text-classification", model=path, device="cpu")
    gpu = onnxpipe.pipeline("text-classification", model=path, device="cuda")
    assert gpu.model.session().provider == "CUDAExecutionProvider"
    a, b = cpu("hello world", top_k=None), gpu("hello world", top_k=None)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert np.allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-4)


def _bert_feeds():
    return {"input_ids": np.array([[2, 5, 9, 3], [2, 7, 3, 0]]), "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
            "token_type_ids": np.zeros((2, 4), np.int64)}


def test_session_cache_saves_the_optimized_graph_once_and_loads_it_after(tiny, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny.export("bert", "text-classification"), folder)
    cache = tmp_path / "cache"
    plain = Session(folder / "model.onnx").run(_bert_feeds())["logits"]
    word = _disabled_optimizers(folder)  # as the pipeline's sessions have it (its entry is keyed by it)
    first = Session(folder / "model.onnx", session_cache=cache, disabled_optimizers=word)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and first.cached_from == entries[0], "the first load writes one entry"
    assert (entries[0] / "model.onnx").exists() and (entries[0] / "model.onnx.data").exists()
    mtime = (entries[0] / "model.onnx").stat().st_mtime_ns
    second = Session(folder / "model.onnx", session_cache=cache, disabled_optimizers=word)
    assert second.cached_from == entries[0] and (entries[0] / "model.onnx").stat().st_mtime_ns == mtime, "loaded, not rewritten"
    for s in (first, second):
        np.testing.assert_allclose(s.run(_bert_feeds())["logits"], plain, atol=1e-5)
    # through the pipeline, and the same answers
    pipe = onnxpipe.pipeline("text-classification", model=folder, session_cache=cache)
    assert pipe("a short text") == onnxpipe.pipeline("text-classification", model=folder)("a short text")
    assert pipe.model.session().cached_from == entries[0]
    other = Session(folder / "model.onnx", session_cache=cache)  # ONNX Runtime's own fusions all on: another graph
    assert other.cached_from != entries[0] and len(list(cache.iterdir())) == 2


def _disabled_optimizers(folder) -> tuple:
    manifest = json.loads((folder / "onnxpipe.json").read_text())
    return tuple(manifest["optimization"].get("runtime_disabled_optimizers") or ())


def test_session_cache_entry_follows_the_source_files_and_threads(tiny, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny.export("bert", "text-classification"), folder)
    cache = tmp_path / "cache"
    a = Session(folder / "model.onnx", session_cache=cache).cached_from
    b = Session(folder / "model.onnx", session_cache=cache, intra_op_num_threads=1).cached_from
    assert a.exists() and b.exists(), "one entry per thread count"
    (folder / "model.onnx.data").touch()  # re-exported weights: the old entry must not be used
    c = Session(folder / "model.onnx", session_cache=cache).cached_from
    assert len({a, b, c}) == 3 and all(p.parent == cache for p in (a, b, c))
    assert c.exists() and not a.exists() and not b.exists(), "writing an entry removes the old file's entries"
    other = tmp_path / "other"
    shutil.copytree(tiny.export("bert", "text-classification"), other)
    d = Session(other / "model.onnx", session_cache=cache).cached_from
    assert d.exists() and c.exists(), "another model file's entries are kept"


def test_large_graphs_use_the_default_session_cache_unless_it_is_turned_off(tiny, tmp_path, monkeypatch):
    """No session_cache= and no ONNXPIPE_SESSION_CACHE: graphs of DEFAULT_CACHE_MIN_BYTES or more are cached under
    $XDG_CACHE_HOME/onnxpipe/sessions, smaller ones are not; "off" and session_cache=False turn it off."""
    folder = tiny.export("bert", "text-classification")
    monkeypatch.delenv("ONNXPIPE_SESSION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "onnxpipe" / "sessions"
    assert session_mod.default_session_cache_dir() == default
    assert Session(folder / "model.onnx").cached_from is None, "a tiny graph is below the default's size"
    assert not default.exists()
    monkeypatch.setattr(session_mod, "DEFAULT_CACHE_MIN_BYTES", 1)  # as if the graph were large
    first = Session(folder / "model.onnx", disabled_optimizers=_disabled_optimizers(folder))
    assert first.cached_from is not None and first.cached_from.parent == default
    second = onnxpipe.pipeline("text-classification", model=folder)
    assert second.model.session().cached_from == first.cached_from
    assert second("a short text") == onnxpipe.pipeline("text-classification", model=folder, session_cache=False)("a short text")
    assert Session(folder / "model.onnx", session_cache=False).cached_from is None
    monkeypatch.setenv("ONNXPIPE_SESSION_CACHE", "off")
    assert Session(folder / "model.onnx").cached_from is None
    monkeypatch.setenv("ONNXPIPE_SESSION_CACHE", str(tmp_path / "env"))
    assert Session(folder / "model.onnx").cached_from.parent == tmp_path / "env"


def test_default_session_cache_that_cannot_be_written_is_skipped_silently(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(session_mod, "_warned", set())
    monkeypatch.delenv("ONNXPIPE_SESSION_CACHE", raising=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(session_mod, "DEFAULT_CACHE_MIN_BYTES", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user asked for nothing: no warning either
        s = Session(tiny.export("bert", "text-classification") / "model.onnx")
    assert s.cached_from is None and s.run(_bert_feeds())["logits"].shape == (2, 2)


def test_session_cache_that_cannot_be_written_warns_and_still_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(session_mod, "_warned", set())
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="session cache .* is not writable"):
        s = Session(tiny.export("bert", "text-classification") / "model.onnx", session_cache=blocker)
    assert s.cached_from is None and s.run(_bert_feeds())["logits"].shape == (2, 2)


def test_damaged_session_cache_entry_is_rebuilt(tiny, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny.export("bert", "text-classification"), folder)
    cache = tmp_path / "cache"
    entry = Session(folder / "model.onnx", session_cache=cache).cached_from
    (entry / "model.onnx").write_bytes(b"damaged")
    s = Session(folder / "model.onnx", session_cache=cache)
    assert s.cached_from == entry and (entry / "model.onnx").stat().st_size > 100
    np.testing.assert_allclose(s.run(_bert_feeds())["logits"], Session(folder / "model.onnx").run(_bert_feeds())["logits"],
                               atol=1e-5)


def test_session_cache_checksums_read_in_chunks_equal_the_whole_files_and_see_any_change(tmp_path, monkeypatch):
    """The entry's checksum reads its files a chunk at a time (mapping them counted the whole entry in the
    process's resident memory): the same sums as over each whole file, whatever the chunk boundaries."""
    monkeypatch.setattr(session_mod, "_CHECKSUM_CHUNK", 64)
    rng = np.random.default_rng(0)
    sizes = [0, 5, 8, 13, 64, 67, 200, 256]
    for n in sizes:
        (tmp_path / f"f{n}").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())

    def whole(data: bytes) -> str:
        words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) // 8 * 8, 8)]
        xor = 0
        for w in words:
            xor ^= w
        return f"{sum(words) % 2**64:016x}{xor:016x}{data[len(data) // 8 * 8:].hex()}-{len(data)}"

    sums = session_mod._checksums(tmp_path)
    assert sums == {f"f{n}": whole((tmp_path / f"f{n}").read_bytes()) for n in sizes}
    for n, at in [(200, 3), (200, 130), (67, 65)]:  # first chunk, a later chunk, the tail after the last word
        data = bytearray((tmp_path / f"f{n}").read_bytes())
        data[at] ^= 1
        (tmp_path / f"f{n}").write_bytes(bytes(data))
        assert session_mod._checksums(tmp_path)[f"f{n}"] != sums[f"f{n}"]


def test_shared_thread_pool_runs_every_session_of_the_process_on_one_pool(tiny):
    """Process-wide, so in a child process: two models (and a session of other code that opts in) on one pool,
    the same answers as with a pool each, and a per-session thread count is reported as ignored."""
    import subprocess
    import sys

    folder = tiny.export("bert", "text-classification")
    code = f"""
import warnings, numpy as np, onnxruntime as ort, onnxpipe
from onnxpipe.session import on_process_pool, shared_thread_pool
feeds = {{"input_ids": np.array([[2, 5, 9, 3]]), "attention_mask": np.ones((1, 4), np.int64),
         "token_type_ids": np.zeros((1, 4), np.int64)}}
alone = onnxpipe.Session({str(folder / "model.onnx")!r}).run(feeds)["logits"]
onnxpipe.share_thread_pool(2)
assert shared_thread_pool() == 2
a = onnxpipe.Session({str(folder / "model.onnx")!r})
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    b = onnxpipe.Session({str(folder / "model.int8.onnx")!r}, intra_op_num_threads=1)
assert any("intra_op_num_threads=1 is ignored" in str(x.message) for x in w), [str(x.message) for x in w]
other = ort.InferenceSession({str(folder / "model.onnx")!r}, on_process_pool(), providers=["CPUExecutionProvider"])
np.testing.assert_allclose(a.run(feeds)["logits"], alone, atol=1e-6)
np.testing.assert_allclose(other.run(None, feeds)[0], alone, atol=1e-6)
assert b.run(feeds)["logits"].shape == alone.shape
try:
    onnxpipe.share_thread_pool(1)
except ValueError as e:
    assert "already shares a thread pool of 2 threads" in str(e)
else:
    raise AssertionError("resizing the shared pool must be refused")
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]
