"""`onnxpipe import`: a ready-made ONNX export (optimum's own exporter's layout, or transformers.js's) becomes an
onnxpipe model folder whose manifest says what the exporter's says for the same checkpoint, loads, and runs as
transformers does; a folder whose config or graphs cannot be understood is a one-line error naming what is missing."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import onnxpipe  # noqa: E402
from conftest import assert_results_close, reference_pipeline, tiny_checkpoint, tiny_export  # noqa: E402
from hub_repos import optimum_repo, transformers_js_merged_repo, transformers_js_repo  # noqa: E402
from onnxpipe.generation.config import GLOBAL_DEFAULTS  # noqa: E402
from onnxpipe.onnx_import import OnnxImportError, derive_manifest, import_onnx_folder  # noqa: E402

MODELS = [("bert", "text-classification"), ("bert", "token-classification"), ("bert", "question-answering"),
          ("bert", "fill-mask"), ("bert", "feature-extraction"), ("roberta", "fill-mask"),
          ("distilbert", "question-answering"),
          ("gpt2", "text-generation"), ("llama", "text-generation"), ("t5", "text2text-generation"),
          ("bart", "text2text-generation")]
# What the runtime reads and both must say alike (docs/MANIFEST.md); the rest (files, io, versions, validation,
# optimization, quantization, source, created) describes how each folder was made.
SAME_FIELDS = ("task", "model_type", "architecture", "is_encoder_decoder", "id2label", "label2id", "problem_type",
               "num_labels", "max_positions", "tokenizer", "chat_template", "prefix", "task_specific_params",
               "sentence_embedding")


def _ids(model):
    return "-".join(model)


@pytest.mark.parametrize("model", MODELS, ids=_ids)
def test_derived_manifest_says_what_the_exporter_says(model):
    arch, task = model
    exported = json.loads((tiny_export(arch, task) / "onnxpipe.json").read_text())
    derived, _ = derive_manifest(optimum_repo(arch, task))
    for field in SAME_FIELDS:
        assert derived[field] == exported[field], field
    # the fusions the sessions turn off (BERT-family encoders: SkipLayerNormFusion), alike for both folders
    word = derived["optimization"].get("runtime_disabled_optimizers")
    assert word == exported["optimization"].get("runtime_disabled_optimizers")
    assert bool(word) == (arch in ("bert", "roberta", "distilbert"))
    if exported["kv_cache"]:
        assert {k: v for k, v in derived["kv_cache"].items() if k != "shared_buffer"} == \
            {k: v for k, v in exported["kv_cache"].items() if k != "shared_buffer"}
    if exported["generation"] is not None:
        # the same GenerationConfig once both are read over transformers' defaults, as the runtime reads them
        ours = {**GLOBAL_DEFAULTS, **{k: v for k, v in derived["generation"].items() if k in GLOBAL_DEFAULTS}}
        theirs = {**GLOBAL_DEFAULTS, **{k: v for k, v in exported["generation"].items() if k in GLOBAL_DEFAULTS}}
        assert ours == theirs
    else:
        assert derived["generation"] is None


def test_import_cli_writes_a_model_folder_that_matches_transformers(tmp_path):
    from onnxpipe.cli import main

    src = transformers_js_repo("bert", "token-classification")
    assert main(["import", str(src), "--out", str(tmp_path / "ner")]) == 0
    manifest = json.loads((tmp_path / "ner" / "onnxpipe.json").read_text())
    assert {p: e["path"] for p, e in manifest["files"]["model"].items()} == \
        {"fp32": "onnx/model.onnx", "int8": "onnx/model_quantized.onnx"}
    assert manifest["source"]["layout"] == "transformers.js" and manifest["validation"]["passed"] is None
    text = "John lives in Paris and works for Acme."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_pipeline("token-classification", tiny_checkpoint("bert", "token-classification"))
        expected = json.loads(json.dumps(ref(text, aggregation_strategy="simple"), default=float))
    assert_results_close(onnxpipe.pipeline(model=tmp_path / "ner")(text, aggregation_strategy="simple"), expected)
    assert onnxpipe.pipeline(model=tmp_path / "ner", precision="int8")(text)
    # a precision the publisher did not export: said as such (onnxpipe cannot re-quantize an import)
    with pytest.raises(ValueError, match=r"has no int4 file for model: the ONNX export it was imported from has "
                                         r"only fp32, int8 .*precision='fp32'"):
        onnxpipe.pipeline(model=tmp_path / "ner", precision="int4")
    with pytest.raises(ValueError, match=r"has no int4 file for model: export it with --quantize int4"):
        onnxpipe.pipeline(model=tiny_export("bert", "token-classification"), precision="int4")


def test_import_in_place_writes_only_the_manifest(tmp_path):
    src = tmp_path / "t5"
    shutil.copytree(optimum_repo("t5", "text2text-generation"), src)
    before = sorted(p.name for p in src.iterdir())
    import_onnx_folder(src, src)
    assert sorted(p.name for p in src.iterdir()) == sorted(before + ["onnxpipe.json"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.pipeline("text2text-generation", model=str(tiny_checkpoint("t5", "text2text-generation")))
        expected = ref("translate this please", max_new_tokens=8, num_beams=2)
    assert onnxpipe.pipeline(model=src)("translate this please", max_new_tokens=8, num_beams=2) == expected


def test_decoder_imported_from_optimum_generates_as_transformers(tmp_path):
    out = import_onnx_folder(optimum_repo("llama", "text-generation"), tmp_path / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.pipeline("text-generation", model=str(tiny_checkpoint("llama", "text-generation")))
        prompts = ["Once upon a time", "The cat"]
        expected = ref(prompts, max_new_tokens=8, do_sample=False)
    assert onnxpipe.pipeline(model=out)(prompts, max_new_tokens=8, do_sample=False) == expected


@pytest.mark.parametrize("arch,task", [("gpt2", "text-generation"), ("llama", "text-generation"),
                                       ("t5", "text2text-generation"), ("bart", "text2text-generation")])
def test_merged_decoders_generate_as_transformers(tmp_path, arch, task):
    out = import_onnx_folder(transformers_js_merged_repo(arch, task), tmp_path / "m")
    manifest = json.loads((out / "onnxpipe.json").read_text())
    assert {e["fp32"]["path"] for role, e in manifest["files"].items() if role != "encoder"} == \
        {"onnx/decoder_model_merged.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.pipeline(task, model=str(tiny_checkpoint(arch, task)))
        for options in (dict(max_new_tokens=8, do_sample=False, num_beams=1),
                        dict(max_new_tokens=8, num_beams=3, do_sample=False)):
            texts = ["Once upon a time", "The cat"]
            assert onnxpipe.pipeline(model=out)(texts, **options) == ref(texts, **options), options
    assert onnxpipe.pipeline(model=out, precision="int8")("The cat", max_new_tokens=4)


# --- what cannot be understood is a clear error ---------------------------------------------------------------------

def _broken_copy(tmp_path, arch, task, edit):
    src = tmp_path / "src"
    shutil.copytree(optimum_repo(arch, task), src)
    edit(src)
    return src


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("case,arch,task,edit,expected", [
    ("config-not-json", "bert", "fill-mask", lambda f: (f / "config.json").write_text("{not json"),
     "config.json cannot be read as JSON"),
    ("no-config", "bert", "fill-mask", lambda f: (f / "config.json").unlink(), "has no config.json"),
    ("no-architectures", "bert", "token-classification", _edit_config(architectures=None),
     "cannot tell whether the graph is for fill-mask or token-classification"),
    ("labels-disagree", "bert", "text-classification", _edit_config(id2label={"0": "A", "1": "B", "2": "C"}),
     "id2label has 3 labels but the graph's logits have 2"),
    ("no-tokenizer-json", "bert", "fill-mask", lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
    ("no-special-tokens", "bert", "fill-mask",
     lambda f: ((f / "special_tokens_map.json").unlink(), (f / "tokenizer_config.json").write_text("{}")),
     "does not say its special tokens"),
    ("no-graph", "bert", "fill-mask", lambda f: (f / "model.onnx").rename(f / "weights.bin"),
     "has no ONNX graph onnxpipe can run"),
    ("encoder-without-decoder", "t5", "text2text-generation",
     lambda f: [(f / n).unlink() for n in ("decoder_model.onnx", "decoder_with_past_model.onnx",
                                           "decoder_model_merged.onnx")],
     "is an encoder-decoder export without its decoder"),
    ("decoder-without-cache", "gpt2", "text-generation",
     lambda f: shutil.copyfile(optimum_repo("bert", "token-classification") / "model.onnx", f / "model.onnx"),
     "exported without its KV cache"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "/" not in v else None)
def test_what_cannot_be_derived_is_a_one_line_error(tmp_path, case, arch, task, edit, expected):
    src = _broken_copy(tmp_path, arch, task, edit)
    with pytest.raises(OnnxImportError) as err:
        import_onnx_folder(src, tmp_path / "out")
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "nothing half-written is left"


def test_a_task_given_where_the_graph_cannot_tell(tmp_path):
    src = _broken_copy(tmp_path, "bert", "token-classification", _edit_config(architectures=None))
    out = import_onnx_folder(src, tmp_path / "out", task="ner")
    assert json.loads((out / "onnxpipe.json").read_text())["task"] == "token-classification"
    with pytest.raises(OnnxImportError, match="cannot run 'question-answering'"):
        derive_manifest(src, task="question-answering")


def test_import_cli_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    from onnxpipe.cli import main

    src = _broken_copy(tmp_path, "bert", "fill-mask", lambda f: (f / "config.json").unlink())
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxpipe import: error:") and "config.json" in err and "\n" not in err
