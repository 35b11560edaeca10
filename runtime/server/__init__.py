"""`onnxpipe serve`: exported model folders behind an HTTP API, with dynamic batching and back-pressure.

    from onnxpipe.server import serve
    serve(["models/sst2"], host="127.0.0.1", port=8000, max_batch_size=8, max_wait_ms=5)

Needs the `server` extra (uvicorn + Starlette). The routes are described in `app.py`.
"""
from .app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
