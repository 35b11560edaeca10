"""Which web pages may call the server: by default none but its own origin.

A page on any site can make a browser POST to a server on localhost: a "simple" cross-origin request
(text/plain, no preflight) is sent, and processed, even though the page cannot read the answer. So a request
whose Origin header names another origin is refused with 403 before it reaches a route, unless that origin was
allowed (`--allow-origin`); allowed origins get CORS headers (preflights answered) through Starlette's
CORSMiddleware. Requests without an Origin header (curl, SDKs, other servers) are not affected.
"""
from __future__ import annotations

import json

from starlette.middleware.cors import CORSMiddleware


class OriginGuard:
    def __init__(self, app, allowed_origins: tuple[str, ...]):
        self.allowed = set(allowed_origins)
        self.app = CORSMiddleware(app, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                                  allow_headers=["content-type", "authorization"]) if allowed_origins else app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/")
            if origin and origin not in self.allowed and not _same_origin(origin, scope, headers):
                body = json.dumps({"error": f"cross-origin requests from {origin} are not allowed: start the server "
                                            f"with --allow-origin {origin} to allow that site's pages"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _same_origin(origin: str, scope, headers) -> bool:
    host = headers.get(b"host", b"").decode("latin-1")
    return bool(host) and origin == f"{scope.get('scheme', 'http')}://{host}"
