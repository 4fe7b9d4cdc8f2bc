"""``lstm-engine serve``: a model's streams over HTTP and WebSocket, batched by one StreamPool.

    from lstm_engine.serve import Server, bind, run
    server = Server(model, state_dir="states", token_file="tokens.txt")  # re-read when it changes
    run(server, bind("127.0.0.1", 8000))

Needs the ``serve`` extra (Starlette, uvicorn, prometheus_client, orjson), and granian for
``run(..., http_server="granian")`` (the ``granian`` extra); the rest of lstm_engine never imports this package.
"""
from __future__ import annotations

try:
    import orjson  # noqa: F401
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"lstm_engine.serve needs the 'serve' extra ({exc.name} is missing): "
                      "pip install starlette uvicorn prometheus-client orjson (from an lstm_engine checkout: "
                      "pip install '.[serve]')") from exc

import asyncio
import gc
import signal
import socket
import sys
from typing import Any, Callable

from .app import Limits, Server, TokenFile, read_tokens

__all__ = ["Limits", "Server", "TokenFile", "read_tokens", "run", "bind", "SWITCH_INTERVAL"]

# The pool's worker needs the GIL briefly before and after each batch, and a busy event loop lets go of
# it only every switch interval (5 ms by default): the worker sat waiting for the loop, batches came
# late and the loop waited for their answers. Measured in benches/serve_load.py (200 streams, 6-s phases,
# two interleaved rounds, load average 9-12), steps/s over WebSocket / HTTP: 5 ms 2.1-2.2k / 1.4-2.4k,
# 1 ms 2.6-3.0k / 1.5-1.8k, 0.5 ms 3.1-3.2k / 1.5-2.5k, 0.2 ms 5.0-5.2k / 2.8-5.6k; then 0.2 ms
# 4.4-6.3k / 6.5-7.0k, 0.1 ms 6.4-7.8k / 4.5-6.1k, 0.05 ms 2.4-7.4k / 3.5-5.6k.
SWITCH_INTERVAL = 0.0002

# Every request makes a few dozen short-lived container objects (coroutines, futures, ASGI message dicts);
# at the default gen-0 threshold (700) CPython's cycle collector ran every few requests and, now and then, a
# full collection went through every object of the model, NumPy, uvicorn and Starlette: 6-7 % of the event
# loop's thread under load (perf, 200 WebSocket streams). The server freezes what exists once it listens
# (those objects are never garbage) and collects gen 0 every GC_THRESHOLD allocations.
GC_THRESHOLD = 10_000


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: a free one), IPv4 or IPv6."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError:
        sock.close()
        raise
    return sock


class _OneSend:
    """A connection's transport that sends what one turn of the event loop wrote as one send.

    uvicorn writes a response's head and its body with two writes; on loopback each send wakes the
    client, which finds half an answer and sleeps again, and on a busy machine the woken client often
    takes the server's CPU in the middle of the first send (py-spy: that write was a quarter of the
    event loop's samples at 200 keep-alive streams).
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _http_protocol() -> Any:
    """uvicorn's httptools protocol over _OneSend transports, or "auto" (h11) without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class Protocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_OneSend(transport, self.loop))

        def handle_websocket_upgrade(self) -> None:
            # A WebSocket answers a message with one write already: it gets the transport itself, unwaited.
            self.transport = self.transport._transport
            super().handle_websocket_upgrade()

    return Protocol


SERVERS = ("uvicorn", "granian")


def run(server: Server, sock: socket.socket, *, log_level: str = "warning",
        on_ready: Callable[[], Any] | None = None, http_server: str = "uvicorn") -> None:
    """Serve until SIGINT or SIGTERM; then finish the requests in flight and stop the pool.

    ``http_server``: "uvicorn" (its HTTP and WebSocket protocols are Python on the event loop) or "granian"
    (they are Rust, on a thread of their own; the handlers stay on this event loop).
    """
    if http_server not in SERVERS:
        raise ValueError(f"http_server: expected one of {', '.join(SERVERS)}, got {http_server!r}")
    serve, factory, caught = (_uvicorn if http_server == "uvicorn" else _granian)(server, sock, log_level)

    async def main() -> None:
        def ready() -> None:
            gc.freeze()
            if on_ready is not None:
                on_ready()

        if not await serve(ready):
            sys.exit(1)

    loop = factory() if factory is not None else asyncio.new_event_loop()
    switch, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
    gc.set_threshold(max(thresholds[0], GC_THRESHOLD), *thresholds[1:])
    try:
        loop.run_until_complete(main())
    finally:
        sys.setswitchinterval(switch)
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        loop.close()
    if caught:
        # Die of the signal that stopped the server, as uvicorn does (exit status -15 for SIGTERM).
        signal.raise_signal(caught[0])


def _uvicorn(server: Server, sock: socket.socket, log_level: str) -> tuple:
    """(serve(ready) -> started, event loop factory, signals caught) under uvicorn (which re-raises them)."""
    import uvicorn

    limits = server.limits
    config = uvicorn.Config(server.app, interface="asgi3", log_level=log_level, access_log=False, lifespan="on",
                            ws_max_size=limits.max_body, limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=10, server_header=False, http=_http_protocol(),
                            # No X-Forwarded-* rewriting of the client's address: nothing here reads it, and the
                            # middleware cost every request and message ~2 % of the event loop's time.
                            proxy_headers=False,
                            # websockets' sans-I/O protocol, named: uvicorn's default only since 0.50. The event
                            # loop's CPU a message at 200 streams (serve_load.py, 8-s phases, load 3-6): 44-45 us
                            # with it, 63-74 with websockets' legacy protocol, 66-67 with wsproto.
                            ws="websockets-sansio")
    uv = uvicorn.Server(config)

    async def serve(ready: Callable[[], None]) -> bool:
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started and not task.done():
            await asyncio.sleep(0.01)
        if uv.started:
            ready()
        await task
        return uv.started

    return serve, config.get_loop_factory(), []  # uvicorn's loop choice: uvloop when installed


def _granian(server: Server, sock: socket.socket, log_level: str) -> tuple:
    """(serve(ready) -> started, event loop factory, signals caught) under granian's embedded server, on this
    event loop."""
    try:
        from granian.constants import HTTPModes, Interfaces
        from granian.log import LogLevels
        from granian.server.embed import Server as Granian
    except ImportError as exc:
        raise ImportError("--server granian needs granian: pip install granian (from an lstm_engine checkout: "
                          "pip install '.[serve,granian]')") from exc
    import logging

    # granian binds its own socket: ours only chose the address (and a free port for port 0).
    host, port = sock.getsockname()[:2]
    sock.close()
    started: list = []  # serve()'s ready, then True once called
    waiting: list[asyncio.Task] = []  # listening(), held until it is done

    def app(scope: dict, receive: Any, send: Any) -> Any:
        # The lifespan's startup.complete is when granian starts taking connections; every other scope goes
        # to the server's application as it is (no wrapper coroutine a request).
        if scope["type"] != "lifespan":
            return server.app(scope, receive, send)

        async def sent(message: dict) -> None:
            if message["type"] == "lifespan.startup.complete":
                waiting.append(asyncio.get_running_loop().create_task(listening(started.pop())))
            await send(message)

        return server.app(scope, receive, sent)

    # backpressure: requests handled at once, past which granian stops reading new ones (uvicorn's
    # limit_concurrency answers 503 past the same number).
    granian = Granian(app, address=host, port=port, interface=Interfaces.ASGI, http=HTTPModes.http1,
                      websockets=True, backlog=1024, backpressure=server.limits.max_connections,
                      log_level=LogLevels(log_level if log_level in LogLevels.__members__ else "info"))
    # granian warns that its embedded server is experimental on every start: nothing for lstm-engine's user.
    logging.getLogger("_granian").addFilter(lambda record: "experimental" not in record.getMessage())

    async def listening(ready: Callable[[], None]) -> None:
        # granian's worker opens its listening socket after the lifespan's startup: ready once it answers.
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.005)
                continue
            writer.close()
            started.append(True)
            return ready()

    caught: list[int] = []

    def stop(sig: int) -> None:
        caught.append(sig)
        granian.stop()

    async def serve(ready: Callable[[], None]) -> bool:
        started.append(ready)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            await granian.serve()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return started == [True]

    def factory() -> asyncio.AbstractEventLoop:
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()

    return serve, factory, caught
