"""The HTTP and WebSocket application (Starlette) over a StreamStore, and running it under uvicorn.

Routes (all JSON unless said; every error is ``{"error": {"code", "message"}}`` with a 4xx status):

    GET    /healthz                      liveness and counts (no token needed)
    GET    /metrics                      Prometheus text
    GET    /v1/model                     what the model takes and gives
    POST   /v1/streams                   -> 201 {"id", "position": 0}
    POST   /v1/streams/{id}/step         {"x": step or chunk, "at"?: position} or a .npy body -> outputs
    GET    /v1/streams/{id}              {"id", "position"}
    DELETE /v1/streams/{id}              -> 204
    GET    /v1/streams/{id}/state        the session's versioned state bytes
    PUT    /v1/streams/{id}/state        restore such bytes
    POST   /v1/forward                   {"x": (B, T, F) or (B, T) ids, "lengths"?} or .npy -> y (and state)
    WS     /v1/streams/{id}/ws           step messages and "generate"
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anyio
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..generate import check_language_model, check_sampling
from ..stream import check_streamable
from .metrics import Metrics
from .store import StreamError, StreamStore
from .wal import MAX_LOG_BYTES
from .wire import NPY, Inputs, array_from_json, check_position, parse_json, parse_npy, to_npy

log = logging.getLogger("lstm_engine.serve")

_GENERATE_FIELDS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
# The two routes every step takes, answered by plain ASGI (the rest go through Starlette's router): at
# one step a request, Starlette's middleware, router, Request and Response cost ~100 us a request, three
# times the pool's whole work for the step (measured in benches/serve_load.py).
_STEP_PATH = re.compile(r"/v1/streams/([^/]+)/step")
_WS_PATH = re.compile(r"/v1/streams/([^/]+)/ws")


@dataclass
class Limits:
    """What one request or one token may ask for."""

    max_body: int = 16 << 20  # bytes of a request body or WebSocket message
    max_chunk: int = 4096  # steps in one request (and tokens in one generate)
    max_streams_per_token: int = 1000
    rate: float = 1000.0  # requests (and messages) per second per token; 0: no limit
    max_queue: int = 1024  # step requests waiting or running at once; beyond it: 503
    max_waiting_per_stream: int = 64  # requests queued on one stream; beyond it: 429
    max_connections: int = 2048


def read_tokens(path: str) -> dict[str, str]:
    """The token file: one token per line ('#' comments, blank lines ignored) -> {sha256: owner id}."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    tokens = [line for line in lines if line and not line.startswith("#")]
    if not tokens:
        raise ValueError(f"{path}: no tokens (expected one token per line)")
    for i, token in enumerate(tokens):
        if len(token) < 16 or any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError(f"{path}: token {i + 1} must be at least 16 printable characters without spaces")
    # Only digests are kept: the owner recorded in a state file is not a usable token.
    digests = {hashlib.sha256(t.encode()).hexdigest() for t in tokens}
    return {d: d[:32] for d in digests}


class TokenFile:
    """The token file, read again when it changes (its mtime, size or inode), or on ``reload(force=True)``.

    A token's owner id comes from its digest, so a token taken out and put back finds its streams
    again. A file that cannot be read, or holds no valid token, leaves the tokens as they were (an
    editor's half-written file must not lock everyone out), with a warning in the log.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.signature = self._signature()
        self.tokens = read_tokens(path)

    def _signature(self) -> tuple:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self, force: bool = False) -> bool:
        """Read the file again if it changed (or force); True when the tokens were replaced."""
        try:
            signature = self._signature()
            if signature == self.signature and not force:
                return False
            tokens = read_tokens(self.path)
        except (OSError, ValueError) as exc:
            log.warning("token file not reloaded, the previous tokens stay: %s", exc)
            return False
        self.signature = signature
        if tokens != self.tokens:
            log.warning("token file %s reloaded: %d tokens", self.path, len(tokens))
        self.tokens = tokens
        return True


def _error(status: int, code: str, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="lstm-engine"'}
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


class _Busy(StreamError):
    def __init__(self, status: int, code: str, message: str, retry_after: float) -> None:
        super().__init__(status, code, message)
        self.retry_after = retry_after


def _shutting_down() -> _Busy:
    return _Busy(503, "shutting_down", "the server is shutting down; retry on its successor", 1)


class Server:
    """One model's streams served over HTTP and WebSocket. ``app`` is the ASGI application.

    ``POST /v1/streams/{id}/step`` and ``WS /v1/streams/{id}/ws`` are served as plain ASGI, the other
    routes by Starlette.
    """

    def __init__(self, model: Any, *, max_batch: int = 64, idle_timeout: float = 600.0, state_dir: str | None = None,
                 tokens: dict[str, str] | None = None, token_file: str | None = None, limits: Limits | None = None,
                 dtype: Any = None, max_log_bytes: int = MAX_LOG_BYTES) -> None:
        """``tokens`` ({sha256 hex digest: owner}) or ``token_file`` (reloaded when it changes, and on SIGHUP);
        ``max_log_bytes``: the state directory's log size past which its states go to checkpoint files."""
        self.model = model
        self.limits = limits or Limits()
        self.token_file = TokenFile(token_file) if token_file is not None else None
        self.tokens = self.token_file.tokens if self.token_file is not None else tokens
        self.owners = None if self.tokens is None else set(self.tokens.values())
        try:
            check_streamable(model, "streams")
        except ValueError as exc:
            # A bidirectional or backwards model still serves whole sequences.
            self.pool = self.store = _NoStreams(model, dtype, str(exc))
            self.metrics = Metrics(self.pool)
        else:
            self.pool = model.pool(max_batch=max_batch, dtype=dtype)
            self.metrics = Metrics(self.pool)
            try:
                self.store = StreamStore(model, self.pool, state_dir=state_dir, idle_timeout=idle_timeout,
                                         max_streams_per_owner=self.limits.max_streams_per_token,
                                         on_step=self.metrics.observe_step, max_log_bytes=max_log_bytes)
            except BaseException:
                self.pool.close()
                raise
        self.metrics.store = self.store
        self.inputs = Inputs(model, self.pool.dtype, self.limits.max_chunk)
        self.buckets: dict[str, list[float]] = {}
        self.inflight = 0
        self.closing = False  # set when the shutdown begins: new work is refused while the work begun ends
        self.forward_limiter = anyio.CapacityLimiter(1)
        self.forward_waiting = 0
        self.started = time.time()
        routes = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/v1/model", self.model_info, methods=["GET"]),
            Route("/v1/streams", self.create, methods=["POST"]),
            Route("/v1/streams/{id}", self.info, methods=["GET"]),
            Route("/v1/streams/{id}", self.delete, methods=["DELETE"]),
            Route("/v1/streams/{id}/state", self.get_state, methods=["GET"]),
            Route("/v1/streams/{id}/state", self.put_state, methods=["PUT"]),
            Route("/v1/forward", self.forward, methods=["POST"]),
        ]
        self.starlette = Starlette(routes=routes, lifespan=self._lifespan,
                                   exception_handlers={HTTPException: self._http_exception, Exception: self._crash})

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        """The ASGI application."""
        kind = scope["type"]
        if kind == "http":
            match = _STEP_PATH.fullmatch(scope["path"])
            if match is not None:
                return await self._http_step(scope, receive, send, match.group(1))
        elif kind == "websocket":
            match = _WS_PATH.fullmatch(scope["path"])
            if match is not None:
                return await self._websocket(scope, receive, send, match.group(1))
        await self.starlette(scope, receive, send)

    # -- life ------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any):
        task = asyncio.create_task(self._housekeeping())
        hangup = False
        if self.token_file is not None and hasattr(signal, "SIGHUP"):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_tokens, True)
                hangup = True
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await self._drain()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.close()

    async def _drain(self, timeout: float = 10.0) -> None:
        """Refuse new work and wait (at most ``timeout`` s) for the work begun to end, before the pool closes.

        uvicorn waits for its connections' tasks before the lifespan's shutdown; granian starts the shutdown
        at once, with WebSockets still open and stepping (their next step would find the pool closed).
        """
        self.closing = True
        deadline = time.monotonic() + timeout
        while self.inflight or any(e.waiting for e in self.store.entries.values()):
            if time.monotonic() > deadline:
                log.warning("shutting down with %d step requests still running", self.inflight)
                return
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Stop the state log (folding it into checkpoints) and the pool (every answered step is already on disk)."""
        self.store.close()
        self.pool.close()

    async def _housekeeping(self) -> None:
        every = max(0.05, min(1.0, self.store.idle_timeout / 4))
        while True:
            await asyncio.sleep(every)
            self.metrics.sample()
            self.store.evict_idle()
            self.reload_tokens()

    def reload_tokens(self, force: bool = False) -> None:
        """Take the token file's tokens if it changed: new tokens work at once, removed ones get 401 (their
        open WebSockets included), and their streams wait for the token to come back."""
        if self.token_file is None or not self.token_file.reload(force):
            return
        self.tokens = self.token_file.tokens
        self.owners = set(self.tokens.values())
        for owner in list(self.buckets):
            if owner not in self.owners:
                del self.buckets[owner]

    # -- shared checks ---------------------------------------------------------------------------
    def _owner(self, headers: Any) -> str:
        if self.tokens is None:
            return ""
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise StreamError(401, "missing_token", "this server needs 'Authorization: Bearer <token>'")
        owner = self.tokens.get(hashlib.sha256(token.strip().encode()).hexdigest())
        if owner is None:
            raise StreamError(401, "bad_token", "the bearer token is not one of this server's")
        self._rate(owner)
        return owner

    def _rate(self, owner: str) -> None:
        """A token bucket per owner: ``rate`` requests a second, bursts of one second's worth."""
        rate = self.limits.rate
        if not rate:
            return
        now = time.monotonic()
        bucket = self.buckets.get(owner)
        if bucket is None:
            bucket = self.buckets[owner] = [rate, now]
        bucket[0] = min(rate, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1:
            raise _Busy(429, "rate_limited", f"more than {rate:g} requests a second for this token",
                        (1 - bucket[0]) / rate)
        bucket[0] -= 1

    def _admit(self, entry: Any) -> None:
        if self.closing:
            raise _shutting_down()
        if self.inflight >= self.limits.max_queue:
            raise _Busy(503, "overloaded", f"the server has {self.inflight} step requests queued, its limit; "
                                           "retry later", 1)
        if entry.waiting >= self.limits.max_waiting_per_stream:
            raise _Busy(429, "stream_busy", f"{entry.waiting} requests are already queued on this stream", 1)

    async def _body(self, request: Request) -> bytes:
        return await self._read_body(request.headers, request.receive)

    async def _read_body(self, headers: Any, receive: Any) -> bytes:
        """The request's body (ASGI messages), refused with 413 past the body limit."""
        limit = self.limits.max_body
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise StreamError(400, "bad_length", f"Content-Length: expected a number of bytes, got {length!r}")
            if int(length) > limit:
                raise StreamError(413, "body_too_large", f"the body has {length} bytes; the limit is {limit}")
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise StreamError(400, "incomplete_body", "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise StreamError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    def _is_npy(headers: Any) -> bool:
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype == NPY:
            return True
        if ctype not in ("application/json", ""):
            raise StreamError(415, "bad_content_type", f"Content-Type {ctype!r}: expected application/json or {NPY}")
        return False

    def _steps(self, body: bytes, npy: bool, what: str = "x") -> tuple[np.ndarray, bool, int | None]:
        if npy:
            steps, single = self.inputs.from_npy(parse_npy(body), what)
            return steps, single, None
        obj = parse_json(body)
        _fields(obj, {"x", "at"})
        if "x" not in obj:
            raise StreamError(422, "missing_field", f"x: missing; expected {self.inputs.describe()}")
        steps, single = self.inputs.from_json(obj["x"], body)
        return steps, single, check_position(obj.get("at"))


    async def _answer(self, route: str, request: Request, handler: Any) -> Response:
        """Run a handler, turning refusals into their JSON errors and counting both."""
        try:
            if self.closing:
                raise _shutting_down()
            response = await handler(request)
        except StreamError as exc:
            response = _error(exc.status, exc.code, exc.message, getattr(exc, "retry_after", None))
        self.metrics.observe_request(route, response.status_code, None)
        return response

    # -- endpoints -------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "streams": len(self.store.entries), "in_pool": self.store.resident,
                             "requests_in_flight": self.inflight, "uptime_s": round(time.time() - self.started, 3)})

    async def metrics_text(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request.headers)
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

        return await self._answer("metrics", request, handle)

    async def model_info(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request.headers)
            m = self.model
            return JSONResponse({
                "input": "token ids" if m.takes_ids else "floats",
                "input_size": m.input_size,
                "vocab_size": self.inputs.vocab if m.takes_ids else None,
                "output_size": self.store.output_size,
                "dtype": str(self.pool.dtype),
                "max_chunk": self.limits.max_chunk,
                "metadata": {k: v for k, v in m.metadata.items() if isinstance(v, (str, int, float, bool))},
            })

        return await self._answer("model", request, handle)

    async def create(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            owner = self._owner(request.headers)
            if await self._body(request):
                raise StreamError(422, "unexpected_body", "POST /v1/streams takes no body; restore a state with "
                                                          "PUT /v1/streams/{id}/state")
            entry = await self.store.create(owner)
            return JSONResponse({"id": entry.id, "position": 0}, 201)

        return await self._answer("create", request, handle)

    async def info(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            entry = self.store.get(request.path_params["id"], self._owner(request.headers))
            return JSONResponse({"id": entry.id, "position": entry.position, "in_pool": entry.stream is not None})

        return await self._answer("info", request, handle)

    async def delete(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            entry = self.store.get(request.path_params["id"], self._owner(request.headers))
            await self.store.locked(entry, self.store.delete)
            return Response(status_code=204)

        return await self._answer("delete", request, handle)

    async def _http_step(self, scope: dict, receive: Any, send: Any, stream_id: str) -> None:
        """POST /v1/streams/{id}/step: one step or a chunk, JSON or .npy."""
        t0 = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["method"] != "POST":
                raise StreamError(405, "method_not_allowed", f"{scope['method']} {scope['path']}: Method Not Allowed")
            entry = self.store.get(stream_id, self._owner(headers))
            npy = self._is_npy(headers)
            steps, single, at = self._steps(await self._read_body(headers, receive), npy)
            if npy and scope["query_string"]:
                query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
                if "at" in query:
                    at = check_position(_int(query["at"], "at"))
            y, position = await self._queued(entry, self.store.run_steps, steps, at)
            y = y[0] if single else y
            if npy or NPY in headers.get("accept", ""):
                body, ctype = to_npy(y), NPY.encode()
            else:
                body, ctype = _outputs_json(y, position), b"application/json"
        except StreamError as exc:
            response = _error(exc.status, exc.code, exc.message, getattr(exc, "retry_after", None))
            if exc.status == 405:
                response.headers["Allow"] = "POST"
            self.metrics.observe_request("step", exc.status, time.perf_counter() - t0)
            return await response(scope, receive, send)
        except Exception as exc:
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            self.metrics.observe_request("step", 500, None)
            return await _error(500, "internal_error", f"the server failed on this request: {type(exc).__name__}")(
                scope, receive, send)
        self.metrics.observe_request("step", 200, time.perf_counter() - t0)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                (b"x-stream-position", str(position).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _queued(self, entry: Any, work: Any, *args: Any) -> Any:
        self._admit(entry)
        self.inflight += 1
        try:
            return await self.store.locked(entry, work, *args)
        finally:
            self.inflight -= 1

    async def get_state(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            entry = self.store.get(request.path_params["id"], self._owner(request.headers))
            blob = await self.store.locked(entry, self.store.export_state)
            return Response(blob, media_type="application/octet-stream",
                            headers={"X-Stream-Position": str(entry.position)})

        return await self._answer("state", request, handle)

    async def put_state(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            entry = self.store.get(request.path_params["id"], self._owner(request.headers))
            blob = await self._body(request)
            position = await self._queued(entry, self.store.import_state, blob)
            return JSONResponse({"id": entry.id, "position": position})

        return await self._answer("state", request, handle)

    async def forward(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request.headers)
            npy = self._is_npy(request.headers)
            body = await self._body(request)
            lengths = None
            if npy:
                x = parse_npy(body)
            else:
                obj = parse_json(body)
                _fields(obj, {"x", "lengths"})
                if "x" not in obj:
                    raise StreamError(422, "missing_field", "x: missing; expected (batch, steps, features) numbers "
                                                            "or (batch, steps) token ids")
                x = array_from_json(obj["x"], body, "x")
                if obj.get("lengths") is not None:
                    lengths = array_from_json(obj["lengths"], body, "lengths")
            if x.ndim < 2 or x.shape[0] * x.shape[1] > self.limits.max_chunk * 64 or x.shape[1] > self.limits.max_chunk:
                raise StreamError(422, "bad_shape", f"x: expected (batch, steps, ...) with steps <= "
                                                    f"{self.limits.max_chunk} and batch x steps <= "
                                                    f"{self.limits.max_chunk * 64}, got shape {x.shape}")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise StreamError(422, "not_finite", "x: every value must be finite (no NaN or infinity)")
            if self.forward_waiting >= 16:
                raise _Busy(503, "overloaded", "too many forward requests are waiting; retry later", 1)
            self.forward_waiting += 1
            try:
                y, state = await anyio.to_thread.run_sync(self._run_forward, x, lengths, not npy,
                                                          limiter=self.forward_limiter)
            finally:
                self.forward_waiting -= 1
            if npy or NPY in request.headers.get("accept", ""):
                return Response(to_npy(y), media_type=NPY)
            return JSONResponse({"y": y.tolist(), "state": [[a.tolist() for a in entry] for entry in state]})

        return await self._answer("forward", request, handle)

    def _run_forward(self, x: np.ndarray, lengths: Any, cast: bool) -> tuple:
        try:
            return self.model.forward(x, lengths, cast=cast)
        except (ValueError, TypeError) as exc:
            raise StreamError(422, "bad_input", str(exc)) from None

    # -- WebSocket -------------------------------------------------------------------------------
    async def _websocket(self, scope: dict, receive: Any, send: Any, stream_id: str) -> None:
        """WS /v1/streams/{id}/ws: step messages answered in order, and generate."""
        if (await receive())["type"] != "websocket.connect":
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            owner = self._owner(headers)
            entry = self.store.get(stream_id, owner)
        except StreamError as exc:
            self.metrics.observe_request("ws", exc.status, None)
            if "websocket.http.response" in scope.get("extensions", {}):
                await _error(exc.status, exc.code, exc.message)(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 4000 + exc.status, "reason": exc.code})
            return
        await send({"type": "websocket.accept"})

        async def send_text(text: str) -> None:
            await send({"type": "websocket.send", "text": text})

        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    return  # websocket.disconnect
                t0 = time.perf_counter()
                if self.closing:
                    await send({"type": "websocket.close", "code": 1012, "reason": "shutting_down"})
                    return
                if len(message.get("bytes") or message.get("text") or "") > self.limits.max_body:
                    # uvicorn refuses such a message itself (ws_max_size); granian hands it over.
                    self.metrics.observe_request("ws", 413, None)
                    await send({"type": "websocket.close", "code": 1009, "reason": "message_too_big"})
                    return
                status = 200
                if self.owners is not None and owner not in self.owners:
                    self.metrics.observe_request("ws", 401, None)
                    await send_text(_dumps({"error": {"code": "bad_token", "message": "the bearer token was revoked"},
                                            "status": 401}))
                    await send({"type": "websocket.close", "code": 4401, "reason": "bad_token"})
                    return
                try:
                    if self.limits.rate and self.tokens is not None:
                        self._rate(owner)
                    await self._ws_message(send, send_text, entry, message)
                except StreamError as exc:
                    status = exc.status
                    reply: dict = {"error": {"code": exc.code, "message": exc.message}, "status": exc.status}
                    if isinstance(exc, _Busy):
                        reply["retry_after"] = exc.retry_after
                    await send_text(_dumps(reply))
                self.metrics.observe_request("ws", status, time.perf_counter() - t0)
        except OSError:
            return  # the client went away (uvicorn's ClientDisconnected) while it was being answered

    async def _ws_message(self, send: Any, send_text: Any, entry: Any, message: dict) -> None:
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            steps, single = self.inputs.from_npy(parse_npy(data))
            y, position = await self._queued(entry, self.store.run_steps, steps, None)
            await send({"type": "websocket.send", "bytes": to_npy(y[0] if single else y)})
            return
        obj = parse_json(text or "")
        if "generate" in obj:
            _fields(obj, {"generate"})
            await self._generate(send_text, entry, obj["generate"])
            return
        _fields(obj, {"x", "at"})
        if "x" not in obj:
            raise StreamError(422, "missing_field", f"x: missing; expected {self.inputs.describe()} "
                                                    "(or a 'generate' request)")
        steps, single = self.inputs.from_json(obj["x"], text)
        y, position = await self._queued(entry, self.store.run_steps, steps, check_position(obj.get("at")))
        await send_text(_outputs_json(y[0] if single else y, position).decode())

    async def _generate(self, send_text: Any, entry: Any, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise StreamError(422, "bad_field", "generate: expected an object {prompt, max_new_tokens, temperature, "
                                                "top_k, top_p, seed}")
        _fields(spec, _GENERATE_FIELDS, "generate.")
        try:
            log_probs = check_language_model(self.model, self.store.output_size)
            sampling = check_sampling(spec.get("max_new_tokens", 100), spec.get("temperature", 1.0),
                                      spec.get("top_k"), spec.get("top_p"), spec.get("seed"))
        except ValueError as exc:
            raise StreamError(422, "bad_field", f"generate.{exc}") from None
        if sampling[0] > self.limits.max_chunk:
            raise StreamError(422, "bad_field", f"generate.max_new_tokens: at most {self.limits.max_chunk}, "
                                                f"got {sampling[0]}")
        if "prompt" not in spec:
            raise StreamError(422, "missing_field", "generate.prompt: missing; expected the token ids to start from")
        # json, not orjson: a prompt parsed by json's fallback may hold integers past 64 bits.
        prompt, _ = self.inputs.from_json(spec["prompt"], json.dumps(spec["prompt"]), "generate.prompt")

        async def send(token: int, position: int) -> None:
            await send_text(_dumps({"token": token, "position": position}))

        tokens = await self._queued(entry, self.store.generate, prompt, sampling, log_probs, send)
        await send_text(_dumps({"done": True, "tokens": tokens, "position": entry.position}))

    # -- errors Starlette raises itself ----------------------------------------------------------
    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        codes = {404: "no_such_route", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"),
                      f"{request.method} {request.url.path}: {exc.detail}")

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, "internal_error", f"the server failed on this request: {type(exc).__name__}")


class _NoStreams:
    """The pool and the store of a model that cannot stream: every stream route answers why; forward works."""

    stats = {"steps": 0, "batches": 0}
    resident = evictions = 0
    idle_timeout = 600.0

    def __init__(self, model: Any, dtype: Any, reason: str) -> None:
        self.dtype = model.dtype if dtype is None else np.dtype(dtype)
        self.output_size = model.output_size
        self.reason = reason
        self.entries: dict = {}

    def get(self, *args: Any) -> Any:
        raise StreamError(422, "not_streamable", f"{self.reason}; this server answers POST /v1/forward only")

    async def create(self, owner: str) -> Any:
        return self.get()

    def evict_idle(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _fields(obj: dict, allowed: set, prefix: str = "") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise StreamError(422, "unknown_field", f"{prefix}{unknown[0]}: not a field here; expected "
                                                f"{', '.join(prefix + a for a in sorted(allowed))}")


def _int(text: str, what: str) -> int:
    if not text.isdigit():
        raise StreamError(422, "bad_field", f"{what}: expected an integer >= 0, got {text!r}")
    return int(text)


def _dumps(value: Any) -> str:
    """Compact JSON text (orjson: ~30x faster than json for a step's outputs)."""
    return orjson.dumps(value).decode()


def _outputs_json(y: np.ndarray, position: int) -> bytes:
    """A step's answer: its outputs as the numbers json writes for y.tolist() (each float32 as the double it is)."""
    if np.isfinite(y).all():
        return orjson.dumps({"y": y.tolist(), "position": position})
    # orjson writes NaN and infinities as null: a client must see what the model gave, as json writes it.
    return json.dumps({"y": y.tolist(), "position": position}, separators=(",", ":")).encode()
