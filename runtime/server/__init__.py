"""`onnxpipe serve`: exported model folders behind an HTTP API, with dynamic batching and back-pressure.

    from onnxpipe.server import serve
    serve(["models/sst2"], host="127.0.0.1", port=8000, max_batch_size=8, max_wait_ms=5)

Needs the `server` extra (uvicorn + Starlette). The routes are described in `app.py`.
"""
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name):
    # the app (uvicorn, Starlette) only when asked for: the CLI reads ServerConfig without the server extra
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
