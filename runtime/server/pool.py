"""The models a server holds: loading them in the background, readiness, draining, and a worker (queue + threads)
per model. Knows nothing of HTTP beyond the RequestError it raises for a model that cannot take a request."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .batching import Job, ModelWorker, QueueFull, WorkerClosed
from .continuous import EngineWorker
from .errors import RequestError

log = logging.getLogger("onnxpipe.server")


@dataclass
class ModelSpec:
    path: Path
    task: str | None = None    # None: the manifest's task


def parse_model_specs(models) -> dict[str, ModelSpec]:
    """["dir", "name=dir", "name=dir@task"] -> {name: ModelSpec}, checking each folder's manifest now so
    that a typo fails at start. The task, when given, is any pipeline task or alias the export
    serves (e.g. sentence-similarity over a feature-extraction export)."""
    from onnxpipe.model_dir import read_manifest
    from onnxpipe.task_table import normalize_task

    from .config import split_model_spec

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    specs: dict[str, ModelSpec] = {}
    for spec in models:
        name, path, task = split_model_spec(spec)
        if task is not None:
            normalize_task(task)  # a clear ValueError for an unknown task
        if not name or "/" in name:
            raise ValueError(f"--model {spec!r}: a model name must be non-empty and without '/'")
        if name in specs:
            raise ValueError(f"two models are named {name!r}: name them with --model NAME=DIR")
        read_manifest(path)
        specs[name] = ModelSpec(Path(path), task)
    if not specs:
        raise ValueError("serve needs at least one --model DIR")
    return specs


class ModelPool:
    """The served models by name, each a pipeline behind a ModelWorker, loaded by `load()` in a thread."""

    def __init__(self, specs: dict[str, ModelSpec], config, metrics, stop_server):
        self.specs = specs
        self.config = config            # ServerConfig
        self.metrics = metrics
        self.workers: dict[str, ModelWorker] = {}
        self.loaded_at: dict[str, int] = {}   # name -> when it was loaded (Unix seconds)
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.stop_server = stop_server  # how a failed load stops the server

    def load(self) -> None:
        from onnxpipe import pipeline

        c = self.config
        session_config = c.session_config()
        name, spec = None, None
        try:
            for name, spec in self.specs.items():
                t0 = time.perf_counter()
                pipe = pipeline(spec.task, model=str(spec.path), precision=c.precision, session_config=session_config)
                for role in pipe.model.roles:  # create sessions now, not on the first request
                    pipe.model.session(role)
                if pipe.continuous_batching and c.max_running > 0:
                    worker = EngineWorker(name, pipe, max_running=c.max_running, max_queue=c.max_queue,
                                          prefix_cache_mb=c.prefix_cache_mb, metrics=self.metrics)
                    self.metrics.watch_sequences(name, worker.counts)
                else:
                    worker = ModelWorker(name, pipe, max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                                         max_queue=c.max_queue, threads=c.workers, metrics=self.metrics)
                worker.start()
                self.workers[name] = worker
                self.loaded_at[name] = int(time.time())
                self.metrics.watch_queue(name, worker.depth)
                log.info("loaded %s (%s) from %s in %.2f s on %s (session cache: %s)", name, pipe.task, spec.path,
                         time.perf_counter() - t0, pipe.device, session_cache_state(pipe))
            self.ready = True
            log.info("ready: %s", ", ".join(self.workers))
        except Exception as e:  # noqa: BLE001 - reported, then the server stops
            self.load_error = f"could not load model {name!r} from {spec.path if spec else '?'}: {e}"
            log.error("%s", self.load_error)
            self.stop_server()

    def begin_drain(self) -> None:
        self.draining = True
        for worker in list(self.workers.values()):
            worker.drain()

    def close(self) -> None:
        for worker in list(self.workers.values()):
            worker.close(timeout=self.config.request_timeout_s)

    def worker(self, name) -> ModelWorker:
        """The model's worker, or the RequestError (503 loading/draining, 404 unknown) that answers the request."""
        if self.draining:
            raise RequestError(503, "the server is shutting down", self._retry_after())
        if not self.ready:
            raise RequestError(503, "models are still loading: retry when /ready answers 200", self._retry_after())
        if name not in self.workers:
            raise RequestError(404, f"no model named {name!r}: this server has {', '.join(sorted(self.workers))}")
        return self.workers[name]

    def chat_models(self) -> list[str]:
        return [name for name, w in self.workers.items() if w.pipe.chats]

    def generation_models(self) -> list[str]:
        """Models that continue a plain prompt token by token (what /v1/completions serves)."""
        return [name for name, w in self.workers.items() if w.pipe.streams]

    def embedding_models(self) -> list[str]:
        return [name for name, w in self.workers.items() if w.pipe.embedding_pipeline() is not None]

    def describe(self, name: str) -> dict:
        pipe = self.workers[name].pipe
        manifest = pipe.manifest
        return {"name": name, "task": pipe.task, "model_type": manifest.get("model_type"),
                "architecture": manifest.get("architecture"), "precision": pipe.model.precision,
                "device": pipe.device, "max_input_tokens": pipe.max_input_tokens, "stream": pipe.streams,
                "chat": pipe.chats, "session_cache": session_cache_state(pipe)}

    def submit(self, worker: ModelWorker, job: Job) -> None:
        try:
            worker.submit(job)
        except QueueFull:
            raise RequestError(503, f"model {worker.name!r} is overloaded ({worker.max_queue} requests queued): "
                                    "retry later", self._retry_after()) from None
        except WorkerClosed:
            raise RequestError(503, "the server is shutting down", self._retry_after()) from None

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}


def session_cache_state(pipe) -> str:
    """How the model's sessions were made: "hit" (all loaded from the session cache), "written" (optimized now and
    saved), "off" (not cached: small graphs, CUDA, or the cache turned off), or "mixed"."""
    sessions = [pipe.model.session(role) for role in pipe.model.roles]
    states = {"off" if s.cached_from is None else "hit" if s.cache_hit else "written" for s in sessions}
    return states.pop() if len(states) == 1 else "mixed"
