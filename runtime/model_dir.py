"""A loaded model folder: its manifest, tokenizer and ONNX sessions. Serve time: onnxruntime + tokenizers + numpy."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .manifest_checks import check_manifest, check_no_escaping_links
from .session import Session, SessionConfig
from .tokenizer import Tokenizer

MANIFEST_NAME = "onnxpipe.json"
SUPPORTED_FORMAT = 1
PRECISIONS = ("fp32", "int8", "int4", "fp16")
# How each precision's files are made, for the message when a folder lacks them
_EXPORT_FLAG = {"int8": "--quantize int8", "int4": "--quantize int4", "fp16": "--dtype fp16"}


class ModelDir:
    """The exported folder, read once: `manifest`, `tokenizer`, and `session(role)` created on demand.

    >>> m = ModelDir("models/sst2")           # doctest: +SKIP
    >>> m.session().run({"input_ids": ...})    # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", session_config: SessionConfig | None = None,
                 device=None, intra_op_num_threads: int | None = None, inter_op_num_threads: int | None = None,
                 session_options=None, session_cache=None):
        """session_config, or the separate options it is built from once (see SessionConfig)."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported: use one of {', '.join(PRECISIONS)}")
        missing = [role for role, files in self.manifest["files"].items() if precision not in files]
        if missing:
            have = sorted({p for files in self.manifest["files"].values() for p in files})
            if self.manifest.get("source", {}).get("imported_from"):
                # a ready-made ONNX export: its publisher chose the precisions; onnxpipe cannot quantize it again
                how = (f"the ONNX export it was imported from has only {', '.join(have)} (an export of the "
                       f"checkpoint with onnxpipe export {_EXPORT_FLAG.get(precision, precision)} would have it)")
            else:
                how = f"export it with {_EXPORT_FLAG.get(precision, precision)}"
            raise ValueError(f"model dir '{self.path}' has no {precision} file for {', '.join(missing)}: {how}, "
                             f"or use precision='{'fp32' if 'fp32' in have else have[0]}'")
        self.precision = precision
        self.session_config = SessionConfig.of(session_config, device=device, intra_op_num_threads=intra_op_num_threads,
                                               inter_op_num_threads=inter_op_num_threads,
                                               session_options=session_options, session_cache=session_cache)
        self.tokenizer = Tokenizer(self.path / (self.manifest["tokenizer"].get("file") or "tokenizer.json"),
                                   self.manifest["tokenizer"])
        self._sessions: dict[str, Session] = {}

    @property
    def device(self) -> str:
        """The device that runs the model ('cpu' or 'cuda'), read from its session (created now if need be): after
        a CUDA fallback it is 'cpu', whatever was asked for (`session_config.device`)."""
        return self.session(self.roles[0]).device

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def roles(self) -> list[str]:
        return list(self.manifest["files"])

    def session(self, role: str = "model") -> Session:
        if role not in self._sessions:
            entry = self.manifest["files"].get(role)
            if entry is None:
                raise ValueError(f"model dir '{self.path}' has no '{role}' graph (it has: {', '.join(self.roles)})")
            optimization = self.manifest.get("optimization") or {}
            session = Session(self.path / entry[self.precision]["path"], self.session_config,
                              disabled_optimizers=tuple(optimization.get("runtime_disabled_optimizers") or ()))
            fused = (optimization.get("fused_ops") or {}).get("GroupQueryAttention")
            if session.device == "cuda" and fused and self.precision != "fp16":
                Session._warn_once(f"onnxpipe: {self.path.name} was exported with --attention gqa (com.microsoft "
                                   "GroupQueryAttention, the fastest on CPU), which ONNX Runtime's CUDA provider runs in "
                                   "float16 only: its attention nodes run on the CPU, with copies of the KV cache every "
                                   "step; for CUDA serving use precision='fp16' (export with --dtype fp16) or export "
                                   "with --attention onnx", stacklevel=3)
            if session.device == "cpu" and self.precision == "fp16":
                Session._warn_once(fp16_on_cpu_message(self.path, self.manifest), stacklevel=3)
            self._sessions[role] = session
        return self._sessions[role]

    def __repr__(self) -> str:
        return (f"ModelDir({str(self.path)!r}, task={self.task!r}, precision={self.precision!r}, "
                f"device={self.session_config.device!r})")


def fp16_on_cpu_message(path: Path, manifest: dict) -> str:
    """The warning for an fp16 graph run by the CPU provider (asked for, or after a CUDA fallback). It runs (ONNX
    Runtime casts to float32 around the ops without a float16 kernel), so it is not refused, but it gains nothing:
    MiniLM-L6 b1 L128 on one thread here was 2-5% slower than fp32, with fp16's rounding (README "fp16 and CUDA")."""
    ops = (manifest.get("fp16") or {}).get("not_run_in_float16") or []
    which = f" ({', '.join(ops)} in this model)" if ops else ""
    return (f"onnxpipe: precision='fp16' on CPU: ONNX Runtime's CPU provider has no float16 kernel for most compute "
            f"ops{which}; it casts around them and computes in float32, so {path.name}'s fp16 graph runs no faster "
            "than its fp32 one, with float16's rounding. fp16 is for device='cuda'; on CPU use precision='fp32' or "
            "'int8'")


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model dir '{path}' does not exist: export a checkpoint with `onnxpipe export CHECKPOINT "
                                f"--out {path}`")
    if not path.is_dir():
        raise ValueError(f"model '{path}' is not a folder: pass the folder written by `onnxpipe export`")
    mpath = path / MANIFEST_NAME
    if not mpath.exists():
        raise ValueError(f"model dir '{path}' has no {MANIFEST_NAME}: export it first with onnxpipe export")
    check_no_escaping_links(path)  # before reading anything of it, the manifest included
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"model dir '{path}' has an unreadable {MANIFEST_NAME} ({type(e).__name__}: "
                         f"{str(e)[:200]}): export it again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"model dir '{path}': {MANIFEST_NAME} must be a JSON object, not {type(manifest).__name__}: "
                         "export it again")
    version = manifest.get("format_version")
    if version != SUPPORTED_FORMAT or isinstance(version, bool):
        raise ValueError(f"model dir '{path}' has manifest format {version!r}; this onnxpipe reads format "
                         f"{SUPPORTED_FORMAT}: export it again with this version")
    check_manifest(manifest, path)  # field types, and every named file inside the folder
    for role, files in manifest["files"].items():
        for precision, entry in files.items():
            for name in (entry["path"], (entry.get("external_data") or {}).get("path")):
                if name and not (path / name).exists():
                    raise ValueError(f"model dir '{path}' is incomplete: {name} ({role}, {precision}) is missing; "
                                     "export it again")
    return manifest
