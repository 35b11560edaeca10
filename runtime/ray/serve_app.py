"""`onnxpipe serve`'s HTTP API on Ray Serve.

Each replica runs the very app `onnxpipe serve` runs (server.app.create_app): the same routes, bodies, SSE
streams, errors, batching and budgets, from the same code. Ray adds what one process cannot: replicas on
several nodes, autoscaling, and a proxy on every node. A replica loads its models before Ray sends it traffic
(a model that cannot load fails the deployment with the reason, naming the node), sizes ONNX Runtime's threads
from the CPUs Ray gave it, and names itself in an `x-onnxpipe-replica` response header.

    app = deployment("models/sentiment", num_replicas=2, num_cpus=1)
    serve.run(app, name="onnxpipe", route_prefix="/")

or `serve run onnxpipe.ray:build_app models=models/sentiment num_replicas=2`, or `onnxpipe serve --ray`, or a
RayService on KubeRay from `serve_config(...)` (`onnxpipe serve --ray --print-config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from ray import serve

from onnxpipe.server.config import ServerConfig

from .node import assigned_threads, check_models_here, node_name

APP_NAME = "onnxpipe"
REPLICA_HEADER = b"x-onnxpipe-replica"
BUILD_APP = "onnxpipe.ray:build_app"


@serve.ingress()  # late-bound: each replica builds its own app (its own models and worker threads)
class OnnxpipeReplica:
    async def __init__(self, models: list[str], config_fields: dict):
        from onnxpipe.server.config import split_model_spec
        from onnxpipe.server.pool import parse_model_specs

        check_models_here([split_model_spec(spec)[1] for spec in models])
        fields = dict(config_fields)
        if fields.get("intra_op_num_threads") is None:
            fields["intra_op_num_threads"] = assigned_threads()
        self.config = ServerConfig(**fields)
        self.models = models
        parse_model_specs(models)  # each manifest read here, so a bad folder fails with its reason
        context = serve.get_replica_context()
        self.identity = f"{node_name()} replica {context.replica_id.unique_id}"

    def __serve_build_asgi_app__(self):
        from onnxpipe.server.app import create_app
        from onnxpipe.server.origins import OriginGuard

        self.server_app = create_app(self.models, self.config, load_in_startup=True)
        return _ReplicaHeader(OriginGuard(self.server_app, self.config.allowed_origins), self.identity.encode())

    def check_health(self) -> None:
        """Ray replaces a replica whose check fails: one whose models failed or whose workers stopped."""
        pool = self.server_app.state.onnxpipe
        if pool.load_error is not None:
            raise RuntimeError(pool.load_error)
        if not pool.draining:
            dead = [name for name, worker in pool.workers.items() if not worker.alive]
            if dead:
                raise RuntimeError(f"the worker of model(s) {', '.join(dead)} stopped")


class _ReplicaHeader:
    """Adds `x-onnxpipe-replica: <node> replica <id>` to every response: which replica answered (load spread,
    debugging). Bodies stay exactly `onnxpipe serve`'s."""

    def __init__(self, app, identity: bytes):
        self.app, self.identity = app, identity

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.identity)]}
            await send(message)

        await self.app(scope, receive, send_named)


def deployment(models, *, name: str | None = None, num_replicas: int | str = 1, autoscaling_config: dict | None = None,
               num_cpus: float = 1, resources: dict | None = None, max_ongoing_requests: int | None = None,
               **server_options):
    """A Serve application (bind()'s result) serving `models` as `onnxpipe serve --model ...` would.

    models: a model folder, or a list of `onnxpipe serve --model` specs ("DIR", "NAME=DIR", "NAME=DIR@TASK");
    name: the one model's name in the routes (default: its folder's name). num_cpus: CPUs per replica (its ONNX
    Runtime threads, unless intra_op_num_threads is given); resources: custom Ray resources per replica (e.g. one
    per node to place one replica on each). server_options: any ServerConfig field (max_batch_size, max_wait_ms,
    precision, device, max_queue, request_timeout_s, ...), checked here, on the driver."""
    specs = model_specs(models, name)
    config = ServerConfig(**server_options)
    if max_ongoing_requests is None:
        # Ray's default (5) would cap every batch at 5 inputs and leave the replica's own queue (max_queue, answered
        # 503 when full, as onnxpipe serve does) unused: let a replica hold what its queue and one batch hold.
        max_ongoing_requests = config.max_queue + config.max_batch_size
    options = {"name": APP_NAME, "max_ongoing_requests": max_ongoing_requests,
               "ray_actor_options": {"num_cpus": num_cpus, **({"resources": dict(resources)} if resources else {})},
               # a replica being replaced finishes its requests (each at most request_timeout_s) before it stops
               "graceful_shutdown_timeout_s": config.request_timeout_s + 5}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(OnnxpipeReplica, **options).bind(specs, dataclasses.asdict(config))


def model_specs(models, name: str | None = None) -> list[str]:
    specs = [str(models)] if isinstance(models, (str, os.PathLike)) else [str(m) for m in models]
    if not specs:
        raise ValueError("a deployment needs at least one model folder")
    if name is not None:
        if len(specs) != 1 or "=" in specs[0]:
            raise ValueError("name= names the one model of a deployment: for several, pass 'NAME=DIR' specs")
        specs = [f"{name}={specs[0]}"]
    return specs


# -- `serve run onnxpipe.ray:build_app ...` and KubeRay ---------------------------------------------------------

_DEPLOYMENT_ARGS = {"name": str, "num_replicas": int, "num_cpus": float, "max_ongoing_requests": int}


def build_app(args: dict):
    """Serve's application builder: `serve run onnxpipe.ray:build_app models=DIR[,DIR...] num_replicas=2
    max_batch_size=8 ...`, or a Serve config file's `args` (typed values there). Takes deployment()'s arguments;
    strings from the command line are converted by the field's type."""
    args = dict(args)
    models = args.pop("models", None)
    if models is None:
        raise ValueError("build_app needs models=DIR (or NAME=DIR, several separated by commas)")
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    types = {f.name: f.type for f in dataclasses.fields(ServerConfig)}
    kwargs = {}
    for key, value in args.items():
        if key in ("autoscaling_config", "resources") and isinstance(value, str):
            value = json.loads(value)
        elif isinstance(value, str) and key in _DEPLOYMENT_ARGS:
            value = _DEPLOYMENT_ARGS[key](value)
        elif isinstance(value, str) and key in types:
            value = _convert(value, types[key], key)
        elif key not in types and key not in _DEPLOYMENT_ARGS and key not in ("autoscaling_config", "resources"):
            raise ValueError(f"build_app got an unknown argument {key!r}")
        kwargs[key] = value
    return deployment(models, **kwargs)


def _convert(value: str, kind: str, key: str):
    if "tuple" in kind:
        return tuple(v for v in value.split(",") if v)
    for cast in (int, float):
        if cast.__name__ in kind:
            try:
                return cast(value)
            except ValueError:
                if "None" not in kind:
                    raise ValueError(f"{key}={value!r}: not a number") from None
    return None if value == "None" else value


def serve_config(models, *, host: str = "0.0.0.0", port: int = 8000, **deployment_args) -> str:
    """A Serve config file (YAML) for this deployment: `serve deploy` takes it, and a KubeRay RayService takes it
    as its `serveConfigV2`. The model folders' paths are the nodes' paths (the pods' volume mounts)."""
    import yaml

    specs = model_specs(models, deployment_args.pop("name", None))
    deployment(specs, **deployment_args)  # every argument checked now, not in the cluster
    return yaml.safe_dump({
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": BUILD_APP,
                          "args": {"models": specs, **deployment_args}}],
    }, sort_keys=False)


# -- `onnxpipe serve --ray` -------------------------------------------------------------------------------------


def run_server(models, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
               replicas: int = 1, **deployment_args) -> None:
    """Serve `models` on Ray until SIGINT/SIGTERM: on the cluster at `address` (a Ray address, or "auto"), else on a
    Ray started here for this process. Only this app is removed at exit; a cluster it joined keeps running."""
    import signal
    import threading

    import ray

    # On a small machine Serve's routers time out asking busy replicas for their queue length and warn each time.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1")
    started_here = address is None
    if started_here:  # "local": a new Ray, even where RAY_ADDRESS names another
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="EveryNode")
        serve.run(deployment(models, num_replicas=replicas, **deployment_args), name=APP_NAME, route_prefix="/")
        wait_for_route(host, port)
        print(f"onnxpipe on Ray: http://{host}:{port} ({replicas} replica(s)); Ctrl-C stops it", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
            ray.shutdown()


def wait_for_route(host: str, port: int, timeout_s: float = 60.0, routes=("/",)) -> None:
    """Serve's proxy answers 404 for a while after serve.run() returns: wait until it lists the apps' routes."""
    import urllib.request

    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/-/routes", timeout=5) as response:
                if set(routes) <= set(json.loads(response.read() or b"{}")):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve's proxy on {host}:{port} did not list {', '.join(routes)} in {timeout_s:.0f} s")
        time.sleep(0.2)
