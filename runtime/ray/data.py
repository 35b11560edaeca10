"""Offline labelling on Ray Data: Predictor (a callable class for Dataset.map_batches), predict(), and the chunked
path `onnxpipe batch --ray-address` takes.

A row is labelled by onnxpipe.batch_job.RowLabeller, the same code as the single-process `onnxpipe batch`: the
result as JSON text in `output`, or the reason in `error` for a bad row (no value, empty, wrong type, too long),
which never fails the job. Each actor sizes ONNX Runtime's threads from the CPUs Ray gave it.
"""
from __future__ import annotations

import pickle

import numpy as np
import ray

from onnxpipe.batch_job import ERROR, OUTPUT, RowLabeller

from .node import assigned_threads, check_models_here, node_name


def _labeller(model_dir, column, task, precision, device, parameters, pipeline_kwargs) -> RowLabeller:
    from onnxpipe import pipeline

    check_models_here([model_dir])
    pipeline_kwargs = dict(pipeline_kwargs)
    if pipeline_kwargs.get("intra_op_num_threads") is None and pipeline_kwargs.get("session_config") is None:
        pipeline_kwargs["intra_op_num_threads"] = assigned_threads()
    pipe = pipeline(task, model=str(model_dir), precision=precision or "fp32", device=device, **pipeline_kwargs)
    return RowLabeller(pipe, parameters, column)


class Predictor:
    """For `Dataset.map_batches(Predictor, fn_constructor_kwargs={"model_dir": ...}, compute=ActorPoolStrategy(...))`:
    adds `output` (JSON text) and `error` columns to each batch, from `column`. node_column: also a column naming
    the node that labelled the row (to see how the work spread). pipeline_kwargs go to onnxpipe.pipeline()."""

    def __init__(self, model_dir, column: str = "text", *, task: str | None = None, precision: str | None = None,
                 device: str | None = None, parameters: dict | None = None,
                 node_column: str | None = None, **pipeline_kwargs):
        self.column = column
        self.node_column = node_column
        self.labeller = _labeller(model_dir, column, task, precision, device, parameters, pipeline_kwargs)
        self.node = node_name()

    def __call__(self, batch: dict) -> dict:
        if self.column not in batch:
            raise ValueError(f"the dataset has no column {self.column!r}: it has {', '.join(batch)}")
        values = [_python(v) for v in batch[self.column]]
        answers = self.labeller.label(values)
        out = dict(batch)
        out[OUTPUT] = np.array([a[0] for a in answers], dtype=object)
        out[ERROR] = np.array([a[1] for a in answers], dtype=object)
        if self.node_column:
            out[self.node_column] = np.array([self.node] * len(values), dtype=object)
        return out


def _python(value):
    """A numpy cell as the plain Python value a pipeline takes (Ray hands strings as numpy str_, lists as arrays)."""
    if isinstance(value, np.ndarray):
        return [_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def predict(dataset, model_dir, column: str = "text", *, actors: int = 2, batch_size: int = 64,
            cpus_per_actor: float = 1, resources: dict | None = None, **predictor_kwargs):
    """The dataset with `output` and `error` columns added by `actors` Predictor actors (each `cpus_per_actor` CPUs,
    plus custom `resources`, e.g. one per node to put one actor on each node). Lazy, as Ray datasets are."""
    from ray.data import ActorPoolStrategy

    _keep_order_and_spread(dataset.context)
    return dataset.map_batches(
        Predictor, batch_size=batch_size, compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"model_dir": str(model_dir), "column": column, **predictor_kwargs},
        **({"resources": dict(resources)} if resources else {}))


def _keep_order_and_spread(context) -> None:
    """Set on the dataset's own context (a dataset copies the global one when it is made): rows come back in input
    order (a file written from them keeps its order), and the job waits for the whole actor pool, so the first
    actor up does not take every row while the others still load their model."""
    context.execution_options.preserve_order = True
    context.wait_for_min_actors_s = max(context.wait_for_min_actors_s or 0, 600)


# Chunks per Ray Data block (`onnxpipe batch --ray-address`). BERT-small, 50,000 rows in chunks of 64, 2 actors on
# 2 cores: one chunk a block 740-780 rows/s (Ray's per-block work took a fifth of the CPU); ~100 chunks a block
# kept the first answers back a minute.
CHUNKS_PER_BLOCK = 8


class _ChunkLabeller:
    """`onnxpipe batch`'s unit of work: one chunk of values (pickled: any cell type survives) -> its answers. Chunks
    are cut by the driver exactly as the single-process run cuts them, so both write the same file."""

    def __init__(self, model_dir, column, task, precision, device, parameters):
        self.labeller = _labeller(model_dir, column, task, precision, device, parameters, {})

    def __call__(self, batch: dict) -> dict:
        answers = [pickle.dumps(self.labeller.label(pickle.loads(chunk))) for chunk in batch["values"]]
        return {"chunk": batch["chunk"], "answers": np.array(answers, dtype=object)}


def label_chunks(pieces: list[list], model_dir, *, column: str, address: str, actors: int = 2,
                 cpus_per_actor: float = 1, resources: dict | None = None, task=None, precision=None, device=None,
                 parameters: dict | None = None):
    """Each chunk's answers, in order, labelled on Ray Data actors. address: a Ray address ("auto", "HOST:PORT",
    "ray://...") or "local" (a Ray started here for the job). Yields as chunks finish."""
    from ray.data import ActorPoolStrategy

    started_here = not ray.is_initialized()
    if started_here:
        # "local": a Ray of the job's own (no dashboard); else join the cluster as it is
        local = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, configure_logging=False, log_to_driver=False, **local)
    try:
        if not pieces:
            return
        items = [{"chunk": i, "values": pickle.dumps(piece)} for i, piece in enumerate(pieces)]
        # a block comes back only when all its chunks are done: CHUNKS_PER_BLOCK keeps the first answers (and the
        # actors' even share of the last ones) within a few seconds, where Ray's cost per block stays small
        blocks = max(min(len(items), actors * 4), -(-len(items) // CHUNKS_PER_BLOCK))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        _keep_order_and_spread(dataset.context)
        labelled = dataset.map_batches(
            _ChunkLabeller, batch_size=1, compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
            fn_constructor_args=(str(model_dir), column, task, precision, device, parameters),
            **({"resources": dict(resources)} if resources else {}))
        expected = 0
        for row in labelled.iter_rows():
            if row["chunk"] != expected:
                raise RuntimeError(f"Ray returned chunk {row['chunk']} where chunk {expected} was due")
            expected += 1
            yield pickle.loads(row["answers"])
        if expected != len(pieces):
            raise RuntimeError(f"Ray returned {expected} of {len(pieces)} chunks")
    finally:
        if started_here:
            ray.shutdown()
