"""Connection limits for uvicorn's h11 protocol: a cap on open connections, and a deadline for a request head.

uvicorn closes an idle keep-alive connection, but a connection that never sends a byte (or sends a head a byte
at a time) is kept forever; a few hundred of them exhaust the process's file descriptors and every real request
fails. Here each connection must deliver a complete request head within `header_timeout_s` of opening (or of
its previous response), and at `max_connections` the connection that has waited longest without a request is
closed to make room (a connection busy with a request is never closed for another).
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type:
    """An H11Protocol class enforcing these limits (uvicorn.Config(http=...) takes a class)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            others = list(self.connections)
            super().connection_made(transport)
            if len(others) >= max_connections:
                idle = [c for c in others if getattr(c, "_idle_since", None) is not None]
                if not idle:  # every connection is busy with a request: refuse the new one
                    self._idle_since = None
                    transport.close()
                    return
                min(idle, key=lambda c: c._idle_since)._close_idle()
            self._start_waiting()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._idle_since = None  # a request head has arrived: the deadline no longer applies

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._start_waiting()

        def connection_lost(self, exc) -> None:
            self._idle_since = None
            super().connection_lost(exc)

        def _start_waiting(self) -> None:
            self._idle_since = self.loop.time()
            since = self._idle_since
            self.loop.call_later(header_timeout_s, lambda: self._idle_since == since and self._close_idle())

        def _close_idle(self) -> None:
            self._idle_since = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
