"""The `onnxpipe` command: export, import, run, models, build, serve, batch."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .task_table import EXPORT_TASKS, task_names

    parser = argparse.ArgumentParser(prog="onnxpipe", description="Transformers tasks on ONNX Runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="export a transformers checkpoint to a verified onnxpipe model folder")
    ex.add_argument("checkpoint", help="folder with config.json, weights and tokenizer files (or one .gguf file), or a "
                    "Hugging Face Hub id ORG/NAME (downloaded with huggingface_hub: HF_TOKEN, HF_HUB_CACHE, "
                    "HF_HUB_OFFLINE, HF_ENDPOINT apply)")
    ex.add_argument("--revision", default=None, help="Hub id only: branch, tag or commit (default: main)")
    ex.add_argument("--trust-remote-code", action="store_true",
                    help="let transformers run the checkpoint's own model code (refused otherwise)")
    ex.add_argument("--task", default="auto", help=f"{', '.join(EXPORT_TASKS)} (or a pipeline task or alias that "
                    "runs on one of them), or auto (default: from the checkpoint's architectures)")
    ex.add_argument("--out", required=True, help="model folder to write")
    ex.add_argument("--quantize", default=None, metavar="int8|int4|int8,int4",
                    help="also write quantized files beside fp32: int8 (dynamic, *.int8.onnx) and/or int4 "
                         "(weight-only MatMulNBits blocks, *.int4.onnx; see --int4-method)")
    ex.add_argument("--weight-type", choices=["quint8", "qint8"], default="qint8",
                    help="int8 weight type (default qint8: with per-channel scales as faithful as quint8 here, and faster)")
    ex.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                    help="per-channel int8 weight scales (default on: much closer to fp32 than per-tensor)")
    ex.add_argument("--reduce-range", action="store_true", help="7-bit weights (avoids saturation on non-VNNI CPUs)")
    ex.add_argument("--int8-method", choices=["auto", "dynamic", "weight-only"], default="auto",
                    help="int8 as dynamic quantization (weights int8, activations quantized per call) or weight-only "
                         "8-bit blocks (MatMulNBits); auto (default): weight-only for text-generation, dynamic elsewhere")
    ex.add_argument("--int4-method", choices=["asymmetric", "symmetric"], default="asymmetric",
                    help="int4 blocks: asymmetric (default: a float offset per block of 32, as llama.cpp's Q4_1; "
                         "faithful) or symmetric (MatMulNBits' own: fewer kernel calls, faster decode on small "
                         "models, less faithful); the LM head is 8-bit either way")
    ex.add_argument("--optimize", action="store_true",
                    help="fuse the graph: ONNX Runtime's transformer fusions (encoders), and for Llama-family decoders "
                         "fused norms, attention and RoPE (see --attention)")
    ex.add_argument("--attention", choices=["gqa", "onnx"], default="gqa",
                    help="decoders with --optimize: com.microsoft GroupQueryAttention (fastest on CPU; its CUDA kernel "
                         "is float16-only) or ONNX Attention + RotaryEmbedding, opset 23 (for CUDA serving)")
    ex.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                    help="fp16: also write *.fp16.onnx (float16 weights and activations, float16 KV cache) beside the "
                         "fp32 files, checked against torch fp32; for CUDA serving (pipeline(..., precision='fp16'))")
    ex.add_argument("--opset", type=int, default=None)
    ex.add_argument("--atol", type=float, default=1e-4, help="validation: absolute tolerance (default 1e-4)")
    ex.add_argument("--rtol", type=float, default=1e-4, help="validation: tolerance relative to the output's max |value|")
    ex.add_argument("--no-validate", action="store_true", help="skip the comparison with torch (not recommended)")

    run = sub.add_parser("run", help="run a task on texts and print JSON")
    run.add_argument("task", help=", ".join(task_names()))
    run.add_argument("texts", nargs="+")
    run.add_argument("--model", default=None, help="model folder or Hub id ORG/NAME (default: the task's default)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4", "fp16"])
    run.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="pipeline option, value parsed as JSON when it can be (e.g. -o top_k=3)")

    im = sub.add_parser("import", help="make a ready-made ONNX export (Optimum's or transformers.js's layout) an "
                        "onnxpipe model folder, without torch")
    im.add_argument("source", help="folder holding config.json, tokenizer.json and model.onnx (or onnx/model*.onnx), "
                    "or a Hugging Face Hub id ORG/NAME of such a repo")
    im.add_argument("--out", required=True, help="model folder to write (the source folder itself: only its "
                    "onnxpipe.json is written)")
    im.add_argument("--task", default=None, help="the task, where the graph alone cannot tell (default: from the graph "
                    "and config.json's architectures)")
    im.add_argument("--precision", default=None, metavar="fp32,int8,int4",
                    help="the precisions to take (default: all the export has; int8 is model_quantized.onnx)")
    im.add_argument("--revision", default=None, help="Hub id only: branch, tag or commit (default: main)")

    sub.add_parser("models", help="list the built-in default models")
    bd = sub.add_parser("build", help="build built-in default models")
    bd.add_argument("names", nargs="*", help="default model names or tasks (default: all)")

    sv = sub.add_parser("serve", help="serve model folders over HTTP")
    sv.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR[@TASK]",
                    help="model folder to serve (repeatable), or a Hub id ORG/NAME (fetched as pipeline(model=...) "
                         "fetches it); its name defaults to the folder's (the repo's) name, its task to the manifest's "
                         "(@sentence-similarity serves a feature-extraction export's embeddings)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    sv.add_argument("--ray", action="store_true", help="serve on Ray Serve (the `ray` extra): the same HTTP API from "
                    "replicas that may sit on several nodes; every node needs the model folders at the same path")
    sv.add_argument("--address", default=None, help="--ray: the Ray cluster to join (auto, HOST:PORT or ray://...; "
                    "default: a Ray started here for this server)")
    sv.add_argument("--replicas", type=int, default=1, help="--ray: replicas of the app (default 1)")
    sv.add_argument("--cpus-per-replica", type=float, default=1, help="--ray: CPUs per replica, also its ONNX Runtime "
                    "threads unless --threads is given (default 1)")
    sv.add_argument("--print-config", action="store_true", help="--ray: print the Serve config file (for `serve "
                    "deploy` or a KubeRay RayService's serveConfigV2) instead of serving")
    _server_options(sv)

    bt = sub.add_parser("batch", help="label every row of a JSONL, CSV or Parquet file into a new file (with an "
                        "`output` and an `error` column), in this process or on Ray")
    bt.add_argument("model", help="model folder")
    bt.add_argument("input", help="input file: .jsonl, .csv or .parquet")
    bt.add_argument("output", help="output file (any of those; written only when complete)")
    bt.add_argument("--column", default="text", help="the column holding each row's input (default: text)")
    bt.add_argument("--task", default=None, help="the pipeline (default: the model's task)")
    bt.add_argument("--precision", default="fp32", help="fp32, int8, int4 or fp16 (the export's files)")
    bt.add_argument("--device", default=None)
    bt.add_argument("--batch-size", type=int, default=64, help="rows per pipeline call (default 64)")
    bt.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline option, value parsed as JSON when it can be (e.g. -o top_k=2)")
    bt.add_argument("--ray-address", default=None, help="label on Ray Data actors: `local` (a Ray started for the job), "
                    "auto, HOST:PORT or ray://...; default: this process")
    bt.add_argument("--actors", type=int, default=2, help="--ray-address: labelling actors (default 2)")
    bt.add_argument("--cpus-per-actor", type=float, default=1, help="--ray-address: CPUs (and ONNX Runtime threads) "
                    "per actor (default 1)")
    bt.add_argument("--quiet", action="store_true", help="no progress line")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return {"export": _export, "import": _import, "run": _run, "models": _models, "build": _build,
                "serve": _serve, "batch": _batch}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"onnxpipe {args.command}: error: {e}", file=sys.stderr)
        return 2


def _export(args) -> int:
    try:
        from onnxpipe.export import export_model
    except ImportError as e:
        raise ValueError(f"export needs the export extra ({e.name} is missing): pip install 'onnxpipe[export]'") from None
    out = export_model(args.checkpoint, args.out, args.task, revision=args.revision,
                       trust_remote_code=args.trust_remote_code, quantize=args.quantize, weight_type=args.weight_type,
                       per_channel=args.per_channel, reduce_range=args.reduce_range, int8_method=args.int8_method,
                       int4_method=args.int4_method,
                       optimize=args.optimize, attention=args.attention, dtype=args.dtype,
                       opset=args.opset, atol=args.atol, rtol=args.rtol, validate=not args.no_validate)
    manifest = json.loads((out / "onnxpipe.json").read_text())
    v = manifest["validation"]
    worst = max((r["max_abs_diff"] for r in v["results"]), default=0.0)
    print(f"exported {manifest['task']} ({manifest['architecture']}) to {out}: validation "
          f"{'passed' if v['passed'] else 'skipped'} (max abs diff {worst:.2g})")
    return 0


def _import(args) -> int:
    from pathlib import Path

    from onnxpipe.hub import import_repo, is_repo_id
    from onnxpipe.onnx_import import import_onnx_folder

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()] if args.precision else None
    if is_repo_id(args.source):
        out = import_repo(args.source, args.out, task=args.task, precisions=precisions, revision=args.revision)
    else:
        out = import_onnx_folder(Path(args.source), args.out, task=args.task, precisions=precisions)
    manifest = json.loads((Path(out) / "onnxpipe.json").read_text())
    precisions = ", ".join(next(iter(manifest["files"].values())))
    print(f"imported {manifest['task']} ({manifest['architecture']}; {precisions}) to {out}")
    return 0


def _parse_options(pairs):
    opts = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--option {pair!r} must be KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    return opts


def _run(args) -> int:
    from onnxpipe import pipeline

    pipe = pipeline(args.task, model=args.model, device=args.device, precision=args.precision)
    opts = _parse_options(args.option)
    inputs = args.texts if len(args.texts) > 1 else args.texts[0]
    from onnxpipe.results_json import result_json

    print(result_json(pipe(inputs, **opts), indent=2))
    return 0


def _models(args) -> int:
    from onnxpipe.models import list_models_table

    print(list_models_table())
    return 0


def _build(args) -> int:
    from onnxpipe.models import build_defaults

    build_defaults(args.names or None)
    return 0


def _server_options(parser) -> None:
    """`serve`'s settings, from ServerConfig's fields (their defaults and help live there, once)."""
    import dataclasses
    import typing

    from onnxpipe.server.config import ServerConfig

    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        if meta.get("kind") == "append":
            parser.add_argument(meta["flag"], dest=f.name, action="append", default=[], help=meta["help"])
            continue
        kind = next(t for t in (int, float, str) if t in typing.get_args(hints[f.name]) or hints[f.name] is t)
        parser.add_argument(meta["flag"], dest=f.name, type=kind, default=f.default,
                            help=f"{meta['help']} (default: {f.default})")


def _serve(args) -> int:
    import dataclasses

    try:
        from onnxpipe.server import serve
        from onnxpipe.server.config import ServerConfig
    except ImportError as e:
        raise ValueError(f"serve needs the server extra ({e.name} is missing): pip install 'onnxpipe[server]'") from None
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    if args.ray:
        return _serve_on_ray(args, options)
    serve(args.model, host=args.host, port=args.port, access_log=args.access_log, **options)
    return 0


def _serve_on_ray(args, options: dict) -> int:
    import dataclasses

    from onnxpipe.server.config import ServerConfig

    try:
        from onnxpipe import ray as onnxpipe_ray

        onnxpipe_ray.deployment  # noqa: B018 - imports Ray: a clear message now if it is missing
    except ImportError as e:
        raise ValueError(str(e)) from None
    # only the settings given on the command line travel: a Serve config file stays short and readable
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    changed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v != defaults[k]
               and not (k == "allowed_origins" and not v)}
    deployment_args = {"num_cpus": args.cpus_per_replica, **changed}
    if args.print_config:
        print(onnxpipe_ray.serve_config(args.model, host=args.host, port=args.port, num_replicas=args.replicas,
                                        **deployment_args), end="")
        return 0
    onnxpipe_ray.run_server(args.model, host=args.host, port=args.port, address=args.address,
                            replicas=args.replicas, **deployment_args)
    return 0


def _batch(args) -> int:
    from onnxpipe.batch_job import run_batch

    counts = run_batch(args.model, args.input, args.output, args.column, task=args.task, precision=args.precision,
                       device=args.device, batch_size=args.batch_size, parameters=_parse_options(args.option),
                       ray_address=args.ray_address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                       progress=not args.quiet)
    print(f"{args.output}: {counts['rows']} rows, {counts['labelled']} labelled, {counts['errors']} with an error "
          f"(see its `error` column), in {counts['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
