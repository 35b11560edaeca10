"""Models by Hub id, served by a Hub stand-in on 127.0.0.1 (tests/hub_server.py) to the real huggingface_hub client:
export from an id and a revision; pipeline(model=id) for an onnxpipe repo, an Optimum-layout ONNX repo and a
transformers.js-layout one (torch-free, equal to transformers on the same weights); transformers' defaults for tasks
without a built-in one; and every failure as one line naming the repo and the revision."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

import onnxpipe  # noqa: E402
from conftest import assert_results_close, reference_pipeline, tiny_checkpoint, tiny_export  # noqa: E402
from hub_repos import optimum_repo, transformers_js_merged_repo, transformers_js_repo  # noqa: E402
from hub_server import StandInHub  # noqa: E402
from onnxpipe.models import load_registry  # noqa: E402

FORBIDDEN = ("torch", "transformers", "optimum", "onnx")
# task -> (tiny architecture, the checkpoint's export task, the call, as Python source on `p`)
CASES = {
    "text-classification": ("bert", "text-classification", "p('I love this movie.')"),
    "token-classification": ("bert", "token-classification", "p('John lives in Paris.')"),
    "question-answering": ("bert", "question-answering",
                           "p(question='Where does John live?', context='John lives in Paris.')"),
    "fill-mask": ("bert", "fill-mask", "p('John lives in [MASK].')"),
    "feature-extraction": ("bert", "feature-extraction", "p('John lives in Paris.')"),
    "text-generation": ("gpt2", "text-generation", "p('Hello there', max_new_tokens=6, do_sample=False)"),
    "text2text-generation": ("t5", "text2text-generation", "p('Hello there', max_new_tokens=6, num_beams=1)"),
}
LAYOUTS = ("onnxpipe", "optimum", "transformers-js", "transformers-js-merged")
# (layout, task) served: every task in each layout, and the merged-decoder layout for the generating ones
SERVED = [(layout, task) for layout in LAYOUTS for task in CASES
          if layout != "transformers-js-merged" or task in ("text-generation", "text2text-generation")]
CHECKPOINT_REPO = "test-org/tiny-bert-sentiment"
REGISTRY = load_registry()


def _layout_folder(layout: str, task: str):
    arch, export_task, _ = CASES[task]
    if layout == "onnxpipe":
        return tiny_export(arch, export_task)
    builders = {"optimum": optimum_repo, "transformers-js": transformers_js_repo,
                "transformers-js-merged": transformers_js_merged_repo}
    return builders[layout](arch, export_task)


def _repo_id(layout: str, task: str) -> str:
    return f"test-org/{layout}-{task}"


@pytest.fixture(scope="module")
def hub():
    with StandInHub() as hub:
        for layout, task in SERVED:
            hub.add(_repo_id(layout, task), _layout_folder(layout, task))
        checkpoint = tiny_checkpoint("bert", "text-classification")
        files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file() and not p.name.startswith(".")}
        # what an export must not download: the other frameworks' weights and the model card
        junk = {"pytorch_model.bin": b"not used: safetensors are preferred", "flax_model.msgpack": b"x",
                "README.md": b"# tiny"}
        hub.add(CHECKPOINT_REPO, {**files, **junk})
        config = json.loads(files["config.json"])
        config.update(id2label={"0": "SAD", "1": "HAPPY"}, label2id={"SAD": 0, "HAPPY": 1})
        hub.add(CHECKPOINT_REPO, {**files, "config.json": json.dumps(config).encode()}, revision="v1")
        yield hub


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """The Hub stand-in as the Hub, empty caches of this test's own, no token."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("ONNXPIPE_HUB_CACHE", str(tmp_path / "onnxpipe-hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file from a login on this machine
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    return hub


def _go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _one_line_error(call, *expected):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    return message


def _manifest(folder):
    return json.loads((folder / "onnxpipe.json").read_text())


# --- pipeline(model=ORG/NAME): three kinds of repo, torch-free, equal to transformers ------------------------------

SCRIPT = r"""
import json, sys
import onnxpipe

cases = json.loads(sys.argv[1])
report = {"results": {}}
for repo_id, (task, call) in cases.items():
    try:
        p = onnxpipe.pipeline(task, model=repo_id)
        report["results"][repo_id] = {"ok": True, "value": eval(call), "path": str(p.model.path)}
    except Exception as e:
        report["results"][repo_id] = {"ok": False, "value": f"{type(e).__name__}: {e}"[:800]}
report["modules"] = sorted(m for m in sys.modules if m in %r)
print(json.dumps(report))
""" % (FORBIDDEN,)


@pytest.fixture(scope="module")
def served(hub, tmp_path_factory):
    """Every repo of every layout through pipeline(model=id) in one fresh interpreter, from empty caches."""
    caches = tmp_path_factory.mktemp("serve-time")
    env = {**_clean_env(), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(caches / "hf"),
           "ONNXPIPE_HUB_CACHE": str(caches / "onnxpipe"), "HF_HOME": str(caches / "hf-home")}
    cases = {_repo_id(layout, task): (task, CASES[task][2]) for layout, task in SERVED}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _clean_env():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_pipeline_by_id_imports_no_torch_or_transformers(served):
    assert served["modules"] == [], f"imported at serve time: {served['modules']}"


@pytest.mark.parametrize("layout,task", SERVED, ids=[f"{layout}-{task}" for layout, task in SERVED])
def test_pipeline_by_id_equals_transformers(served, layout, task):
    result = served["results"][_repo_id(layout, task)]
    assert result["ok"], result["value"]
    assert_results_close(result["value"], _transformers_result(task), atol=1e-4, where=f"{layout}/{task}")


def test_optimum_and_transformers_js_repos_are_imported_into_real_folders(served, hub):
    from pathlib import Path

    for layout in ("optimum", "transformers-js"):
        folder = Path(served["results"][_repo_id(layout, "text2text-generation")]["path"])
        manifest = _manifest(folder)
        assert manifest["source"]["layout"] == ("optimum" if layout == "optimum" else "transformers.js")
        assert manifest["source"]["hub"]["repo_id"] == _repo_id(layout, "text2text-generation")
        assert not any(p.is_symlink() for p in folder.rglob("*")), "a model folder holds its own files"
    js = hub.served(_repo_id("transformers-js", "text2text-generation"))
    assert "onnx/decoder_model.onnx" in js and not any("merged" in n or "quantized" in n for n in js), \
        f"downloads only what fp32 needs: {js}"


_REFERENCE: dict = {}


def _transformers_result(task: str):
    """transformers' pipeline on the checkpoint the repos were made from, called as the subprocess called ours."""
    if task not in _REFERENCE:
        arch, export_task, call = CASES[task]
        checkpoint = tiny_checkpoint(arch, export_task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if task in ("text-classification", "token-classification", "question-answering", "fill-mask"):
                p = reference_pipeline(task, checkpoint)
            else:
                p = transformers.pipeline(task, model=str(checkpoint))
            _REFERENCE[task] = json.loads(json.dumps(eval(call), default=float))
    return _REFERENCE[task]


def test_quantized_transformers_js_file_is_the_int8_precision(online):
    seen = len(online.requests)
    p = onnxpipe.pipeline("text-classification", model=_repo_id("transformers-js", "text-classification"),
                          precision="int8")
    assert p.model.manifest["files"]["model"]["int8"]["path"] == "onnx/model_quantized.onnx"
    assert list(p.model.manifest["files"]["model"]) == ["int8"]
    ours, ref = p("I love this movie."), _transformers_result("text-classification")
    assert ours[0]["label"] in ("NEGATIVE", "POSITIVE") and abs(ours[0]["score"] - ref[0]["score"]) < 0.05
    assert "onnx/model.onnx" not in online.served(_repo_id("transformers-js", "text-classification"), since=seen)


# --- export from a Hub id ------------------------------------------------------------------------------------------

def test_export_from_id_and_revision_downloads_only_what_the_export_needs(online, tmp_path):
    from onnxpipe.cli import main
    from onnxpipe.export import export_model

    seen = len(online.requests)
    main_out = export_model(CHECKPOINT_REPO, tmp_path / "main", "text-classification", quantize=None)
    manifest = _manifest(main_out)
    assert manifest["validation"]["passed"] is True
    assert manifest["source"]["hub"] == {"repo_id": CHECKPOINT_REPO, "revision": "main",
                                         "commit": online.repos[CHECKPOINT_REPO]["refs"]["main"]}
    assert manifest["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"}
    assert "model.safetensors" in online.served(CHECKPOINT_REPO, since=seen)
    not_needed = {"pytorch_model.bin", "flax_model.msgpack", "README.md"}
    assert not not_needed & set(online.served(CHECKPOINT_REPO, since=seen))

    assert main(["export", CHECKPOINT_REPO, "--revision", "v1", "--task", "sentiment-analysis",
                 "--out", str(tmp_path / "v1")]) == 0
    manifest = _manifest(tmp_path / "v1")
    assert manifest["id2label"] == {"0": "SAD", "1": "HAPPY"}
    assert manifest["source"]["hub"]["revision"] == "v1"
    assert onnxpipe.pipeline(model=tmp_path / "v1")("great")[0]["label"] in ("SAD", "HAPPY")


def test_export_from_id_offline_uses_the_cache_and_says_when_it_is_empty(online, tmp_path, monkeypatch):
    from onnxpipe.export import export_model
    from onnxpipe.hub import download_checkpoint

    _go_offline(monkeypatch)
    seen = len(online.requests)
    _one_line_error(lambda: export_model(CHECKPOINT_REPO, tmp_path / "m", "text-classification"),
                    f"'{CHECKPOINT_REPO}' at revision 'main'", "HF_HUB_OFFLINE")
    assert len(online.requests) == seen and not (tmp_path / "m").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder, source = download_checkpoint(CHECKPOINT_REPO)
    _go_offline(monkeypatch)
    seen = len(online.requests)
    assert download_checkpoint(CHECKPOINT_REPO) == (folder, source)  # from the cache, no request
    assert len(online.requests) == seen


def test_export_refuses_a_checkpoints_own_code_unless_asked(online, tmp_path):
    from onnxpipe.export import export_model

    checkpoint = tiny_checkpoint("bert", "text-classification")
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file() and not p.name.startswith(".")}
    online.add("test-org/remote-code", {**files, "config.json": json.dumps(config).encode(),
                                        "modeling_custom.py": b"raise SystemExit('never run')\n"})
    _one_line_error(lambda: export_model("test-org/remote-code", tmp_path / "m", "text-classification"),
                    "'test-org/remote-code' at revision 'main'", "--trust-remote-code", "modeling_custom.py")
    assert "model.safetensors" not in online.served("test-org/remote-code")


# --- failures: one line naming the repo and the revision -----------------------------------------------------------

def test_private_repo_is_a_401_that_names_the_token_variable(online, monkeypatch, tmp_path):
    from onnxpipe.export import export_model

    online.add("test-org/private", tiny_export("bert", "text-classification"), token="hf_secret")
    for call in (lambda: onnxpipe.pipeline(model="test-org/private"),
                 lambda: export_model("test-org/private", tmp_path / "m", "text-classification")):
        _one_line_error(call, "'test-org/private' at revision 'main'", "401", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert onnxpipe.pipeline(model="test-org/private")("fine")[0]["label"] in ("NEGATIVE", "POSITIVE")


def test_gated_repo_with_a_token_that_may_not_read_it_is_a_403(online, monkeypatch):
    online.add("test-org/gated", tiny_export("bert", "text-classification"), token="hf_granted", gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    _one_line_error(lambda: onnxpipe.pipeline(model="test-org/gated"), "'test-org/gated' at revision 'main'", "403",
                    "HF_TOKEN")


def test_unknown_repo_or_revision_is_a_404(online, tmp_path):
    from onnxpipe.export import export_model

    _one_line_error(lambda: onnxpipe.pipeline(model="test-org/no-such-model"),
                    "'test-org/no-such-model' at revision 'main'", "404")
    _one_line_error(lambda: export_model(CHECKPOINT_REPO, tmp_path / "m", revision="v9"),
                    f"'{CHECKPOINT_REPO}' at revision 'v9'", "404")
    _one_line_error(lambda: onnxpipe.pipeline(model=_repo_id("onnxpipe", "fill-mask"), revision="v9"),
                    f"'{_repo_id('onnxpipe', 'fill-mask')}' at revision 'v9'", "404", "no revision")


def test_repo_with_no_usable_files_says_what_it_needs(online):
    online.add("test-org/readme-only", {"README.md": b"# nothing here", "notes.txt": b"x"})
    _one_line_error(lambda: onnxpipe.pipeline(model="test-org/readme-only"),
                    "'test-org/readme-only' at revision 'main'", "no usable files", "README.md")


def test_pytorch_checkpoint_without_the_export_extra_says_what_to_install(online, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    _one_line_error(lambda: onnxpipe.pipeline("text-classification", model=CHECKPOINT_REPO),
                    f"'{CHECKPOINT_REPO}' at revision 'main'", "onnxpipe[export]", "onnxpipe export")


def test_offline_loads_what_was_cached_and_asks_nothing(online, monkeypatch):
    repo = _repo_id("optimum", "question-answering")
    _go_offline(monkeypatch)
    _one_line_error(lambda: onnxpipe.pipeline(model=repo), f"'{repo}' at revision 'main'", "HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    first = onnxpipe.pipeline(model=repo)
    _go_offline(monkeypatch)
    seen = len(online.requests)
    again = onnxpipe.pipeline(model=repo)
    assert len(online.requests) == seen and again.model.path == first.model.path


def test_unreachable_hub_falls_back_to_the_cache_or_says_so(online, monkeypatch):
    repo = _repo_id("transformers-js", "token-classification")
    first = onnxpipe.pipeline(model=repo)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert onnxpipe.pipeline(model=repo).model.path == first.model.path
    _one_line_error(lambda: onnxpipe.pipeline(model=_repo_id("transformers-js", "fill-mask")),
                    f"'{_repo_id('transformers-js', 'fill-mask')}' at revision 'main'", "cannot be reached")


def test_cut_download_leaves_nothing_half_written(online, tmp_path):
    from pathlib import Path

    repo = "test-org/cut"
    online.add(repo, transformers_js_repo("bert", "fill-mask"))
    online.cut.add((repo, "onnx/model.onnx"))
    _one_line_error(lambda: onnxpipe.pipeline(model=repo), f"'{repo}' at revision 'main'", "onnx/model.onnx",
                    "cut off")
    hf_repo = Path(tmp_path / "hf-cache" / "models--test-org--cut")
    assert not list(hf_repo.rglob("*.incomplete"))
    assert not list(hf_repo.glob("snapshots/*/onnx/model.onnx"))
    assert not list((tmp_path / "onnxpipe-hub").rglob("onnxpipe.json"))
    online.cut.clear()
    assert onnxpipe.pipeline(model=repo)("John lives in [MASK].")


def test_cut_checkpoint_download_fails_the_export_and_keeps_nothing(online, tmp_path):
    from pathlib import Path

    from onnxpipe.export import export_model

    repo = "test-org/cut-checkpoint"
    online.add(repo, tiny_checkpoint("bert", "fill-mask"))
    online.cut.add((repo, "model.safetensors"))
    _one_line_error(lambda: export_model(repo, tmp_path / "m", "fill-mask"), f"'{repo}' at revision 'main'",
                    "model.safetensors", "cut off")
    hf_repo = Path(tmp_path / "hf-cache" / "models--test-org--cut-checkpoint")
    assert not list(hf_repo.rglob("*.incomplete")) and not list(hf_repo.glob("snapshots/*/model.safetensors"))
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- onnxpipe import ID, serve --model ID --------------------------------------------------------------------------

def test_import_cli_takes_a_hub_id(online, tmp_path):
    from onnxpipe.cli import main

    repo = _repo_id("transformers-js", "question-answering")
    assert main(["import", repo, "--out", str(tmp_path / "qa")]) == 0
    manifest = _manifest(tmp_path / "qa")
    assert sorted(manifest["files"]["model"]) == ["fp32", "int8"]
    assert manifest["source"]["hub"]["repo_id"] == repo
    ours = onnxpipe.pipeline(model=tmp_path / "qa")(question="Where does John live?", context="John lives in Paris.")
    assert_results_close(ours, _transformers_result("question-answering"))


def test_serve_command_resolves_hub_ids_before_the_server_starts(online, monkeypatch):
    """`onnxpipe serve` and Python's serve() alike: the app is made from local folders."""
    import onnxpipe.server.app
    from onnxpipe.cli import main

    class Started(Exception):
        pass

    started = {}

    def create_app(models, config):
        started.update(models=models)
        raise Started

    monkeypatch.setattr(onnxpipe.server.app, "create_app", create_app)
    repo = _repo_id("transformers-js", "text-classification")
    with pytest.raises(Started):
        main(["serve", "--model", repo, "--port", "0"])
    name, _, folder = started["models"][0].partition("=")
    assert name == "transformers-js-text-classification"
    assert onnxpipe.read_manifest(folder)["source"]["hub"]["repo_id"] == repo


def test_serve_specs_turn_hub_ids_into_named_folders(online, tmp_path):
    from onnxpipe.hub import resolve_serve_specs
    from onnxpipe.server.pool import parse_model_specs

    folder = tiny_export("bert", "fill-mask")
    repo = _repo_id("optimum", "feature-extraction")
    specs = resolve_serve_specs([repo, f"emb={repo}@sentence-similarity", str(folder)])
    assert specs[2] == str(folder)
    parsed = parse_model_specs(specs)
    assert set(parsed) == {"optimum-feature-extraction", "emb", folder.name}
    assert parsed["emb"].task == "sentence-similarity"


# --- transformers' defaults for tasks without a built-in one -------------------------------------------------------

def test_task_without_builtin_default_uses_transformers_default_as_its_onnx_export(online):
    default = REGISTRY.transformers_defaults["question-answering"]
    assert default.model == "distilbert/distilbert-base-cased-distilled-squad" and default.revision == "564e9b5"
    online.add(default.onnx_model, transformers_js_repo("bert", "question-answering"), revision=default.onnx_revision)
    qa = onnxpipe.pipeline("question-answering")
    assert qa.model.manifest["source"]["hub"]["repo_id"] == default.onnx_model
    assert_results_close(qa(question="Where does John live?", context="John lives in Paris."),
                         _transformers_result("question-answering"))


def test_transformers_defaults_setting_exports_a_checkpoint_default_on_first_use(online, monkeypatch):
    default = REGISTRY.transformers_defaults["token-classification"]
    assert default.onnx_model is None
    online.add(default.model, tiny_checkpoint("bert", "token-classification"), revision=default.revision)
    monkeypatch.setenv("ONNXPIPE_DEFAULTS", "transformers")
    ner = onnxpipe.pipeline("ner")
    assert ner.model.manifest["source"]["hub"] == {"repo_id": default.model, "revision": default.revision,
                                                   "commit": online.repos[default.model]["refs"][default.revision]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_pipeline("token-classification", tiny_checkpoint("bert", "token-classification"))
    assert_results_close(ner("John lives in Paris."), json.loads(json.dumps(ref("John lives in Paris."),
                                                                            default=float)))


def test_unreachable_hub_extends_the_no_default_error_with_what_would_work(online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    message = _one_line_error(lambda: onnxpipe.pipeline("fill-mask"), REGISTRY.no_default["fill-mask"],
                              "onnxpipe export", "distilbert/distilroberta-base", "cannot be reached")
    assert "fb53ab8" in message
