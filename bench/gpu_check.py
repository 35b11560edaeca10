"""`make gpu-check`: the CUDA half in one command on a fresh GPU machine with no network (issue 23).

That machine's Python (3.12) has a CUDA torch and transformers 5.x but no onnxruntime-gpu and no optimum, so:

    make gpu-wheels   # here, with a network: wheels into .cache/gpu-wheels, tiny fp16 exports into .cache/gpu-check
    make gpu-check    # there: python3 -m bench.gpu_check

It (1) fails at once, saying so, without a GPU; (2) installs onnxruntime-gpu, pytest, onnx and onnxpipe from the
carried wheels only (--no-index); (3) runs the `cuda`-marked tests on the carried tiny fp16 exports (CUDA fp16 vs
CPU fp32: labels and greedy tokens equal, scores within the manifest's tolerance); (4) times BERT-base (random
weights, built there from its config: b1 L128 and b32 L128) on ONNX Runtime's CUDA provider, fp32 and fp16,
against transformers + torch on the same GPU, and SmolLM2 greedy decode when an `--optimize --dtype fp16` export
of it is given (--smollm2 DIR: it is too large to carry here); (5) writes bench/results/gpu-<time>.json and .md.
Export needs transformers<4.58 and optimum, so models are exported on the CPU side (--prepare) and carried.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".cache" / "gpu-wheels"
MODELS = ROOT / ".cache" / "gpu-check" / "models"
RESULTS = ROOT / "bench" / "results"
# the tiny families tests/test_fp16.py exports; --prepare writes them under MODELS/<family>
FAMILIES = ("bert", "gpt2", "llama-gqa", "t5")
BERT_SHAPES = ((1, 128), (32, 128))
DECODE_TOKENS = 64


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="CPU side: export the tiny fp16 models to carry")
    ap.add_argument("--smollm2", type=Path, default=None,
                    help="an `onnxpipe export --optimize --dtype fp16` folder of SmolLM2 on the GPU machine")
    ap.add_argument("--no-install", action="store_true", help="onnxruntime-gpu and onnxpipe are installed already")
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare()
    gpu = gpu_name()
    if gpu is None:
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False and nvidia-smi lists none); run it on "
              "a GPU machine", file=sys.stderr)
        return 2
    if not args.no_install:
        install()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels torch brought, not a system install
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"gpu-check: onnxruntime {ort.__version__} has no CUDAExecutionProvider: is onnxruntime (CPU) installed "
              "beside onnxruntime-gpu?", file=sys.stderr)
        return 2
    report = {"gpu": gpu, "python": platform.python_version(), "onnxruntime": ort.__version__,
              "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    report["cuda_tests"] = run_cuda_tests()
    report["bert_base"] = time_bert_base()
    report["smollm2"] = time_smollm2(args.smollm2) if args.smollm2 else \
        {"measured": False, "why": "no SmolLM2 fp16 export on this machine (pass --smollm2 DIR)"}
    write(report)
    return 0 if report["cuda_tests"]["returncode"] == 0 else 1


def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return None


def install() -> None:
    if not WHEELS.is_dir() or not any(WHEELS.glob("onnxruntime_gpu-*.whl")):
        raise SystemExit(f"gpu-check: no onnxruntime-gpu wheel in {WHEELS}: run `make gpu-wheels` on a machine with "
                         "a network and carry .cache/ along")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS)]
    subprocess.run([*pip, "onnxruntime-gpu", "pytest", "onnx"], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)


def run_cuda_tests() -> dict:
    env = {**os.environ, "ONNXPIPE_GPU_MODELS": str(MODELS)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_fp16.py"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"command": " ".join(cmd[2:]), "returncode": out.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "summary": tail[-1] if tail else ""}


def _fp16_module():
    """export/fp16.py alone: onnxpipe.export needs optimum and transformers<4.58, which this machine lacks."""
    spec = importlib.util.spec_from_file_location("onnxpipe_fp16", ROOT / "export" / "fp16.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def time_bert_base() -> dict:
    """BERT-base sequence classification, random weights: ONNX Runtime CUDA (fp32, fp16 via export/fp16.py) and
    torch on the same GPU (fp32, fp16), median ms per call with inputs from and logits to the host."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2)).eval()
    results: dict = {"weights": "random (BertConfig defaults: 12 layers, 768 hidden)", "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        ids = torch.ones((1, 128), dtype=torch.long)
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(fp32),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask",
                                                                                  "token_type_ids")},
                          opset_version=17, dynamo=False)
        fp16_files, _ = _fp16_module().convert_fp16(Path(tmp), {"model": "model.onnx"}, "bert")
        sessions = {p: ort.InferenceSession(str(Path(tmp) / f), providers=["CUDAExecutionProvider"])
                    for p, f in (("fp32", "model.onnx"), ("fp16", fp16_files["model"]))}
        gpu = model.cuda()
        for batch, length in BERT_SHAPES:
            feeds = {"input_ids": np.random.default_rng(0).integers(1000, 20000, (batch, length)),
                     "attention_mask": np.ones((batch, length), np.int64), "token_type_ids": np.zeros((batch, length), np.int64)}
            ref = sessions["fp32"].run(None, feeds)[0]
            row = {f"onnxruntime_cuda_{p}_ms": _median_ms(lambda s=s: s.run(None, feeds)) for p, s in sessions.items()}
            row["fp16_max_abs_diff_vs_fp32"] = float(np.max(np.abs(sessions["fp16"].run(None, feeds)[0] - ref)))
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                gpu = gpu.to(dtype)

                def call(m=gpu):  # .cpu() waits for the GPU, as ORT's run does
                    with torch.inference_mode():
                        return m(**{k: v.cuda() for k, v in tensors.items()}).logits.float().cpu()
                row[f"torch_cuda_{label}_ms"] = _median_ms(call)
            gpu = gpu.float()
            results["shapes"][f"b{batch}_L{length}"] = row
    return results


def time_smollm2(folder: Path) -> dict:
    """Greedy decode of DECODE_TOKENS tokens with onnxpipe on CUDA (fp16 file) and transformers on the same GPU."""
    import onnxpipe

    prompt = "The history of the printing press begins"
    pipe = onnxpipe.pipeline("text-generation", model=str(folder), device="cuda", precision="fp16")
    kwargs = dict(max_new_tokens=DECODE_TOKENS, do_sample=False, min_new_tokens=DECODE_TOKENS)
    ours = _median_ms(lambda: pipe(prompt, **kwargs), reps=5)
    row = {"measured": True, "device": pipe.model.device, "tokens": DECODE_TOKENS, "onnxpipe_cuda_fp16_ms": ours,
           "onnxpipe_ms_per_token": ours / DECODE_TOKENS, "text": pipe(prompt, **kwargs)[0]["generated_text"]}
    source = json.loads((folder / "onnxpipe.json").read_text())["source"]["checkpoint"]
    if Path(source).is_dir():
        import torch
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(source)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float16).cuda().eval()
        ids = tok(prompt, return_tensors="pt").to("cuda")
        gen = dict(max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False)
        row["torch_cuda_fp16_ms"] = _median_ms(lambda: model.generate(**ids, **gen), reps=5)
        row["torch_text"] = tok.decode(model.generate(**ids, **gen)[0], skip_special_tokens=True)
    else:
        row["torch"] = f"not measured: the checkpoint {source} is not on this machine"
    return row


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"gpu-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# gpu-check {report['created']}", "", f"GPU: {report['gpu']}; onnxruntime {report['onnxruntime']}, "
             f"Python {report['python']}", "", f"cuda tests: {report['cuda_tests']['summary']}", "",
             "| BERT-base | ORT CUDA fp32 ms | ORT CUDA fp16 ms | torch CUDA fp32 ms | torch CUDA fp16 ms |",
             "|---|---|---|---|---|"]
    for shape, r in report["bert_base"]["shapes"].items():
        lines.append(f"| {shape} | {r['onnxruntime_cuda_fp32_ms']:.2f} | {r['onnxruntime_cuda_fp16_ms']:.2f} | "
                     f"{r['torch_cuda_fp32_ms']:.2f} | {r['torch_cuda_fp16_ms']:.2f} |")
    s = report["smollm2"]
    lines += ["", "SmolLM2 greedy decode: " + (f"onnxpipe fp16 {s['onnxpipe_cuda_fp16_ms']:.0f} ms, torch fp16 "
                                                f"{s.get('torch_cuda_fp16_ms', float('nan')):.0f} ms for {s['tokens']} tokens"
                                                if s.get("measured") else s["why"])]
    (RESULTS / f"gpu-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def prepare() -> int:
    """CPU side (the export extra): the tiny fp16 exports the cuda tests read, under MODELS/<family>."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fp16 import fp16_export  # the tests' own builder, so both sides use the same models

    MODELS.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        dest = MODELS / family
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(fp16_export(family), dest)
        print(f"prepared {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
