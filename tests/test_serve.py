"""`lstm-engine serve`, started for real on 127.0.0.1 and driven over HTTP (httpx) and WebSocket (websockets).

Every server here is a subprocess on a free loopback port, bounded in time and killed at the end.
References are in-process: a lone stream of the same model's pool runs exactly the code the server
runs for a lone client (so outputs must be identical), and model.session() for generation.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import lstm_engine as le

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the test extra)")
websockets_sync = pytest.importorskip("websockets.sync.client", reason="the serve tests need websockets")
websockets_exceptions = pytest.importorskip("websockets.exceptions")
for _mod in ("starlette", "uvicorn", "prometheus_client", "orjson"):
    pytest.importorskip(_mod, reason="lstm-engine serve needs the [serve] extra")

pytestmark = pytest.mark.timeout(300)

NPY = "application/x-npy"
TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"


def _u(rng, *shape):
    return rng.uniform(-0.4, 0.4, shape).astype(np.float32)


def float_model() -> le.Model:
    rng = np.random.default_rng(7)
    H = 32
    return le.Model([
        le.LSTM(_u(rng, 4 * H, 8), _u(rng, 4 * H, H), _u(rng, 4 * H), _u(rng, 4 * H)),
        le.LSTM(_u(rng, 4 * H, H), _u(rng, 4 * H, H), _u(rng, 4 * H), _u(rng, 4 * H)),
        le.Dense(_u(rng, 5, H), _u(rng, 5)),
    ])


def token_model() -> le.Model:
    rng = np.random.default_rng(8)
    V, E, H = 20, 8, 24
    return le.Model([
        le.Embedding(rng.standard_normal((V, E)).astype(np.float32)),
        le.LSTM(_u(rng, 4 * H, E), _u(rng, 4 * H, H), _u(rng, 4 * H), _u(rng, 4 * H)),
        le.Dense(rng.standard_normal((V, H)).astype(np.float32), _u(rng, V)),
    ])


def masked_model() -> le.Model:
    """Keras-style masking: a padding id (0) repeats the previous output, which the state must carry."""
    rng = np.random.default_rng(9)
    V, E, H = 12, 6, 16
    return le.Model([
        le.Embedding(rng.standard_normal((V, E)).astype(np.float32), mask_zero=True),
        le.LSTM(_u(rng, 4 * H, E), _u(rng, 4 * H, H), _u(rng, 4 * H), _u(rng, 4 * H)),
        le.Dense(rng.standard_normal((4, H)).astype(np.float32), _u(rng, 4)),
    ])


# The HTTP servers `lstm-engine serve --server` runs on; every test that starts a server with the `files`
# fixture runs on each (granian's only where it is installed).
_HTTP_SERVER = ["uvicorn"]


@pytest.fixture(scope="module", params=[
    "uvicorn", pytest.param("granian", marks=pytest.mark.skipif(importlib.util.find_spec("granian") is None,
                                                                  reason="granian is not installed"))])
def files(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("serve")
    paths = {"float": str(d / "float.safetensors"), "token": str(d / "token.safetensors"),
             "masked": str(d / "masked.safetensors")}
    le.save(float_model(), paths["float"])
    le.save(token_model(), paths["token"])
    le.save(masked_model(), paths["masked"])
    paths["server"] = request.param
    tokens = d / "tokens.txt"
    tokens.write_text(f"# two clients\n{TOKEN_A}\n\n{TOKEN_B}\n")
    paths["tokens"] = str(tokens)
    paths["dir"] = d
    return paths


@pytest.fixture(autouse=True)
def _http_server(request):
    """Server() below runs on the `files` fixture's HTTP server, or uvicorn in a test without it (and in other
    modules' tests: test_readme's)."""
    _HTTP_SERVER[0] = request.getfixturevalue("files")["server"] if "files" in request.fixturenames else "uvicorn"
    yield
    _HTTP_SERVER[0] = "uvicorn"


class Server:
    """`lstm-engine serve MODEL --port 0 ...` in a subprocess; url once it listens."""

    def __init__(self, model_path: str, *args: str, timeout: float = 60) -> None:
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lstm_engine.cli", "serve", model_path, "--port", "0", "--threads", "1",
             "--server", _HTTP_SERVER[0], *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.ws_url = self.url.replace("http://", "ws://")

    def client(self, token: str | None = None) -> "httpx.Client":
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def ws(self, stream_id: str, token: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return websockets_sync.connect(f"{self.ws_url}/v1/streams/{stream_id}/ws", additional_headers=headers,
                                       open_timeout=30, close_timeout=5)

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.reader.join(10)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(data), allow_pickle=False)


def reference(model: le.Model, xs) -> np.ndarray:
    """Outputs of a lone in-process pool stream: what the server runs for one client at a time."""
    with model.pool() as pool, pool.open() as s:
        return np.stack([s.step(x) for x in xs])


def step(client, sid, x, **extra):
    r = client.post(f"/v1/streams/{sid}/step", json={"x": np.asarray(x).tolist(), **extra})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["y"], np.float32), r.json()["position"]


# -- outputs -----------------------------------------------------------------------------------------

def test_http_steps_are_identical_to_in_process(files):
    model = float_model()
    xs = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    want = reference(model, xs)
    with Server(files["float"]) as srv, srv.client() as c:
        info = c.get("/v1/model").json()
        assert (info["input_size"], info["output_size"], info["dtype"]) == (8, 5, "float32")
        r = c.post("/v1/streams")
        assert r.status_code == 201
        sid = r.json()["id"]
        assert re.fullmatch(r"[0-9a-f]{32}", sid)
        got = []
        y, pos = step(c, sid, xs[0])  # one step as JSON
        got.append(y)
        assert pos == 1
        y, pos = step(c, sid, xs[1:4], at=1)  # a chunk as JSON
        got.extend(y)
        assert pos == 4
        r = c.post(f"/v1/streams/{sid}/step", content=npy(xs[4]), headers={"Content-Type": NPY})  # one step, .npy
        assert r.status_code == 200 and r.headers["content-type"] == NPY and r.headers["x-stream-position"] == "5"
        got.append(from_npy(r.content))
        r = c.post(f"/v1/streams/{sid}/step?at=5", content=npy(xs[5:10]), headers={"Content-Type": NPY})
        got.extend(from_npy(r.content))
        r = c.post(f"/v1/streams/{sid}/step", json={"x": xs[10:].tolist()}, headers={"Accept": NPY})
        got.extend(from_npy(r.content))
        np.testing.assert_array_equal(np.stack(got), want)
        assert c.get(f"/v1/streams/{sid}").json()["position"] == 12

        # State out and back in: a second stream continues where the first stands.
        blob = c.get(f"/v1/streams/{sid}/state")
        assert blob.status_code == 200 and blob.headers["x-stream-position"] == "12"
        session = model.session(1)
        session.load_state(blob.content)  # the session's own versioned bytes
        sid2 = c.post("/v1/streams").json()["id"]
        assert c.put(f"/v1/streams/{sid2}/state", content=blob.content).status_code == 200
        x = np.ones(8, np.float32)
        y1, _ = step(c, sid, x)
        y2, _ = step(c, sid2, x)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_allclose(y1, session.step(x[None])[0], rtol=1e-5, atol=1e-6)

        # Stateless batch forward.
        xb = np.random.default_rng(1).standard_normal((3, 6, 8)).astype(np.float32)
        r = c.post("/v1/forward", json={"x": xb.tolist(), "lengths": [6, 2, 4]})
        assert r.status_code == 200, r.text
        y_ref, state_ref = model.forward(xb, [6, 2, 4])
        np.testing.assert_array_equal(np.asarray(r.json()["y"], np.float32), y_ref)
        np.testing.assert_array_equal(np.asarray(r.json()["state"][1][0], np.float32), state_ref[1][0])
        r = c.post("/v1/forward", content=npy(xb), headers={"Content-Type": NPY})
        np.testing.assert_array_equal(from_npy(r.content), model.forward(xb)[0])

        assert c.delete(f"/v1/streams/{sid}").status_code == 204
        assert c.post(f"/v1/streams/{sid}/step", json={"x": x.tolist()}).status_code == 404


def test_concurrent_streams_each_get_their_own_results(files):
    model = float_model()
    rng = np.random.default_rng(2)
    n, T = 12, 10
    xs = rng.standard_normal((n, T, 8)).astype(np.float32)
    got = [None] * n
    with Server(files["float"]) as srv:
        def client(k: int) -> None:
            with srv.client() as c:
                sid = c.post("/v1/streams").json()["id"]
                got[k] = np.stack([step(c, sid, x)[0] for x in xs[k]])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with srv.client() as c:
            metrics = c.get("/metrics").text
    for k in range(n):
        # Batch mates change float32 rounding only.
        np.testing.assert_allclose(got[k], model.forward(xs[k][None])[0][0], rtol=1e-5, atol=1e-6)
    for name in ("lstm_engine_pool_steps_total", "lstm_engine_pool_batches_total", "lstm_engine_steps_per_second",
                 "lstm_engine_step_queue_seconds_bucket", 'lstm_engine_request_latency_seconds{quantile="0.99"}',
                 'lstm_engine_streams{where="pool"}', 'lstm_engine_requests_total{route="step",status="200"}'):
        assert name in metrics, name
    assert re.search(r"^lstm_engine_pool_steps_total (\d+)", metrics, re.M).group(1) == str(n * T)


def test_websocket_steps_and_generate(files):
    model = float_model()
    xs = np.random.default_rng(3).standard_normal((7, 8)).astype(np.float32)
    want = reference(model, xs)
    with Server(files["float"]) as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]
        with srv.ws(sid) as ws:
            ws.send(json.dumps({"x": xs[0].tolist()}))
            r = json.loads(ws.recv(30))
            got = [np.asarray(r["y"], np.float32)]
            assert r["position"] == 1
            ws.send(json.dumps({"x": xs[1:3].tolist(), "at": 1}))
            got.extend(np.asarray(json.loads(ws.recv(30))["y"], np.float32))
            ws.send(npy(xs[3:]))
            got.extend(from_npy(ws.recv(30)))
            # A bad message is answered with an error; the connection keeps working.
            ws.send(json.dumps({"x": [1, 2]}))
            err = json.loads(ws.recv(30))
            assert err["status"] == 422 and err["error"]["code"] == "bad_shape"
            ws.send("not json")
            assert json.loads(ws.recv(30))["status"] == 400
            ws.send(json.dumps({"generate": {"prompt": [1]}}))
            assert "Embedding" in json.loads(ws.recv(30))["error"]["message"]
        np.testing.assert_array_equal(np.stack(got), want)
        assert c.get(f"/v1/streams/{sid}").json()["position"] == 7

    lm = token_model()
    prompt = [3, 1, 4, 1, 5]
    cases = [dict(temperature=0.0), dict(temperature=0.8, top_k=8, top_p=0.9, seed=11), dict(temperature=1.3, seed=5)]
    with Server(files["token"]) as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]
        session = lm.session(1)
        with srv.ws(sid) as ws:
            position = 0
            for case in cases:
                want_tokens = list(session.generate(prompt, 12, **case))
                ws.send(json.dumps({"generate": {"prompt": prompt, "max_new_tokens": 12, **case}}))
                streamed = []
                while True:
                    msg = json.loads(ws.recv(30))
                    if msg.get("done"):
                        break
                    streamed.append(msg["token"])
                    assert msg["position"] == position + len(prompt) + len(streamed)
                assert streamed == msg["tokens"] == want_tokens, case
                position = msg["position"]
            ws.send(json.dumps({"generate": {"prompt": [1], "top_p": 2}}))
            err = json.loads(ws.recv(30))
            assert err["status"] == 422 and "top_p" in err["error"]["message"]
            ws.send(json.dumps({"x": [25]}))
            err = json.loads(ws.recv(30))
            assert err["error"]["code"] == "out_of_range" and "[0, 20)" in err["error"]["message"]
        # The stream's state is the session's after all of it.
        y, _ = step(c, sid, 2)
        np.testing.assert_allclose(y, session.step(np.array([2]))[0], rtol=1e-5, atol=1e-5)


# -- durability ------------------------------------------------------------------------------------

def _inputs_and_references(seed: int, n: int, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """n streams' inputs for the float model, and each one's uninterrupted outputs."""
    xs = np.random.default_rng(seed).standard_normal((n, steps, 8)).astype(np.float32)
    model = float_model()
    return xs, [reference(model, x) for x in xs]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_restart_continues_every_stream_exactly(files, tmp_path, how):
    n, T1, T2 = 4, 6, 5
    xs, want = _inputs_and_references(4, n, T1 + T2)
    state_dir = str(tmp_path / "states")
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        ids = [c.post("/v1/streams").json()["id"] for _ in range(n)]
        first = [np.stack([step(c, sid, x)[0] for x in xs[k, :T1]]) for k, sid in enumerate(ids)]
        if how == "kill -9":
            assert srv.signal(signal.SIGKILL) == -signal.SIGKILL
        else:
            # uvicorn finishes the requests in flight, runs the shutdown, then dies of the signal it caught.
            assert srv.signal(signal.SIGTERM) in (0, -signal.SIGTERM)
            assert not any("Traceback" in line for line in srv.lines)
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        assert "4 streams" in "".join(srv.lines)
        for k, sid in enumerate(ids):
            assert c.get(f"/v1/streams/{sid}").json()["position"] == T1
            second = np.stack([step(c, sid, x)[0] for x in xs[k, T1:]])
            np.testing.assert_array_equal(np.concatenate([first[k], second]), want[k])


@pytest.mark.parametrize("durable", [True, False], ids=["state-dir", "memory"])
def test_sigterm_while_websockets_step_stops_cleanly_and_keeps_every_answered_step(files, tmp_path, durable):
    """A SIGTERM while clients step chunks over WebSockets as fast as they can: the server stops in bounded
    time, without a traceback (the chunks begun end before the pool closes), and, with a state directory,
    after the restart every stream is at its last answered chunk (or the one after, logged but not yet
    answered), and continues exactly."""
    n, T, C = 8, 100_000, 50
    xs = np.random.default_rng(5).standard_normal((n, T, 8)).astype(np.float32)
    model = float_model()
    state_dir = str(tmp_path / "states")
    got: list[list[np.ndarray]] = [[] for _ in range(n)]
    with Server(files["float"], *(["--state-dir", state_dir] if durable else [])) as srv, srv.client() as c:
        ids = [c.post("/v1/streams").json()["id"] for _ in range(n)]
        started = threading.Barrier(n + 1)

        def stepper(k: int) -> None:
            with srv.ws(ids[k]) as ws:
                started.wait(30)
                try:
                    for i in range(0, T, C):
                        ws.send(npy(xs[k, i:i + C]))
                        got[k].extend(from_npy(ws.recv(30)))
                except websockets_exceptions.ConnectionClosed:
                    return

        threads = [threading.Thread(target=stepper, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        started.wait(30)
        time.sleep(0.5)
        assert srv.signal(signal.SIGTERM) in (0, -signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert not any("Traceback" in line for line in srv.lines), "".join(srv.lines)
    assert all(0 < len(g) < T for g in got), [len(g) for g in got]
    if not durable:
        return
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        for k, sid in enumerate(ids):
            position = c.get(f"/v1/streams/{sid}").json()["position"]
            assert position in (len(got[k]), len(got[k]) + C)
            rest = [step(c, sid, x)[0] for x in xs[k, position:position + 3]]
            want = model.forward(xs[k, None, :position + 3])[0][0]
            # Batched with the other streams: the same floats up to the kernels' order of summation.
            np.testing.assert_allclose(np.stack(got[k]), want[:len(got[k])], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.stack(rest), want[position:], rtol=1e-5, atol=1e-5)


def test_kill_during_a_chunk_leaves_it_all_or_nothing(files, tmp_path):
    model = float_model()
    rng = np.random.default_rng(5)
    head = rng.standard_normal((3, 8)).astype(np.float32)
    chunk = rng.standard_normal((4000, 8)).astype(np.float32)
    probe = rng.standard_normal(8).astype(np.float32)
    state_dir = str(tmp_path / "states")
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]
        step(c, sid, head)

        def send() -> None:
            try:
                with srv.client() as c2:
                    c2.post(f"/v1/streams/{sid}/step", content=npy(chunk), headers={"Content-Type": NPY})
            except httpx.HTTPError:
                pass  # the server dies under it

        t = threading.Thread(target=send)
        t.start()
        time.sleep(0.15)
        srv.signal(signal.SIGKILL)
        t.join(30)
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        position = c.get(f"/v1/streams/{sid}").json()["position"]
        assert position in (3, 3 + len(chunk))
        y, _ = step(c, sid, probe)
        seen = head if position == 3 else np.concatenate([head, chunk])
        np.testing.assert_allclose(y, reference(model, np.concatenate([seen, probe[None]]))[-1], rtol=0, atol=0)


def _segments(state_dir: str) -> list[str]:
    return sorted(os.path.join(state_dir, n) for n in os.listdir(state_dir) if re.fullmatch(r"wal\.\d{8}\.log", n))


def _log_bytes(state_dir: str) -> int:
    """The segments' total size; a segment the server's checkpoint thread removes between the listing and its
    stat counts nothing (it is gone)."""
    total = 0
    for path in _segments(state_dir):
        try:
            total += os.path.getsize(path)
        except FileNotFoundError:
            pass
    return total


def test_a_torn_log_tail_is_dropped_and_a_damaged_segment_refused(files, tmp_path):
    """The last log record cut short or garbled by a crash was never answered: a restart drops it and the stream
    continues exactly from the step before. A damaged record in an earlier (complete) segment stops the start."""
    import shutil

    xs, want = _inputs_and_references(11, 2, 10)
    state_dir = str(tmp_path / "states")
    got: list[list] = [[], []]
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        ids = [c.post("/v1/streams").json()["id"] for _ in range(2)]
        got[1] += [step(c, ids[1], x)[0] for x in xs[1, :3]]
        got[0] += [step(c, ids[0], x)[0] for x in xs[0, :4]]  # the log's last record: stream 0's 4th step
        assert srv.signal(signal.SIGKILL) == -signal.SIGKILL
    (segment,) = _segments(state_dir)
    with open(segment, "r+b") as f:
        f.truncate(os.path.getsize(segment) - 7)  # the crash cut the last write short
    for damage in ("torn", "garbled"):
        with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
            assert "dropped" in "".join(srv.lines) and "2 streams" in "".join(srv.lines)
            assert [c.get(f"/v1/streams/{sid}").json()["position"] for sid in ids] == [len(got[0]) - 1, len(got[1])]
            got[0].pop()  # never answered, as far as the restarted server knows: the client sends it again
            for k in (1, 0):  # stream 0's step last again
                got[k] += [step(c, ids[k], x)[0] for x in xs[k, len(got[k]):len(got[k]) + 2]]
            assert srv.signal(signal.SIGKILL) == -signal.SIGKILL
        (segment,) = _segments(state_dir)
        if damage == "torn":
            with open(segment, "r+b") as f:  # one bit of the last record's state flipped
                f.seek(-20, os.SEEK_END)
                byte = f.read(1)
                f.seek(-20, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0x10]))
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        assert "dropped" not in "".join(srv.lines)
        for k, sid in enumerate(ids):
            assert c.get(f"/v1/streams/{sid}").json()["position"] == len(got[k])
            got[k] += [step(c, sid, x)[0] for x in xs[k, len(got[k]):]]
            np.testing.assert_array_equal(np.stack(got[k]), want[k])
        assert srv.signal(signal.SIGKILL) == -signal.SIGKILL
    # Two segments exist only when a crash comes mid-rotation; the first was fsynced whole before the second began.
    (segment,) = _segments(state_dir)
    earlier = os.path.join(state_dir, "wal.00000000.log")
    shutil.copy(segment, earlier)
    with open(earlier, "r+b") as f:
        f.seek(30)
        byte = f.read(1)
        f.seek(30)
        f.write(bytes([byte[0] ^ 0x01]))
    proc = subprocess.run([sys.executable, "-m", "lstm_engine.cli", "serve", files["float"], "--port", "0",
                           "--state-dir", state_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "wal.00000000.log: damaged log record at byte 0" in proc.stderr and "Traceback" not in proc.stderr


def test_the_log_is_folded_into_checkpoints_and_stays_bounded(files, tmp_path):
    """Past --max-log-bytes every state goes to its checkpoint and the log starts again; a kill -9 then
    continues every stream exactly, and a deleted stream stays deleted."""
    n, T1, T2 = 3, 40, 4
    xs, want = _inputs_and_references(12, n, T1 + T2)
    state_dir = str(tmp_path / "states")
    limit = 16000  # a record of this model is ~0.6 kB: a few rotations over the run
    got = []
    with Server(files["float"], "--state-dir", state_dir, "--max-log-bytes", str(limit)) as srv, srv.client() as c:
        ids = [c.post("/v1/streams").json()["id"] for _ in range(n + 1)]
        first_segment = _segments(state_dir)
        for k, sid in enumerate(ids[:n]):
            got.append([])
            for x in xs[k, :T1]:
                got[k].append(step(c, sid, x)[0])
                # A new segment starts past the limit; the old one goes once its states are in checkpoints.
                assert _log_bytes(state_dir) < 3 * limit
        assert first_segment[0] not in _segments(state_dir)  # rotated
        assert c.delete(f"/v1/streams/{ids[n]}").status_code == 204
        assert srv.signal(signal.SIGKILL) == -signal.SIGKILL
    # Which checkpoints are on disk at the kill depends on how far the checkpoint thread got (the deleted
    # stream's may still be there, a rotation's may not be written yet): recovery must not care.
    with Server(files["float"], "--state-dir", state_dir, "--max-log-bytes", str(limit)) as srv, srv.client() as c:
        assert c.get(f"/v1/streams/{ids[n]}").status_code == 404
        for k, sid in enumerate(ids[:n]):
            got[k] += [step(c, sid, x)[0] for x in xs[k, T1:]]
            np.testing.assert_array_equal(np.stack(got[k]), want[k])
        assert srv.signal(signal.SIGTERM) in (0, -signal.SIGTERM)
    # A clean stop folds the log: a checkpoint for every live stream, none for the deleted one.
    assert sorted(n for n in os.listdir(state_dir) if n.endswith(".state")) == sorted(f"{i}.state" for i in ids[:n])


def test_state_log_recovers_the_last_answered_state_across_folds_evictions_and_deletes(tmp_path):
    """In process, many rotations with evictions and deletes between them, then a stop without the final fold
    (what a kill -9 leaves once the last fsync returned): every stream recovers its last logged state."""
    import asyncio

    from lstm_engine.serve.wal import StateLog

    rng = np.random.default_rng(13)
    ids = [os.urandom(16).hex() for _ in range(6)]
    want: dict = {}

    async def main() -> StateLog:
        wal = StateLog(str(tmp_path), lambda blob, where: None, max_log_bytes=2000)
        # 300 actions, and on until 5 folds are done: on a loaded machine the checkpoint thread lags behind
        # (a fold is a few fsyncs) and a rotation waits for the fold before it.
        t = 0
        while t < 300 or (wal.rotations < 5 and t < 5000):
            t += 1
            k = int(rng.integers(len(ids)))
            action = rng.random()
            if action < 0.05 and ids[k] in want:
                await wal.delete(ids[k])
                del want[ids[k]]
            elif action < 0.15 and ids[k] in want:
                wal.evict(ids[k])
            else:
                blob = rng.bytes(int(rng.integers(1, 200)))
                await wal.append(ids[k], "owner", t, blob)
                want[ids[k]] = (t, blob)
            for sid, (_, blob) in want.items():  # what a stream brought back from eviction would load
                assert wal.last_state(sid) == blob
        assert wal.rotations >= 5
        return wal

    wal = asyncio.run(main())
    _stop_without_fold(wal)
    again = StateLog(str(tmp_path), lambda blob, where: None, max_log_bytes=2000)
    try:
        assert again.streams == {sid: ("owner", t) for sid, (t, _) in want.items()}
        assert {sid: again.last_state(sid) for sid in want} == {sid: blob for sid, (_, blob) in want.items()}
    finally:
        again.close()
    names = os.listdir(tmp_path)
    assert sorted(n for n in names if n.endswith(".state")) == sorted(f"{sid}.state" for sid in want)
    assert not [n for n in names if not n.endswith(".state")]  # closed cleanly: the log folded away


def _stop_without_fold(wal) -> None:
    """Stop a StateLog's threads once their jobs are done, leaving the log unfolded: what a kill -9 leaves once
    the last fsync returned."""
    wal.queue.put(None)
    wal.thread.join()
    wal.jobs.put(None)
    wal.checkpointer.join()
    os.close(wal.fd)
    wal.fsyncs.shutdown()


def test_an_eviction_queued_before_a_delete_keeps_the_stream_made_again_under_that_id(tmp_path, monkeypatch):
    """The checkpoint thread runs an eviction after the stream was deleted and made again under the same id: the
    eviction writes the new stream's state, and the delete's unlink, queued after it, must leave that file."""
    import asyncio

    from lstm_engine.serve.wal import StateLog

    held, other, sid = threading.Event(), os.urandom(16).hex(), os.urandom(16).hex()
    wal = StateLog(str(tmp_path), lambda blob, where: None)
    write = wal._write_checkpoint

    def write_when_released(stream_id, rec):
        if stream_id == other:
            assert held.wait(30)
        write(stream_id, rec)

    monkeypatch.setattr(wal, "_write_checkpoint", write_when_released)

    async def main() -> None:
        await wal.append(other, "owner", 1, b"other")
        await wal.append(sid, "owner", 1, b"first")
        wal.evict(other)  # holds the checkpoint thread in its write
        wal.evict(sid)
        await wal.append(other, "owner", 2, b"other 2")  # the writer took the eviction: its job is queued
        await wal.delete(sid)  # its unlink job comes after the eviction's
        await wal.append(sid, "owner", 1, b"second")
        held.set()

    try:
        asyncio.run(main())
    finally:
        held.set()
        _stop_without_fold(wal)
    assert wal.error is None
    assert wal.last_state(sid) == b"second"
    again = StateLog(str(tmp_path), lambda blob, where: None)
    try:
        assert again.streams == {sid: ("owner", 1), other: ("owner", 2)}
        assert again.last_state(sid) == b"second"
    finally:
        again.close()


def test_recovery_keeps_a_stream_made_again_after_its_delete(tmp_path):
    """A log holding a stream's state, its delete and a new state under the same id recovers the new state (and
    its checkpoint stays when the log is folded away)."""
    import asyncio

    from lstm_engine.serve.wal import StateLog

    sid = os.urandom(16).hex()
    wal = StateLog(str(tmp_path), lambda blob, where: None)

    async def main() -> None:
        await wal.append(sid, "owner", 1, b"first")
        await wal.delete(sid)
        await wal.append(sid, "owner", 1, b"second")

    asyncio.run(main())
    _stop_without_fold(wal)
    for _ in range(2):  # the second start reads only the checkpoints the first one folded the log into
        again = StateLog(str(tmp_path), lambda blob, where: None)
        try:
            assert again.streams == {sid: ("owner", 1)}
            assert again.last_state(sid) == b"second"
        finally:
            again.close()


@pytest.mark.parametrize("state_dir", [True, False], ids=["state-dir", "memory"])
def test_idle_streams_are_evicted_and_come_back(files, tmp_path, state_dir):
    model = float_model()
    xs = np.random.default_rng(6).standard_normal((6, 8)).astype(np.float32)
    args = ["--idle-timeout", "0.3"] + (["--state-dir", str(tmp_path / "s")] if state_dir else [])
    with Server(files["float"], *args) as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]
        got = [step(c, sid, x)[0] for x in xs[:3]]
        deadline = time.monotonic() + 20
        while c.get("/healthz").json()["in_pool"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get(f"/v1/streams/{sid}").json() == {"id": sid, "position": 3, "in_pool": False}
        got += [step(c, sid, x)[0] for x in xs[3:]]
        assert "lstm_engine_evictions_total 1.0" in c.get("/metrics").text
    np.testing.assert_array_equal(np.stack(got), reference(model, xs))


def test_masked_streams_restore_exactly(files, tmp_path):
    """A masked stream moved by GET/PUT state, by eviction, or by a kill -9 and restart continues as the
    uninterrupted run: padding right after the move repeats the last output, not zeros."""
    model = masked_model()
    xs = np.array([0, 3, 5, 7, 0, 0, 2, 0, 9, 0, 0, 4])
    cuts = [4, 7, 9]  # each move happens just before a padding step
    want = model.forward(xs[None])[0][0]
    assert all(xs[t] == 0 and np.abs(want[t]).max() > 0.05 for t in cuts)
    state_dir = str(tmp_path / "states")
    with Server(files["masked"], "--state-dir", state_dir, "--idle-timeout", "0.3") as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]
        got = [step(c, sid, int(t))[0] for t in xs[:cuts[0]]]
        # GET the state, PUT it into a fresh stream, carry on there.
        blob = c.get(f"/v1/streams/{sid}/state").content
        sid = c.post("/v1/streams").json()["id"]
        assert c.put(f"/v1/streams/{sid}/state", content=blob).status_code == 200
        got += [step(c, sid, int(t))[0] for t in xs[cuts[0]:cuts[1]]]
        # Evicted to its file and back.
        deadline = time.monotonic() + 20
        while c.get(f"/v1/streams/{sid}").json()["in_pool"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not c.get(f"/v1/streams/{sid}").json()["in_pool"]
        got += [step(c, sid, int(t))[0] for t in xs[cuts[1]:cuts[2]]]
        assert srv.signal(signal.SIGKILL) == -signal.SIGKILL
    with Server(files["masked"], "--state-dir", state_dir) as srv, srv.client() as c:
        got += [step(c, sid, int(t))[0] for t in xs[cuts[2]:]]
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-6)


def test_state_dir_of_another_model_is_refused(files, tmp_path):
    state_dir = str(tmp_path / "states")
    with Server(files["float"], "--state-dir", state_dir) as srv, srv.client() as c:
        c.post("/v1/streams")
        srv.signal(signal.SIGTERM)
    proc = subprocess.run([sys.executable, "-m", "lstm_engine.cli", "serve", files["token"], "--port", "0",
                           "--state-dir", state_dir], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "different model" in proc.stderr and ".state" in proc.stderr


# -- isolation -------------------------------------------------------------------------------------

def test_tokens_isolate_streams(files):
    with Server(files["float"], "--token-file", files["tokens"], "--max-streams-per-token", "2") as srv, \
            srv.client(TOKEN_A) as a, srv.client(TOKEN_B) as b, srv.client() as anon, srv.client("x" * 20) as bad:
        r = anon.post("/v1/streams")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert bad.post("/v1/streams").json()["error"]["code"] == "bad_token"
        assert anon.get("/healthz").status_code == 200  # liveness needs no token
        assert anon.get("/metrics").status_code == 401
        sid = a.post("/v1/streams").json()["id"]
        y, _ = step(a, sid, np.zeros(8))
        for method, path, kw in [("POST", f"/v1/streams/{sid}/step", {"json": {"x": [0] * 8}}),
                                 ("GET", f"/v1/streams/{sid}/state", {}), ("GET", f"/v1/streams/{sid}", {}),
                                 ("PUT", f"/v1/streams/{sid}/state", {"content": b"x"}),
                                 ("DELETE", f"/v1/streams/{sid}", {})]:
            r = b.request(method, path, **kw)
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_stream", (method, path)
        with pytest.raises(Exception) as info:
            with srv.ws(sid, TOKEN_B) as ws:
                ws.recv(5)
        assert "404" in str(info.value)
        with srv.ws(sid, TOKEN_A) as ws:
            ws.send(json.dumps({"x": [0] * 8}))
            assert json.loads(ws.recv(30))["position"] == 2
        # B's requests changed nothing: A's stream is at its own second step.
        assert a.get(f"/v1/streams/{sid}").json()["position"] == 2
        a.post("/v1/streams")
        r = a.post("/v1/streams")
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams"
        assert b.post("/v1/streams").status_code == 201  # B's own quota


def test_token_file_is_reloaded_without_restart(files, tmp_path):
    """A changed token file takes effect within a second; SIGHUP reloads it even when nothing about the file
    looks changed. A removed token is refused (its open WebSocket too); put back, it finds its streams."""
    token_c, token_d = "token-c-0123456789abcdef", "token-d-0123456789abcdef"
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")

    def wait_for(client, status: int) -> None:
        deadline = time.monotonic() + 20
        while client.get("/v1/model").status_code != status and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/model").status_code == status

    with Server(files["float"], "--token-file", str(path)) as srv, srv.client(TOKEN_A) as a, \
            srv.client(TOKEN_B) as b, srv.client(token_c) as c, srv.client(token_d) as d:
        assert c.post("/v1/streams").status_code == 401
        sid = a.post("/v1/streams").json()["id"]
        step(a, sid, np.zeros(8))
        with srv.ws(sid, TOKEN_A) as ws:
            path.write_text(f"{TOKEN_B}\n{token_c}\n")  # A out, C in
            wait_for(c, 200)
            assert a.get(f"/v1/streams/{sid}").json()["error"]["code"] == "bad_token"
            assert b.get("/v1/model").status_code == 200
            ws.send(json.dumps({"x": [0] * 8}))
            assert json.loads(ws.recv(30))["status"] == 401
            with pytest.raises(websockets_exceptions.ConnectionClosed):
                ws.recv(30)
        # A garbled file keeps the tokens as they were.
        path.write_text("short\n")
        time.sleep(1.5)
        assert c.get("/v1/model").status_code == 200
        # C swapped for D in place, the file's size and times as before: only SIGHUP shows the change.
        path.write_text(f"{TOKEN_B}\n{token_c}\n{TOKEN_A}\n")
        wait_for(a, 200)
        before = os.stat(path)
        with open(path, "r+") as f:
            f.write(f"{TOKEN_B}\n{token_d}\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        time.sleep(1.5)
        assert d.get("/v1/model").status_code == 401
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(d, 200)
        assert c.get("/v1/model").status_code == 401
        assert a.get(f"/v1/streams/{sid}").json()["position"] == 1  # A back, with its stream
        assert srv.alive() and not any("Traceback" in line for line in srv.lines)


def test_rate_limit_and_backpressure(files):
    with Server(files["float"], "--token-file", files["tokens"], "--rate-limit", "20") as srv, \
            srv.client(TOKEN_A) as a, srv.client(TOKEN_B) as b:
        codes = [a.get("/v1/model").status_code for _ in range(60)]
        assert 429 in codes and codes[0] == 200
        r = a.get("/v1/model")
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limited"
        assert b.get("/v1/model").status_code == 200  # B has its own bucket

    chunk = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    with Server(files["float"], "--max-queue", "1") as srv, srv.client() as c:
        ids = [c.post("/v1/streams").json()["id"] for _ in range(2)]
        results = {}

        def long() -> None:
            with srv.client() as c2:
                results["long"] = c2.post(f"/v1/streams/{ids[0]}/step", content=npy(chunk),
                                          headers={"Content-Type": NPY}).status_code

        t = threading.Thread(target=long)
        t.start()
        deadline = time.monotonic() + 20
        while not c.get("/healthz").json()["requests_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.002)
        r = c.post(f"/v1/streams/{ids[1]}/step", json={"x": [0] * 8})
        t.join(60)
        assert results["long"] == 200
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
        assert c.post(f"/v1/streams/{ids[1]}/step", json={"x": [0] * 8}).status_code == 200


# -- bad input -------------------------------------------------------------------------------------

def _object_npy() -> bytes:
    """A .npy header announcing Python objects (a pickle would follow); np.save needs allow_pickle to write one."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (8,), }"
    header += " " * (117 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x80\x04N."


def _malformed(sid: str) -> list:
    step_path = f"/v1/streams/{sid}/step"
    j = {"Content-Type": "application/json"}
    n = {"Content-Type": NPY}
    return [
        ("bad JSON", "POST", step_path, j, b'{"x": [1, 2', 400, "bad_json"),
        ("JSON not an object", "POST", step_path, j, b"[1, 2]", 400, "bad_json"),
        ("JSON nested too deeply", "POST", step_path, j, b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400,
         "bad_json"),
        ("not UTF-8", "POST", step_path, j, b'{"x": "\xff\xfe"}', 400, "bad_json"),
        ("huge integer", "POST", step_path, j, b'{"x": [1' + b"0" * 400 + b', 0, 0, 0, 0, 0, 0, 0]}', 422, None),
        ("NaN", "POST", step_path, j, b'{"x": [NaN, 0, 0, 0, 0, 0, 0, 0]}', 400, "bad_json"),
        ("missing x", "POST", step_path, j, b'{"at": 0}', 422, "missing_field"),
        ("unknown field", "POST", step_path, j, b'{"x": [0,0,0,0,0,0,0,0], "X": 1}', 422, "unknown_field"),
        ("wrong shape", "POST", step_path, j, b'{"x": [1, 2, 3]}', 422, "bad_shape"),
        ("ragged chunk", "POST", step_path, j, b'{"x": [[1, 2], [3]]}', 422, "bad_shape"),
        ("3-d chunk", "POST", step_path, j, json.dumps({"x": [[[0] * 8]]}).encode(), 422, "bad_shape"),
        ("strings", "POST", step_path, j, json.dumps({"x": ["a"] * 8}).encode(), 422, "wrong_dtype"),
        ("booleans", "POST", step_path, j, json.dumps({"x": [True] * 8}).encode(), 422, "wrong_dtype"),
        ("null", "POST", step_path, j, b'{"x": null}', 422, "bad_shape"),
        ("overflow", "POST", step_path, j, b'{"x": [1e999, 0, 0, 0, 0, 0, 0, 0]}', 422, "not_finite"),
        ("empty chunk", "POST", step_path, j, b'{"x": []}', 422, "bad_shape"),
        ("chunk too long", "POST", step_path, j, json.dumps({"x": [[0] * 8] * 17}).encode(), 422, "bad_chunk_length"),
        ("bad at", "POST", step_path, j, b'{"x": [0,0,0,0,0,0,0,0], "at": -1}', 422, "bad_field"),
        ("wrong position", "POST", step_path, j, b'{"x": [0,0,0,0,0,0,0,0], "at": 99}', 409, "position_mismatch"),
        ("npy wrong dtype", "POST", step_path, n, npy(np.zeros(8)), 422, "wrong_dtype"),
        ("npy wrong shape", "POST", step_path, n, npy(np.zeros((2, 3), np.float32)), 422, "bad_shape"),
        ("npy garbage", "POST", step_path, n, b"\x93NUMPY garbage", 400, "bad_npy"),
        ("npy of objects", "POST", step_path, n, _object_npy(), 400, "bad_npy"),
        ("npy lies about size", "POST", step_path, n, npy(np.zeros(8, np.float32))[:-8], 400, "bad_npy"),
        ("content type", "POST", step_path, {"Content-Type": "text/plain"}, b"1", 415, "bad_content_type"),
        ("huge body", "POST", step_path, j, b" " * 5000, 413, "body_too_large"),
        ("unknown id", "POST", "/v1/streams/" + "0" * 32 + "/step", j, b'{"x": [0,0,0,0,0,0,0,0]}', 404,
         "unknown_stream"),
        ("bad id", "POST", "/v1/streams/../../etc/step", j, b'{"x": [0,0,0,0,0,0,0,0]}', 404, None),
        ("id not hex", "GET", "/v1/streams/" + "z" * 32 + "/state", j, b"", 404, "unknown_stream"),
        ("unknown route", "GET", "/v2/nothing", j, b"", 404, "no_such_route"),
        ("wrong method", "PATCH", step_path, j, b"", 405, "method_not_allowed"),
        ("state garbage", "PUT", f"/v1/streams/{sid}/state", {}, b"LESTATE\0junk", 422, "bad_state"),
        ("create with body", "POST", "/v1/streams", j, b'{"x": 1}', 422, "unexpected_body"),
        ("forward wrong shape", "POST", "/v1/forward", j, b'{"x": [[1, 2]]}', 422, "bad_input"),
        ("forward lengths", "POST", "/v1/forward", j, json.dumps({"x": [[[0] * 8] * 2], "lengths": [5]}).encode(),
         422, "bad_input"),
        ("forward strings", "POST", "/v1/forward", j, b'{"x": [["a"]]}', 422, "wrong_dtype"),
    ]


def test_every_malformed_request_gets_its_4xx_and_the_server_keeps_serving(files):
    model = float_model()
    with Server(files["float"], "--max-body", "4096", "--max-chunk", "16") as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]
        for name, method, path, headers, body, status, code in _malformed(sid):
            r = c.request(method, path, headers=headers, content=body)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json", name
            error = r.json()["error"]
            assert error["message"], name
            if code is not None:
                assert error["code"] == code, (name, error)
        # A state from another model names the problem.
        other = token_model().session(1).save_state()
        r = c.put(f"/v1/streams/{sid}/state", content=other)
        assert r.status_code == 422 and "different model" in r.json()["error"]["message"]
        # A body far over the limit, announced or sent chunked.
        r = c.post(f"/v1/streams/{sid}/step", content=iter([b"x" * 4000] * 4), headers={"Content-Type": NPY})
        assert r.status_code == 413
        # A WebSocket message over the body limit closes that connection with 1009 (message too big).
        with srv.ws(sid) as ws:
            ws.send(b"x" * 5000)
            with pytest.raises(websockets_exceptions.ConnectionClosed) as closed:
                ws.recv(30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        # Nothing above touched the stream: its first step is still the first.
        x = np.arange(8, dtype=np.float32) / 8
        y, pos = step(c, sid, x)
        assert pos == 1
        np.testing.assert_array_equal(y, reference(model, x[None])[0])
        assert srv.alive()
        assert "status=\"500\"" not in c.get("/metrics").text
    assert not any("Traceback" in line for line in srv.lines), "".join(srv.lines)


def test_server_errors_at_start_are_one_line(files, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "lstm_engine.cli", "serve", *args], capture_output=True,
                              text=True, timeout=120)

    p = run(str(tmp_path / "missing.safetensors"))
    assert p.returncode == 1 and "no such file" in p.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    p = run(files["float"], "--token-file", str(empty))
    assert p.returncode == 1 and "no tokens" in p.stderr
    p = run(files["float"], "--max-batch", "0")
    assert p.returncode == 1 and "--max-batch" in p.stderr
    for p in (run(files["float"], "--port", "70000"),):
        assert p.returncode == 1 and "--port" in p.stderr


def test_core_does_not_import_the_server_stack(files):
    code = ("import sys, lstm_engine, lstm_engine.cli\n"
            "stack = ('starlette', 'uvicorn', 'prometheus_client', 'orjson', 'lstm_engine.serve')\n"
            "bad = [m for m in stack if m in sys.modules]\n"
            "assert not bad, bad\n"
            "sys.modules['starlette'] = None\n"  # as if the [serve] extra were not installed
            "sys.exit(lstm_engine.cli.main(['serve', sys.argv[1]]))\n")
    p = subprocess.run([sys.executable, "-c", code, files["float"]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "pip install '.[serve]'" in p.stderr and "starlette" in p.stderr and "Traceback" not in p.stderr


def test_a_failed_request_leaves_the_last_answered_state(files, tmp_path, monkeypatch):
    """In process: a chunk whose state cannot be written is refused whole, in memory and on disk."""
    import asyncio

    from lstm_engine.serve.store import StreamError, StreamStore

    model = float_model()
    xs = np.random.default_rng(9).standard_normal((5, 8)).astype(np.float32)

    async def main(state_dir):
        with model.pool() as pool:
            store = StreamStore(model, pool, state_dir=state_dir, idle_timeout=60, max_streams_per_owner=4)
            try:
                entry = await store.create("")
                await store.locked(entry, store.run_steps, xs[:2], None)
                if state_dir is None:
                    def fail(*args):
                        raise RuntimeError("the pool was closed before this step ran")

                    calls = []
                    real = type(entry.stream).astep

                    async def astep(self, x):  # the second step of the chunk fails
                        calls.append(x)
                        if len(calls) == 2:
                            fail()
                        return await real(self, x)

                    monkeypatch.setattr(type(entry.stream), "astep", astep)
                else:
                    def full(*args):
                        raise OSError(28, "No space left on device")

                    monkeypatch.setattr(store.wal, "_append", full)
                with pytest.raises((RuntimeError, StreamError)):
                    await store.locked(entry, store.run_steps, xs[2:4], None)
                monkeypatch.undo()
                if state_dir is not None:
                    with pytest.raises(StreamError) as refused:
                        await store.locked(entry, store.run_steps, xs[2:3], None)
                    assert refused.value.status == 503 and refused.value.code == "not_durable"
                    # A log that failed once answers nothing more (its file's contents are unknown): a fresh
                    # store recovers the last answered state from the directory.
                    store.close()
                    store = StreamStore(model, pool, state_dir=state_dir, idle_timeout=60, max_streams_per_owner=4)
                    entry = store.entries[entry.id]
                assert entry.position == 2
                y, pos = await store.locked(entry, store.run_steps, xs[2:], None)
                return y, pos
            finally:
                store.close()

    for state_dir in (None, str(tmp_path / "s")):
        y, pos = asyncio.run(main(state_dir))
        assert pos == 5
        np.testing.assert_array_equal(y, reference(model, xs)[2:])


def test_a_cancelled_request_finishes_the_work_it_began():
    """uvicorn cancels the requests still running at the end of a graceful shutdown: work that has begun runs to its
    end (what it waits for is not cancelled) and the cancellation is raised after it; a request still waiting for
    the stream's lock is cancelled at once, before it begins."""
    import asyncio

    from lstm_engine.serve.store import StreamStore

    model = float_model()
    xs = np.random.default_rng(14).standard_normal((3, 8)).astype(np.float32)

    async def main() -> None:
        with model.pool() as pool:
            store = StreamStore(model, pool, state_dir=None, idle_timeout=60, max_streams_per_owner=4)
            entry = await store.create("")
            gate = asyncio.get_running_loop().create_future()  # what the work waits for first (a log append, say)
            done = []

            async def work(entry, stream, x):
                await gate
                y = await stream.astep(x)
                await asyncio.sleep(0)
                done.append(y)
                return y

            first = asyncio.ensure_future(store.locked(entry, work, xs[0]))
            second = asyncio.ensure_future(store.locked(entry, work, xs[1]))
            for _ in range(3):
                await asyncio.sleep(0)
            first.cancel()
            second.cancel()
            for _ in range(3):
                await asyncio.sleep(0)
            assert second.cancelled() and not first.done() and not gate.cancelled()
            gate.set_result(None)
            first.cancel()  # again, now while the pool runs its step
            with pytest.raises(asyncio.CancelledError):
                await first
            assert len(done) == 1 and entry.waiting == 0 and not entry.lock.locked()
            y, position = await store.locked(entry, store.run_steps, xs[1:], None)
            np.testing.assert_array_equal(np.concatenate([done[0][None], y]), reference(model, xs))
            assert position == 2  # the work above was not run_steps: it took a step without counting it
            store.close()

    asyncio.run(main())


def test_finite_steps_whose_sum_overflows_are_accepted_and_nan_or_infinity_refused():
    from lstm_engine.serve.store import StreamError
    from lstm_engine.serve.wire import Inputs

    inputs = Inputs(float_model(), np.dtype(np.float32), 16)
    big = np.full((2, 8), 3e38, np.float32)  # finite, but their float32 sum is infinite
    steps, single = inputs.check(big, "x")
    assert not single and np.array_equal(steps, big)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros(8, np.float32)
        x[5] = bad
        with pytest.raises(StreamError) as refused:
            inputs.check(x, "x")
        assert (refused.value.status, refused.value.code) == (422, "not_finite")


def test_json_that_orjson_refuses_is_judged_by_json():
    """Bodies are read by orjson; what it refuses gets json's verdict, as before it was used."""
    import json as stdlib_json

    from lstm_engine.serve.store import StreamError
    from lstm_engine.serve.wire import parse_json

    body = b'{"x": [0.1, -2.5e-3, 7, 1e308], "at": 3}'
    assert parse_json(body) == stdlib_json.loads(body)
    assert parse_json(b'{"x": [1e999]}') == {"x": [float("inf")]}  # then refused as "not_finite"
    for bad, says in ((b'{"x": [NaN]}', "NaN is not a JSON number"), (b'{"x": [1,]}', "not valid JSON"),
                      (b"[" * 100000 + b"]" * 100000, "nested too deeply"), (b"[1, 2]", "got list"),
                      (b'{"x": "\xff"}', "not valid JSON")):
        with pytest.raises(StreamError) as refused:
            parse_json(bad)
        assert refused.value.status == 400 and says in refused.value.message, (bad[:20], refused.value.message)


def test_a_model_that_cannot_stream_serves_forward_only(tmp_path):
    rng = np.random.default_rng(10)
    H = 6
    lstm = le.LSTM(_u(rng, 2, 4 * H, 3), _u(rng, 2, 4 * H, H), _u(rng, 2, 4 * H), _u(rng, 2, 4 * H),
                   bidirectional=True)
    model = le.Model([lstm])
    path = str(tmp_path / "bi.safetensors")
    le.save(model, path)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    with Server(path) as srv, srv.client() as c:
        r = c.post("/v1/streams")
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_streamable"
        assert "bidirectional" in r.json()["error"]["message"]
        r = c.post("/v1/forward", json={"x": x.tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(r.json()["y"], np.float32), model.forward(x)[0])
        assert c.get("/metrics").status_code == 200


def test_concurrent_requests_on_one_stream_run_one_at_a_time(files):
    """Requests racing on one stream each get their own position, and each answer is the step at that position."""
    model = float_model()
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((8, 5, 8)).astype(np.float32)  # 8 clients x 5 requests
    answers = []
    with Server(files["float"]) as srv, srv.client() as c:
        sid = c.post("/v1/streams").json()["id"]

        def client(k: int) -> None:
            with srv.client() as ck:
                for x in xs[k]:
                    y, pos = step(ck, sid, x)
                    answers.append((pos, x, y))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert c.get(f"/v1/streams/{sid}").json()["position"] == xs.shape[0] * xs.shape[1]
    answers.sort(key=lambda a: a[0])
    assert [a[0] for a in answers] == list(range(1, len(answers) + 1))
    want = reference(model, np.stack([a[1] for a in answers]))
    np.testing.assert_array_equal(np.stack([a[2] for a in answers]), want)


def test_run_restores_the_process_collector_settings_it_changes(files):
    """run() raises gen 0's threshold and freezes what exists while it serves, and gives both back after: a
    process that embeds the server keeps its own settings."""
    code = ("import gc, json, os, signal, sys\n"
            "import lstm_engine as le\n"
            "from lstm_engine.serve import GC_THRESHOLD, Server, bind, run\n"
            "signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn raises it again once it stopped\n"
            "gc.set_threshold(500, 7, 9)\n"
            "before = (gc.get_threshold(), gc.get_freeze_count())\n"
            "seen = []\n"
            "def ready():\n"
            "    seen.append((gc.get_threshold(), gc.get_freeze_count()))\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "run(Server(le.load(sys.argv[1])), bind('127.0.0.1', 0), on_ready=ready)\n"
            "print(json.dumps({'before': before, 'serving': seen[0], 'after': (gc.get_threshold(), "
            "gc.get_freeze_count()), 'threshold': GC_THRESHOLD}))\n")
    p = subprocess.run([sys.executable, "-c", code, files["float"]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["before"] == [[500, 7, 9], 0]
    assert got["serving"][0] == [got["threshold"], 7, 9] and got["serving"][1] > 0
    assert got["after"] == got["before"]
