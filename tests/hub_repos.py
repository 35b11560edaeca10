"""Ready-made ONNX repos as the Hub holds them, built here from the tests' tiny checkpoints and cached under
.cache/tests/hub-repos (git-ignored):

- `optimum_repo(arch, task)`: what optimum's own exporter (`optimum.exporters.onnx.main_export`, as
  `optimum-cli export onnx` runs it) writes: config.json, tokenizer files and the graphs beside them;
- `transformers_js_repo(arch, task)`: the same graphs under onnx/, each with a dynamically quantized
  `<name>_quantized.onnx` twin, as transformers.js's conversion script lays them out;
- `transformers_js_merged_repo(arch, task)`: a decoder as older transformers.js repos hold it, only
  onnx/decoder_model_merged.onnx (and its quantized twin; beside encoder_model.onnx for an encoder-decoder): optimum's
  merged graph for T5/BART, and for a decoder-only model optimum's `merge_decoders` of its model.onnx with itself (so
  the graph has the merged interface, `use_cache_branch` and all, while both branches are the one decoder optimum-onnx
  exports now).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from conftest import CACHE, tiny_checkpoint

REPO_CACHE = CACHE / "hub-repos"
_BUILDER_VERSION = 1  # bump when what these builders write changes
# export task -> optimum's task name (decoders with their KV cache)
OPTIMUM_TASKS = {"text-generation": "text-generation-with-past",
                 "text2text-generation": "text2text-generation-with-past"}


def optimum_repo(arch: str, task: str) -> Path:
    checkpoint = tiny_checkpoint(arch, task)
    return _cached(f"optimum-{checkpoint.name}", lambda dest: _optimum_export(checkpoint, task, dest))


def transformers_js_repo(arch: str, task: str) -> Path:
    optimum = optimum_repo(arch, task)
    return _cached(f"transformers-js-{optimum.name}", lambda dest: _transformers_js_layout(optimum, dest))


def transformers_js_merged_repo(arch: str, task: str) -> Path:
    optimum = optimum_repo(arch, task)
    return _cached(f"transformers-js-merged-{optimum.name}", lambda dest: _merged_layout(optimum, task, dest))


def _optimum_export(checkpoint: Path, task: str, dest: Path) -> None:
    import warnings

    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(checkpoint), output=dest, task=OPTIMUM_TASKS.get(task, task), do_validation=False)


def _transformers_js_layout(optimum: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (dest / "onnx").mkdir()
    for f in optimum.iterdir():
        if f.suffix == ".onnx":
            shutil.copyfile(f, dest / "onnx" / f.name)
            if f.stem != "decoder_model_merged":  # its If branches are left fp32 here, as some repos keep it
                quantize_dynamic(f, dest / "onnx" / f"{f.stem}_quantized.onnx", weight_type=QuantType.QUInt8)
        elif f.is_file():
            shutil.copyfile(f, dest / f.name)
    (dest / "quantize_config.json").write_text('{"per_channel": false, "reduce_range": false}\n')


def _merged_layout(optimum: Path, task: str, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (dest / "onnx").mkdir()
    if task == "text-generation":
        from optimum.onnx import merge_decoders

        merge_decoders(optimum / "model.onnx", optimum / "model.onnx",
                       save_path=dest / "onnx" / "decoder_model_merged.onnx")
        graphs = ["decoder_model_merged.onnx"]
    else:
        graphs = ["encoder_model.onnx", "decoder_model_merged.onnx"]
        for name in graphs:
            shutil.copyfile(optimum / name, dest / "onnx" / name)
    for name in graphs:
        quantize_dynamic(dest / "onnx" / name, dest / "onnx" / name.replace(".onnx", "_quantized.onnx"),
                         weight_type=QuantType.QUInt8, extra_options={"EnableSubgraph": True})
    for f in optimum.iterdir():
        if f.is_file() and f.suffix != ".onnx":
            shutil.copyfile(f, dest / f.name)


def _cached(name: str, build) -> Path:
    import optimum.version

    key = hashlib.sha256(f"{_BUILDER_VERSION} {optimum.version.__version__}".encode()).hexdigest()[:8]
    dest = REPO_CACHE / f"{name}-{key}"
    if (dest / ".complete").exists():
        return dest
    REPO_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=REPO_CACHE))
    try:
        build(tmp)
        (tmp / ".complete").write_text(name)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
