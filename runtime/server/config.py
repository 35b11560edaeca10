"""The server's settings: ServerConfig, each field with its default and its `onnxpipe serve` flag.

No web framework is imported here, so the CLI can build `serve --help` from these fields in any install.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _option(default, flag: str, help: str, kind=None):
    """A ServerConfig field and its `onnxpipe serve` flag, described once (cli.py builds its options from these)."""
    return field(default=default, metadata={"flag": flag, "help": help, "kind": kind})


@dataclass
class ServerConfig:
    """Every setting of a server, with its default; `onnxpipe serve --help` lists the same, from here."""

    max_batch_size: int = _option(8, "--max-batch-size", "inputs run together at most (1: no batching)")
    max_wait_ms: float = _option(5.0, "--max-wait-ms", "how long a batch waits to fill (0: no wait)")
    workers: int = _option(1, "--workers", "inference threads per model")
    max_queue: int = _option(64, "--max-queue", "requests waiting per model before 503")
    request_timeout_s: float = _option(30.0, "--timeout", "seconds a request may take before 504; its work stops then")
    max_body_bytes: int = _option(1 << 20, "--max-body-bytes", "larger request bodies get 413")
    precision: str = _option("fp32", "--precision", "fp32, int8, int4 or fp16 (the export's files)")
    device: str = _option("cpu", "--device", "cpu, cuda or cuda:N")
    intra_op_num_threads: int | None = _option(None, "--threads", "ONNX Runtime intra-op threads per session "
                                               "(default: ONNX Runtime's; capped at the CPU count)")
    retry_after_s: int = _option(1, "--retry-after", "the Retry-After header of a 503, in seconds")
    max_running: int = _option(16, "--max-running", "text-generation: sequences decoding together (continuous "
                               "batching; 0: one request at a time)")
    prefix_cache_mb: float = _option(64.0, "--prefix-cache-mb", "text-generation: KV of known prompt prefixes kept "
                                     "(a chat template's system prompt, earlier turns), MB per model (0: off)")
    # per-request budgets: a request over one gets 422 naming it
    max_inputs: int = _option(64, "--max-inputs", "inputs (list items) per request")
    max_input_tokens: int = _option(32768, "--max-input-tokens", "tokens over all the inputs of one request")
    max_new_tokens: int = _option(1024, "--max-new-tokens", "new tokens one generated sequence may ask for")
    max_num_beams: int = _option(8, "--max-beams", "num_beams of one generation request")
    max_return_sequences: int = _option(8, "--max-return-sequences", "num_return_sequences (and chat n)")
    max_generated_tokens: int = _option(16384, "--max-generated-tokens",
                                        "new tokens x sequences (inputs x max(beams, return sequences)) per request")
    # connections
    max_connections: int = _option(256, "--max-connections", "open connections at most; past it the longest-idle "
                                   "connection that has not sent a request is closed, else the new one")
    header_timeout_s: float = _option(10.0, "--header-timeout", "seconds a connection may take to send a complete "
                                      "request head before it is closed")
    keep_alive_s: float = _option(5.0, "--keep-alive", "seconds an idle keep-alive connection stays open")
    allowed_origins: tuple = _option((), "--allow-origin", "a web origin (e.g. https://app.example) whose pages may "
                                     "call this server (repeatable); other cross-origin requests get 403", kind="append")

    def __post_init__(self):
        for name in ("max_batch_size", "workers", "max_queue", "max_body_bytes", "retry_after_s", "max_inputs",
                     "max_input_tokens", "max_new_tokens", "max_num_beams", "max_return_sequences",
                     "max_generated_tokens", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_running, bool) or not isinstance(self.max_running, int) or self.max_running < 0:
            raise ValueError(f"max_running must be an integer >= 0, got {self.max_running!r}")
        for name in ("max_wait_ms", "prefix_cache_mb", "request_timeout_s", "header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            positive = name not in ("max_wait_ms", "prefix_cache_mb")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or \
                    (positive and value == 0) or value == float("inf"):
                raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
        self.allowed_origins = tuple(o.rstrip("/") for o in (self.allowed_origins or ()))
        self.session_config()  # device and threads checked by the session settings' own rules

    def session_config(self):
        """The sessions' settings, one object for every model: the thread pool sleeps between runs instead of
        spinning (a spinning pool keeps its cores busy after every run, taking them from the event loop that parses
        requests and from the next batch's tokenization); the session cache stays on (its default)."""
        from onnxpipe.session import SessionConfig

        return SessionConfig(device=self.device, intra_op_num_threads=self.intra_op_num_threads, allow_spinning=False)


def split_model_spec(spec) -> tuple[str, str, str | None]:
    """A `serve --model` spec, "DIR", "NAME=DIR" or "NAME=DIR@TASK" (DIR: a folder, or a Hub id ORG/NAME) ->
    (name, DIR, task or None); the name defaults to DIR's last part. A folder whose own name holds '=' or '@' is
    taken whole."""
    spec = str(spec)
    rest, task = spec, None
    if "@" in spec and not os.path.isdir(spec):
        rest, _, task = spec.rpartition("@")
    name, sep, path = rest.partition("=")
    if not sep or os.path.isdir(rest):
        name, path = Path(rest).resolve().name, rest
    return name, path, task
