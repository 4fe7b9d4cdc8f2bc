"""Load test of `lstm-engine serve`: many concurrent streams stepping as fast as they can, on loopback.

    pip install ".[serve,bench]"
    python benches/serve_load.py                       # 200 streams of an LSTM 256 x2, 20 s a phase
    python benches/serve_load.py --seconds 300         # the 5-minute run (RSS flat?)
    python benches/serve_load.py --streams 50 --body json

Phases, in one run: the in-process pool ceiling (asyncio tasks stepping their own streams of
model.pool()), the server over HTTP keep-alive (one connection per stream), the server over
WebSocket (one connection per stream), the in-process ceiling again. ``--empty-server`` adds the
same two client phases against an ASGI app that answers the same requests with fixed bytes, under
the server's own settings (lstm_engine.serve.run): the ceiling of the ASGI stack itself on this machine.
``--rounds N`` repeats the server phases, interleaved, with the load average on every row;
``--baseline DIR`` adds the server of another built checkout to each round (an A/B of the server's code
under the same load); ``--server uvicorn,granian`` runs every app under each HTTP server in the same rounds.
Each prints aggregate steps/s, the ratio to the in-process ceiling, and client-side p50/p99 latency per step, then what the targets allow each step (print_bounds); the
server's RSS is sampled through the run. The clients run in --client-procs processes on the same machine (they
compete with the server for its cores: on a 2-core machine that bounds what the server can show).
Everything is bounded: the streams (<= 1000), each phase's seconds, and the server is killed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pool import build  # noqa: E402

import lstm_engine as le  # noqa: E402
from lstm_engine.serve import SWITCH_INTERVAL  # noqa: E402

WARMUP = 2.0  # seconds before each phase's window opens


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _window(seconds: float) -> tuple[float, float]:
    t0 = time.perf_counter() + WARMUP
    return t0, t0 + seconds


def _summary(latencies: list, steps: int, seconds: float) -> dict:
    lat = np.concatenate([np.asarray(x) for x in latencies]) if latencies else np.zeros(1)
    return {"steps_s": steps / seconds, "p50": float(np.quantile(lat, 0.5)), "p99": float(np.quantile(lat, 0.99))}


class _Tally:
    """Steps and latencies of n streams inside the measured window (after WARMUP, for `seconds`)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.start, self.end = _window(seconds)
        self.counts, self.lats, self.errors, self.total = [0] * n, [[] for _ in range(n)], 0, 0

    async def drive(self, k: int, step) -> None:
        """Call ``await step()`` (True when answered with outputs) until the window closes."""
        while True:
            t0 = time.perf_counter()
            if t0 >= self.end:
                return
            ok = await step()
            t1 = time.perf_counter()
            if not ok:
                self.errors += 1
                continue
            self.total += 1
            if t0 >= self.start:
                self.counts[k] += 1
                self.lats[k].append(t1 - t0)

    def result(self) -> dict:
        return {"steps": sum(self.counts), "lats": np.concatenate([np.asarray(x) for x in self.lats]),
                "errors": self.errors, "total": self.total}


# -- in-process ------------------------------------------------------------------------------------

def in_process(model: le.Model, streams: int, seconds: float, max_batch: int) -> dict:
    xs = np.random.default_rng(0).standard_normal((streams, model.input_size)).astype(np.float32)

    async def main() -> dict:
        tally = _Tally(streams, seconds)
        with model.pool(max_batch=max_batch) as pool:
            async def one(k: int) -> None:
                with pool.open() as s:
                    async def step() -> bool:
                        await s.astep(xs[k])
                        return True

                    await tally.drive(k, step)

            await asyncio.gather(*(one(k) for k in range(streams)))
            stats = pool.stats
        r = tally.result()
        summary = _summary([r["lats"]], r["steps"], seconds)
        summary["total"] = r["total"]
        summary["batch"] = stats["steps"] / max(1, stats["batches"])
        return summary

    # The server's GIL switch interval, for the same handoffs between the event loop and the pool's worker.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    cpu, wall = time.process_time(), time.monotonic()
    try:
        summary = _run_loop(main())
    finally:
        sys.setswitchinterval(switch)
    cpu = time.process_time() - cpu
    summary["cpu_us"] = cpu / summary["total"] * 1e6
    summary["cores"] = cpu / (time.monotonic() - wall)
    return summary


# -- clients (in their own processes) -------------------------------------------------------------
# The load generator must cost far less than the server, or it measures itself: aiohttp's client took
# ~200 us of CPU a request here and websockets' ~80 us a message, as much as the server's whole work.
# So the clients speak the two protocols directly over asyncio (uvloop when installed): each request's
# bytes are built once, and an answer is read by its length (HTTP/1.1 keep-alive, one connection per
# stream, like wrk) or its frame header (WebSocket, binary frames with a zero mask key, RFC 6455 5.3).

class _Conn(asyncio.Protocol):
    """One keep-alive connection: send prepared bytes, wait for one complete answer."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.ws = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        answer = self._frame() if self.ws else self._response()
        if answer is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _response(self):
        """(status, body) once a whole HTTP response is buffered."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).lower()
        length, i = 0, head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17:j if j >= 0 else None])
        if len(self.buf) < end + 4 + length:
            return None
        body = bytes(self.buf[end + 4:end + 4 + length])
        status = int(head[9:12])
        del self.buf[:end + 4 + length]
        return status, body

    def _frame(self):
        """(opcode, payload) of the first whole WebSocket frame buffered; pings are answered here."""
        while len(self.buf) >= 2:
            opcode, n, at = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return None
                n, at = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    return None
                n, at = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < at + n:
                return None
            payload = bytes(self.buf[at:at + n])
            del self.buf[:at + n]
            if opcode == 0x9:
                self.transport.write(_ws_frame(payload, 0xA))
                continue
            return opcode, payload
        return None

    async def ask(self, data: bytes):
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def _ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A final client frame; the zero mask key leaves the payload as it is."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 \
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + size + b"\0\0\0\0" + payload


def _http_request(method: str, path: str, body: bytes = b"", ctype: str = "application/x-npy") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += f"Content-Type: {ctype}\r\n"
    return (head + "\r\n").encode() + body


async def _connect(host: str, port: int) -> _Conn:
    _, conn = await asyncio.get_running_loop().create_connection(_Conn, host, port)
    return conn


async def _open_streams(host: str, port: int, n: int) -> list[str]:
    import json

    conn = await _connect(host, port)
    ids = []
    for _ in range(n):
        status, body = await conn.ask(_http_request("POST", "/v1/streams"))
        if status != 201:
            raise RuntimeError(f"POST /v1/streams: {status} {body[:200]!r}")
        ids.append(json.loads(body)["id"])
    conn.transport.close()
    return ids


def _message(x: np.ndarray, body: str) -> tuple[bytes, str]:
    if body == "npy":
        return _npy(x), "application/x-npy"
    return ('{"x":[' + ",".join(map(repr, x.tolist())) + "]}").encode(), "application/json"


async def _http_streams(host: str, port: int, n: int, seconds: float, body: str, input_size: int) -> dict:
    xs = np.random.default_rng(os.getpid()).standard_normal((n, input_size)).astype(np.float32)
    ids = await _open_streams(host, port, n)
    tally = _Tally(n, seconds)

    async def one(k: int) -> None:
        conn = await _connect(host, port)
        request = _http_request("POST", f"/v1/streams/{ids[k]}/step", *_message(xs[k], body))

        async def step() -> bool:
            status, _ = await conn.ask(request)
            return status == 200

        await tally.drive(k, step)
        await conn.ask(_http_request("DELETE", f"/v1/streams/{ids[k]}"))
        conn.transport.close()

    await asyncio.gather(*(one(k) for k in range(n)))
    return tally.result()


async def _ws_streams(host: str, port: int, n: int, seconds: float, body: str, input_size: int) -> dict:
    import base64

    xs = np.random.default_rng(os.getpid()).standard_normal((n, input_size)).astype(np.float32)
    ids = await _open_streams(host, port, n)
    tally = _Tally(n, seconds)

    async def one(k: int) -> None:
        conn = await _connect(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        status, _ = await conn.ask((f"GET /v1/streams/{ids[k]}/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                    "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        if status != 101:
            raise RuntimeError(f"WebSocket handshake: {status}")
        conn.ws = True
        data, _ = _message(xs[k], body)
        frame = _ws_frame(data, 0x2 if body == "npy" else 0x1)

        async def step() -> bool:
            opcode, payload = await conn.ask(frame)
            return opcode == 0x2 or (opcode == 0x1 and b'"error"' not in payload)

        await tally.drive(k, step)
        conn.transport.write(_ws_frame(b"\x03\xe8", 0x8))  # close, 1000
        conn.transport.close()

    await asyncio.gather(*(one(k) for k in range(n)))
    return tally.result()


def _run_loop(coro):
    """asyncio.run on uvloop when it is installed: the loop the server runs on (uvicorn's choice)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _client(kind: str, url: str, n: int, seconds: float, body: str, input_size: int, conn) -> None:
    run = _http_streams if kind == "http" else _ws_streams
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    try:
        cpu = time.process_time()
        result = _run_loop(run(host, int(port), n, seconds, body, input_size))
        result["cpu"] = time.process_time() - cpu
        conn.send(result)
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"failed": f"{type(exc).__name__}: {exc}"})


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """A process's CPU time (user + system), or one of its threads' (the main thread's id is the pid)."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def over_network(kind: str, url: str, streams: int, procs: int, seconds: float, body: str, input_size: int,
                 server_pid: int) -> dict:
    server_cpu, loop_cpu, wall = _cpu_seconds(server_pid), _cpu_seconds(server_pid, server_pid), time.monotonic()
    pool_before = _pool_totals(url)
    ctx = mp.get_context("spawn")
    shares = [streams // procs + (i < streams % procs) for i in range(procs)]
    pipes, workers = [], []
    for n in shares:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client, args=(kind, url, n, seconds, body, input_size, child), daemon=True)
        p.start()
        pipes.append(parent)
        workers.append(p)
    results = []
    deadline = time.monotonic() + seconds + WARMUP + 120
    for parent, p in zip(pipes, workers):
        if not parent.poll(max(1.0, deadline - time.monotonic())):
            raise RuntimeError(f"a {kind} client did not finish in time")
        results.append(parent.recv())
        p.join(30)
    for r in results:
        if "failed" in r:
            raise RuntimeError(f"{kind} client: {r['failed']}")
    summary = _summary([r["lats"] for r in results], sum(r["steps"] for r in results), seconds)
    summary["errors"] = sum(r["errors"] for r in results)
    total = sum(r["total"] for r in results)
    server_cpu = _cpu_seconds(server_pid) - server_cpu
    loop_cpu = _cpu_seconds(server_pid, server_pid) - loop_cpu  # the event loop's thread: uvicorn and the handlers
    client_cpu = sum(r["cpu"] for r in results)
    wall = time.monotonic() - wall
    summary["cpu_us"] = server_cpu / total * 1e6
    summary["client_cpu_us"] = client_cpu / total * 1e6
    summary["loop_cpu_us"] = loop_cpu / total * 1e6
    # How much of the machine's cores each side took over the phase (the clients share them with the server).
    summary["cores"], summary["client_cores"] = server_cpu / wall, client_cpu / wall
    pool_after = _pool_totals(url)
    summary["batch"] = (pool_after[0] - pool_before[0]) / max(1, pool_after[1] - pool_before[1])
    return summary


def _pool_totals(url: str) -> tuple[float, float]:
    """The server pool's steps and batches so far, from /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return tuple(float(re.search(rf"^lstm_engine_pool_{name}_total (\S+)", text, re.M).group(1))
                 for name in ("steps", "batches"))


# -- the empty server -------------------------------------------------------------------------------
# What the HTTP server costs without the engine: the same routes and answer sizes (a .npy of output_size float32s),
# no pool, no store, no checks. Served by lstm_engine.serve.run, so the loop, the protocols, the limits and
# the GIL switch interval are the server's.

def empty_app(output_size: int):
    import json

    answer = _npy(np.zeros(output_size, np.float32))
    npy_headers = [(b"content-type", b"application/x-npy"), (b"content-length", str(len(answer)).encode()),
                   (b"x-stream-position", b"1")]
    metrics = b"lstm_engine_pool_steps_total 0\nlstm_engine_pool_batches_total 0\n"

    async def read_body(receive) -> bytes:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)

    async def reply(send, status: int, body: bytes, headers: list) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "bytes": answer})
            return
        await read_body(receive)
        path, method = scope["path"], scope["method"]
        if path.endswith("/step"):
            await reply(send, 200, answer, npy_headers)
        elif path == "/v1/streams":
            body = json.dumps({"id": os.urandom(16).hex(), "position": 0}).encode()
            await reply(send, 201, body, [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())])
        elif path == "/metrics":
            await reply(send, 200, metrics, [(b"content-length", str(len(metrics)).encode())])
        else:
            await reply(send, 204 if method == "DELETE" else 404, b"", [])

    return app


def serve_empty(output_size: int, http_server: str) -> None:
    import types

    from lstm_engine.serve import Limits, bind, run

    sock = bind("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    limits = Limits(max_queue=4096)
    run(types.SimpleNamespace(app=empty_app(output_size), limits=limits), sock, http_server=http_server,
        on_ready=lambda: print(f"empty server listening on http://{host}:{port}", file=sys.stderr, flush=True))


# -- the server ------------------------------------------------------------------------------------

class ServerProcess:
    def __init__(self, command: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.url = None
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
                elif line.strip():
                    print("  server:", line.rstrip(), file=sys.stderr)
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start")
        self.rss: list[tuple[float, float]] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            try:
                with open(f"/proc/{self.proc.pid}/status") as f:
                    kb = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
            except (OSError, AttributeError):
                return
            self.rss.append((time.monotonic() - self.t0, kb / 1024))

    def stop(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


# Issue 15's targets: the server's steps/s as a share of the in-process pool's, per way.
TARGETS = {"HTTP keep-alive": 0.50, "WebSocket": 0.70}


def bound(ceiling: float, share: float, cores: int, client_us: float, pool_us: float) -> dict:
    """What a target allows each step, if server, pool and clients had the machine's cores to themselves.

    At ``share`` of the in-process pool's ``ceiling`` steps/s the machine has ``cores`` x 1e6 / rate core-us a
    step; the clients take ``client_us`` of it and the server's pool (its worker and kernel threads, at the
    batch sizes the server saw) ``pool_us``; what is left is the event loop's thread's, which, one thread,
    also gets at most one core: 1e6 / rate us a step.
    """
    rate = share * ceiling
    machine = cores * 1e6 / rate
    server = machine - client_us
    return {"rate": rate, "machine": machine, "server": server, "loop": min(1e6 / rate, server - pool_us)}


def print_bounds(rows: list, pools: list) -> None:
    """For each server row, the arithmetic of its target from figures measured in this run.

    Twice: with every core of the machine (what the target needs on a machine of one's own), and with the
    cores the server and its clients got in that phase (what it needed in this run, others' jobs included).
    """
    cores = os.cpu_count() or 1
    printed = False
    for i, (name, r) in enumerate(rows):
        label, _, way = name.partition(", ")
        if not label.startswith("server") or way not in TARGETS:
            continue
        before, after = max(p for p in pools if p <= i), min(p for p in pools if p >= i)
        ceiling = (rows[before][1]["steps_s"] + rows[after][1]["steps_s"]) / 2
        pool_inproc = (rows[before][1]["cpu_us"] + rows[after][1]["cpu_us"]) / 2
        pool_us = r["cpu_us"] - r["loop_cpu_us"]  # the server's other threads: the pool's worker and kernels
        if not printed:
            print("# What the targets allow a step (core-us, from this run's figures; 'pool': the server's threads "
                  "other than the event loop's, at the batch sizes it saw, the in-process pool's whole process in "
                  "brackets; the loop thread also gets at most one core):")
            printed = True
        rate = TARGETS[way] * ceiling
        print(f"#   {way} {TARGETS[way]:.0%} of {ceiling:,.0f} = {rate:,.0f} steps/s; "
              f"clients {r['client_cpu_us']:.0f}, pool {pool_us:.0f} at batch {r['batch']:.1f} "
              f"[{pool_inproc:.0f} at {rows[before][1]['batch']:.1f}], load {r['load']:.1f}:")
        for what, n in ((f"all {cores} cores", cores), (f"the {r['cores'] + r['client_cores']:.2f} cores server and "
                                                        "clients got", r["cores"] + r["client_cores"])):
            b = bound(ceiling, TARGETS[way], n, r["client_cpu_us"], pool_us)
            if b["loop"] <= 0:
                verdict = "out of reach even with a loop thread that cost nothing"
            else:
                gap = "met" if r["loop_cpu_us"] <= b["loop"] else f"needs {1 - b['loop'] / r['loop_cpu_us']:.0%} less"
                verdict = f"loop thread <= {b['loop']:.0f} (measured {r['loop_cpu_us']:.0f}: {gap})"
            print(f"#     on {what}: {b['machine']:.0f} a step - clients = server <= {b['server']:.0f} (measured "
                  f"{r['cpu_us']:.0f}); - pool -> {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase (the issue asks 300)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--body", choices=["npy", "json"], default="npy", help="step bodies and messages")
    ap.add_argument("--model", default="lstm256x2", choices=["lstm256x2", "lstm512"])
    ap.add_argument("--state-dir", action="store_true",
                    help="serve with --state-dir (a temporary one): every step's new state logged and fsynced "
                         "before its answer")
    ap.add_argument("--empty-server", action="store_true",
                    help="also drive an ASGI app that answers with fixed bytes: the ASGI stack's own ceiling")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the server phases, interleaved (default 1)")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also serve from another built checkout (its src/ first on PYTHONPATH), interleaved with "
                         "this one: an A/B of the server's code under the same load")
    ap.add_argument("--server", default="uvicorn",
                    help="the HTTP server(s) under every app, comma-separated, interleaved: uvicorn, granian "
                         "(default uvicorn)")
    ap.add_argument("--serve-empty", type=int, default=None, metavar="OUTPUT_SIZE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    http_servers = args.server.split(",")
    if args.serve_empty is not None:
        return serve_empty(args.serve_empty, http_servers[0])
    if not set(http_servers) <= {"uvicorn", "granian"} or len(set(http_servers)) != len(http_servers):
        ap.error(f"--server: uvicorn and/or granian, comma-separated; got {args.server!r}")
    if not 1 <= args.streams <= 1000:
        ap.error("--streams: 1..1000")
    if not 1 <= args.seconds <= 3600:
        ap.error("--seconds: 1..3600")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds: 1..20")
    if args.baseline and not os.path.isdir(os.path.join(args.baseline, "src", "lstm_engine")):
        ap.error(f"--baseline: {args.baseline} has no src/lstm_engine (a built checkout, e.g. a clone of main)")

    model = build(args.model)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# {args.model}, {args.streams} streams, {args.seconds:g} s a phase, max_batch {args.max_batch}, "
          f"{args.body} bodies, {args.client_procs} client processes, {args.rounds} rounds"
          + (", server with --state-dir" if args.state_dir else "") + f", HTTP server {', '.join(http_servers)}")
    print(f"# CPU: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; kernel variant "
          f"{le.cpu_info()['variant']}; model threads {model.threads} "
          "(the server's too: it loads the same file with the same default); one server process")
    rows = []

    def measure(name: str, result: dict) -> None:
        result["load"] = os.getloadavg()[0]
        rows.append((name, result))

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        le.save(model, path)
        serve = [sys.executable, "-m", "lstm_engine.cli", "serve", path, "--port", "0", "--max-batch",
                 str(args.max_batch), "--max-queue", "4096",
                 *(["--state-dir", os.path.join(d, "states")] if args.state_dir else [])]
        apps = [("server", serve, None)]
        if args.baseline:
            apps.insert(0, ("baseline", serve, {**os.environ, "PYTHONPATH": os.path.join(args.baseline, "src")}))
        if args.empty_server:
            apps.insert(0, ("empty ASGI", [sys.executable, os.path.abspath(__file__), "--serve-empty",
                                           str(model.output_size)], None))
        # Each app under each HTTP server; with more than one server, its name in the row's label.
        servers = [(label if len(http_servers) == 1 else f"{label} {name}", [*command, "--server", name], env)
                   for label, command, env in apps for name in http_servers]
        for k in range(args.rounds):
            measure("in-process pool", in_process(model, args.streams, args.seconds, args.max_batch))
            # Every other round in the reverse order, so that no server always runs first after the pool's phase.
            for label, command, env in servers if k % 2 == 0 else servers[::-1]:
                server = ServerProcess(command, env)
                if label.startswith("server"):
                    served = server
                try:
                    for kind, name in (("http", "HTTP keep-alive"), ("ws", "WebSocket")):
                        measure(f"{label}, {name}", over_network(kind, server.url, args.streams, args.client_procs,
                                                                 args.seconds, args.body, model.input_size,
                                                                 server.proc.pid))
                finally:
                    server.stop()
        measure("in-process pool", in_process(model, args.streams, args.seconds, args.max_batch))
    # Each server row against the mean of the in-process phases just before and after it (interleaved: the
    # machine's load moves between rounds).
    pools = [i for i, (name, _) in enumerate(rows) if name == "in-process pool"]
    # CPU time per step is what the machine's load changes least: the pool's process (or the server's, and of it
    # the event loop's thread), and the clients'. Cores: CPU seconds over the phase's seconds, each side's.
    print(f"{'way':36s} {'steps/s':>9s} {'of pool':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99/p50':>8s} {'errors':>6s} "
          f"{'batch':>6s} {'CPU us/step':>11s} {'of it loop':>10s} {'clients':>8s} {'cores':>5s} {'clients':>7s} "
          f"{'load':>5s}")
    for i, (name, r) in enumerate(rows):
        before = max(p for p in pools if p <= i)
        after = min(p for p in pools if p >= i)
        ceiling = (rows[before][1]["steps_s"] + rows[after][1]["steps_s"]) / 2
        clients = f"{r['client_cpu_us']:8.0f}" if "client_cpu_us" in r else f"{'-':>8s}"
        client_cores = f"{r['client_cores']:7.2f}" if "client_cores" in r else f"{'-':>7s}"
        loop = f"{r['loop_cpu_us']:10.0f}" if "loop_cpu_us" in r else f"{'-':>10s}"
        print(f"{name:36s} {r['steps_s']:9.0f} {r['steps_s'] / ceiling:8.0%} {r['p50'] * 1e3:8.2f} "
              f"{r['p99'] * 1e3:8.2f} {r['p99'] / r['p50']:8.1f} {r.get('errors', 0):6d} {r['batch']:6.1f} "
              f"{r['cpu_us']:11.0f} {loop} {clients} {r['cores']:5.2f} {client_cores} {r['load']:5.1f}")
    print_bounds(rows, pools)
    rss = served.rss  # the last run of this checkout's server
    if rss:
        marks = rss[:: max(1, len(rss) // 10)] + [rss[-1]]
        print("server RSS (s: MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in marks))
        tail = [m for t, m in rss if t >= rss[-1][0] / 2]
        print(f"server RSS over the second half of its life: min {min(tail):.0f} MiB, max {max(tail):.0f} MiB")
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
