"""A counting proxy for the PostgreSQL wire protocol: round trips, prepares, and a trace.

Every implementation connects through it during the counting pass, so the
same counter measures all of them, whatever the driver. A round trip ends
with the server's ``ReadyForQuery`` (``Z``), which answers exactly one
client ``Query`` (simple protocol) or ``Sync`` (extended protocol). A round
trip whose messages include ``Parse`` but no ``Bind`` is a prepare (asyncpg
prepares a statement the first time a connection sees it); those are counted
apart, so a warmed-up client shows its steady state.

TLS and GSSAPI encryption requests are answered ``N`` by the proxy itself, so
the stream stays readable; it listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Final

SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102


@dataclass(slots=True)
class Exchange:
    """The client messages of one round trip."""

    parses: list[str] = field(default_factory=list)
    executes: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)

    @property
    def prepare_only(self) -> bool:
        """A ``Parse``/``Describe``/``Sync`` round trip: preparing, not executing."""
        return bool(self.parses) and not self.executes and not self.queries

    def describe(self) -> str:
        """One line for the trace."""
        if self.queries:
            return "simple   " + " | ".join(self.queries)
        if self.prepare_only:
            return "prepare  " + " | ".join(self.parses)
        return "execute  " + " | ".join(self.executes or self.parses)


@dataclass(slots=True)
class Counter:
    """What went over the wire since the last :meth:`reset`."""

    round_trips: int = 0
    prepares: int = 0
    trace: list[str] | None = None

    def reset(self, *, trace: bool = False) -> None:
        """Start counting (and tracing) afresh."""
        self.round_trips = 0
        self.prepares = 0
        self.trace = [] if trace else None

    def record(self, exchange: Exchange) -> None:
        """Count one round trip."""
        if exchange.prepare_only:
            self.prepares += 1
        else:
            self.round_trips += 1
        if self.trace is not None:
            self.trace.append(exchange.describe())


def _cstring(body: bytes, start: int = 0) -> tuple[str, int]:
    end = body.index(b"\x00", start)
    return body[start:end].decode("utf-8", "replace"), end + 1


def _short(sql: str, width: int = 110) -> str:
    flat = re.sub(r"\s+", " ", sql).strip()
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class CountingProxy:
    """``async with CountingProxy(host, port) as proxy:`` connect to ``proxy.port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._host = upstream_host
        self._port = upstream_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.counter = Counter()
        self.port = 0

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        server_w: asyncio.StreamWriter | None = None
        try:
            startup = await self._negotiate(client_r, client_w)
            server_r, server_w = await asyncio.open_connection(self._host, self._port)
            server_w.write(startup)
            pending: deque[Exchange] = deque()
            pumps = {
                asyncio.ensure_future(self._client_to_server(client_r, server_w, pending)),
                asyncio.ensure_future(self._server_to_client(server_r, client_w, pending)),
            }
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.close()
            if task is not None:
                self._tasks.discard(task)

    @staticmethod
    async def _negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        while True:
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            return struct.pack("!i", length) + body

    async def _client_to_server(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: deque[Exchange],
    ) -> None:
        statements: dict[str, str] = {}
        current = Exchange()
        while True:
            header = await reader.readexactly(5)
            kind = header[:1]
            (length,) = struct.unpack("!i", header[1:])
            body = await reader.readexactly(length - 4)
            if kind == b"P":
                name, at = _cstring(body)
                sql, _ = _cstring(body, at)
                statements[name] = _short(sql)
                current.parses.append(statements[name])
            elif kind == b"B":
                _portal, at = _cstring(body)
                name, _ = _cstring(body, at)
                current.executes.append(statements.get(name, f"<statement {name}>"))
            elif kind == b"Q":
                sql, _ = _cstring(body)
                current.queries.append(_short(sql))
            if kind in (b"S", b"Q"):
                pending.append(current)
                current = Exchange()
            writer.write(header + body)
            await writer.drain()
            if kind == b"X":
                return

    async def _server_to_client(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: deque[Exchange],
    ) -> None:
        while True:
            header = await reader.readexactly(5)
            (length,) = struct.unpack("!i", header[1:])
            body = await reader.readexactly(length - 4)
            # The first ReadyForQuery ends the startup, which no client message asked for.
            if header[:1] == b"Z" and pending:
                self.counter.record(pending.popleft())
            writer.write(header + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
