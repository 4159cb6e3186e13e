"""The HTTP connection layer under the app: uvicorn's h11 protocol with the bounds uvicorn lacks.

uvicorn (0.55) bounds neither how long a new connection may take to send its request headers nor how
many connections may sit open: an idle socket that never sends a byte stays open forever, and its
`limit_concurrency` counts such sockets, so a few hundred of them make every request (/health included)
a 503. `BoundedH11Protocol` adds the two missing bounds at the connection: a header deadline (the
request line and headers must arrive within `header_timeout_s` of the connection opening or of the
previous response, else the connection is closed; a slow trickle of header bytes does not extend it, and
the rest of a body already answered, e.g. by a 413, is discarded for that long at most),
and a cap on open connections (`max_open_connections`) that keeps the server answering: above it, the
oldest connection that is not inside a request (idle, keep-alive, or still sending headers) is closed to
make room, and only when every connection is inside a request is the new one refused. uvicorn's own
`limit_concurrency` is left off: requests in flight are bounded by the `Guard` middleware, which spares
/health, and slow bodies by its body deadline (guards.py). `uvicorn_config` is how the CLI and the tests
run an app, so both run these bounds.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from yuyan.serve.config import ServeConfig

KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (uvicorn's default)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header deadline and a cap on open connections (class attributes,
    set by `protocol_class`)."""

    header_timeout_s: float = 10.0
    max_open_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = self.loop.time()
        self.header_deadline: asyncio.TimerHandle | None = None
        self.drain_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()
        if len(self.connections) > self.max_open_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.waiting_for_headers():  # the request's headers are in: the deadline is met
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY:  # answered (a 413) while its body still arrives:
            # what is left is discarded, for a header deadline's time at most
            self.drain_deadline = self.loop.call_later(self.header_timeout_s, self.transport.close)
        else:
            self._arm_header_deadline()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        if self.drain_deadline is not None:
            self.drain_deadline.cancel()
        super().connection_lost(exc)

    def waiting_for_headers(self) -> bool:
        """No request in progress on this connection: idle, kept alive, or part-way through headers."""
        idle_cycle = self.cycle is None or self.cycle.response_complete
        return idle_cycle and self.conn.their_state is h11.IDLE

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        if not self.transport.is_closing() and self.waiting_for_headers():
            self.header_deadline = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_deadline(self) -> None:
        if getattr(self, "header_deadline", None) is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _header_timeout(self) -> None:
        self.header_deadline = None
        if self.waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        """Over the cap: close the oldest connection waiting for headers, else refuse this one."""
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, BoundedH11Protocol) and c.waiting_for_headers()
        ]
        if idle:
            victim = min(idle, key=lambda c: c.opened)
            victim.transport.close()
            self.connections.discard(victim)  # counted out now; connection_lost follows
        else:
            self.transport.close()


def protocol_class(config: ServeConfig) -> type[BoundedH11Protocol]:
    """`BoundedH11Protocol` with this server's header deadline and connection cap."""
    return type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {
            "header_timeout_s": config.header_timeout_s,
            "max_open_connections": config.max_open_connections,
        },
    )


def uvicorn_config(app: FastAPI, log_level: str = "info", **kw) -> uvicorn.Config:
    """The uvicorn settings of an app made by `create_app`, its connection bounds included; `kw` adds
    uvicorn's own (host and port, or nothing when the caller passes sockets to `Server.run`)."""
    config: ServeConfig = app.state.config
    return uvicorn.Config(
        app,
        log_level=log_level,
        http=protocol_class(config),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=None,  # see the module docstring: it would count idle sockets
        **kw,
    )


__all__ = ["BoundedH11Protocol", "protocol_class", "uvicorn_config"]
