"""HTTP connections bounded in time, and framing errors in the one {"error": message} shape.

uvicorn bounds only idle time (keep-alive), and a client that sends one byte a second is never idle. This
protocol is uvicorn's h11 protocol with two total deadlines, counted from when the server starts waiting:

- a request's head (request line and headers) must be complete within ``header_s`` seconds;
- its body within ``body_s`` seconds plus one second per ``min_body_rate`` bytes it declares in
  Content-Length (a chunked body is given the time of the largest upload the server takes).

A client that misses one gets ``408 Request Timeout`` (when no answer was started) and the connection is
closed; an idle keep-alive connection is simply closed. The time the server takes to answer is not
bounded here.

Every close is a lingering close (as nginx and Apache do): the server half-closes, so its answer and then
end-of-stream reach the client, and reads and drops whatever the client still sends for up to ``linger_s``
seconds. A plain close with unread bytes in the socket makes the kernel send a reset, which can destroy an
answer the client has not read yet: a 408 to a client still dribbling, or a 413 refused from its
Content-Length while the body is still uploading. An answer sent before the request body was read ends the
connection the same way instead of reading the rest of that body.

uvicorn builds one protocol per connection in every worker process, from the class given to
``uvicorn.run(http=...)``, so all of this holds with ``--workers N`` too.
"""
from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionDeadlines:
    header_s: float = 5.0               # total time for a request's line and headers
    body_s: float = 10.0                # total time for a body, plus its size at min_body_rate
    min_body_rate: float = 100_000.0    # bytes per second a body must at least arrive at
    max_body_bytes: int = 20 * 1024 * 1024  # the size a chunked body (no Content-Length) is given time for
    linger_s: float = 2.0               # after closing, how long the client's further bytes are read and dropped

    def body_deadline(self, declared: int | None) -> float:
        size = self.max_body_bytes if declared is None else min(declared, self.max_body_bytes)
        return self.body_s + size / self.min_body_rate


def error_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer in the server's error shape that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class LingeringTransport:
    """The connection's transport, whose ``close()`` half-closes and lingers (see the module's docstring);
    everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger_s: float):
        self._transport, self._loop, self._linger_s = transport, loop, linger_s
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if not self._transport.can_write_eof():  # TLS cannot half-close
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()       # sent after what is still buffered
        self._transport.resume_reading()  # keep draining even if h11 had paused reads
        self._timer = self._loop.call_later(self._linger_s, self._transport.close)

    def forget(self) -> None:
        """The connection is gone: the linger timer has nothing left to close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class DeadlineH11Protocol(H11Protocol):
    def __init__(self, *args, deadlines: ConnectionDeadlines, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadlines = deadlines
        self._phase: str | None = None           # "head" or "body": what the running deadline bounds
        self._timer: asyncio.TimerHandle | None = None
        self._head_started = False               # bytes of the awaited request head have arrived

    @classmethod
    def factory(cls, deadlines: ConnectionDeadlines):
        """What ``uvicorn.run(http=...)`` takes; picklable, so spawned worker processes rebuild it."""
        return functools.partial(cls, deadlines=deadlines)

    # --- deadlines -----------------------------------------------------------------------------------
    def _arm(self, phase: str | None, seconds: float = 0.0) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            self._timer = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _follow_state(self) -> None:
        """Arm the deadline that fits where the request stands: waiting for a head, reading a body, or none
        (request complete, the server is answering)."""
        if self.transport is None or self.transport.is_closing():
            self._arm(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE and self._phase != "head":
            self._head_started = False
            self._arm("head", self.deadlines.header_s)
        elif state is h11.SEND_BODY and self._phase != "body":
            self._arm("body", self.deadlines.body_deadline(self._declared_length()))
        elif state not in (h11.IDLE, h11.SEND_BODY) and self._phase is not None:
            self._arm(None)

    def _declared_length(self) -> int | None:
        for name, value in self.headers or ():
            if name == b"content-length":
                return int(value)
        return None

    def _expired(self, phase: str, seconds: float) -> None:
        self._timer, self._phase = None, None
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started and phase == "body"
        if phase == "head" and not self._head_started:
            self.logger.debug("closing an idle connection after %.1f s", seconds)
        elif not answered:
            what = "request line and headers" if phase == "head" else "request body"
            self.logger.info("408: %s not complete within %.1f s; connection closed", what, seconds)
            self.transport.write(error_response(408, "Request Timeout",
                                                f"the {what} did not arrive within {seconds:g} s; send the whole "
                                                "request promptly"))
        self.transport.close()

    # --- uvicorn's hooks -----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(LingeringTransport(transport, self.loop, self.deadlines.linger_s))
        self._follow_state()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            return  # the answer is sent; what the client still sends is dropped unread
        if self._phase == "head":
            self._head_started = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_state()

    def connection_lost(self, exc) -> None:
        self._arm(None)
        self.transport.forget()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """An answer sent before its request's body was read (a refusal from the headers alone) ends the
        connection: reading the rest of an unwanted body, up to the upload limit, would only hold the worker."""
        if self.conn.their_state is h11.SEND_BODY:
            self.transport.close()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """Malformed framing (a bad Content-Length, a header line without a colon, a head past h11's size
        limit): the one error shape, where uvicorn answers text/plain."""
        self._arm(None)
        self.transport.write(error_response(400, "Bad Request", "malformed HTTP request: check the request line, "
                                                                "the header lines (Name: value) and Content-Length"))
        self.transport.close()
