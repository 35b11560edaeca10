"""Serve time is onnxruntime + tokenizers + numpy: every pipeline runs in a fresh interpreter without torch,
transformers, optimum or onnx ever being imported, and `import onnxpipe` stays quick."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from onnxpipe.task_table import SUPPORTED_TASKS

# exact names: onnxruntime is the point. Ray (and pyarrow, which it brings) only when onnxpipe.ray's API is used.
FORBIDDEN = ("torch", "transformers", "optimum", "onnx", "ray", "pyarrow")
# task -> (tiny architecture, the export task its model dir is built for)
TINY_MODEL = {
    "text-classification": ("bert", "text-classification"),
    "token-classification": ("bert", "token-classification"),
    "question-answering": ("bert", "question-answering"),
    "fill-mask": ("bert", "fill-mask"),
    "feature-extraction": ("bert", "feature-extraction"),
    "sentence-similarity": ("bert", "feature-extraction"),
    "text-generation": ("gpt2", "text-generation"),
    "text2text-generation": ("t5", "text2text-generation"),
    "summarization": ("bart", "text2text-generation"),
    "translation": ("t5", "text2text-generation"),
}
# Runs in the fresh interpreter: every pipeline once, then what sys.modules holds.
SCRIPT = r"""
import json, sys
import onnxpipe

dirs = json.loads(sys.argv[1])
calls = {
    "text-classification": lambda p: p("I love this."),
    "token-classification": lambda p: p("John lives in Paris."),
    "question-answering": lambda p: p(question="Where does John live?", context="John lives in Paris."),
    "fill-mask": lambda p: p(f"John lives in {p.tokenizer.mask_token}."),
    "feature-extraction": lambda p: p("John lives in Paris."),
    "sentence-similarity": lambda p: p(["John lives in Paris.", "Paris is big."]).tolist(),
    "text-generation": lambda p: p("Hello", max_new_tokens=3),
    "text2text-generation": lambda p: p("Hello", max_new_tokens=3),
    "summarization": lambda p: p("Hello there, this is a long text.", max_new_tokens=3),
    "translation": lambda p: p("Hello", max_new_tokens=3),
}
report = {"results": {}}
for task, path in dirs.items():
    try:
        out = calls[task](onnxpipe.pipeline(task, model=path))
        report["results"][task] = {"ok": bool(out), "repr": repr(out)[:200]}
    except Exception as e:
        report["results"][task] = {"ok": False, "repr": f"{type(e).__name__}: {e}"[:500]}
import onnxpipe.batch_job, onnxpipe.ray  # the single-process batch job and the Ray package's face import no Ray
report["modules"] = sorted(m for m in sys.modules if m in %r)
print(json.dumps(report))
""" % (FORBIDDEN,)
IMPORT_TIME = ("import time; t = time.perf_counter(); import onnxpipe; "
               "print(time.perf_counter() - t)")


def _module_written(task: str) -> bool:
    return importlib.util.find_spec(f"onnxpipe.tasks.{SUPPORTED_TASKS[task].module}") is not None


@pytest.fixture(scope="module")
def serve_run(tiny):
    """Export (in this process, with torch) a tiny model per written task, then run them all in a fresh one."""
    dirs = {task: str(tiny.export(*TINY_MODEL[task])) for task in SUPPORTED_TASKS if _module_written(task)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(dirs)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_task_has_a_tiny_model():
    assert set(TINY_MODEL) == set(SUPPORTED_TASKS)


@pytest.mark.parametrize("task", sorted(SUPPORTED_TASKS))
def test_pipeline_runs_without_torch(serve_run, task):
    if not _module_written(task):
        pytest.skip(f"onnxpipe.tasks.{SUPPORTED_TASKS[task].module} (for {task}) is not written yet")
    result = serve_run["results"][task]
    assert result["ok"], result["repr"]


def test_no_heavy_package_was_imported(serve_run):
    assert serve_run["modules"] == [], f"imported at serve time: {serve_run['modules']}"


def test_import_onnxpipe_is_quick():
    # The best of three fresh interpreters: the machine is shared, so one run can be slowed by others.
    times = [float(subprocess.run([sys.executable, "-c", IMPORT_TIME], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(3)]
    print(f"import onnxpipe: {min(times):.3f} s (best of {', '.join(f'{t:.3f}' for t in times)})")
    assert min(times) < 1.0
