"""onnxpipe on Ray: more replicas than one machine holds (Ray Serve), and offline labelling of large tables (Ray Data).

    from onnxpipe import ray as opray
    app = opray.deployment("models/sentiment", num_replicas=2, num_cpus=1)   # onnxpipe serve's HTTP API
    ray.serve.run(app)
    labelled = opray.predict(ray.data.read_parquet("rows.parquet"), "models/sentiment", column="text", actors=2)

Needs the `ray` extra (pip install 'onnxpipe[ray]'), imported here only: `import onnxpipe` never imports Ray. Every
model folder must be at the same path on every node (a replica or actor checks at start and names its node).
"""
from __future__ import annotations

__all__ = ["deployment", "build_app", "serve_config", "run_server", "Predictor", "predict"]

_WHERE = {"deployment": "serve_app", "build_app": "serve_app", "serve_config": "serve_app",
          "run_server": "serve_app", "Predictor": "data", "predict": "data"}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    from .node import require_ray

    require_ray()
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
