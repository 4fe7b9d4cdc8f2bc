"""Soak: streaming for a long time and loading models over and over leaks neither memory nor Python objects.

After a warm-up (buffers sized, caches filled), resident memory must stay within 1 MB, the interpreter's
allocated blocks and the objects the collector tracks must not grow with the work done, and no thread may be
left behind. Memory is measured after a collection and glibc's malloc_trim, so that heap fragmentation and
the arenas of new threads (each pool starts one) do not pass for leaks. The default run does 10**5 steps and
50 load/drop cycles per format; ``-m slow`` does 10**6 steps and 1000 cycles. A leak of one block per step or
one model per cycle is far above every bound here.

Each measurement runs in a fresh interpreter: in the test process, threads left by earlier tests (Dask's and
Ray's clients, servers' event loops) allocate while we measure, and CI once saw +2.7 MB of RSS over 50 h5 loads
that no run of this file alone shows.
"""
from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest

import lstm_engine as le

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(900)

MB = 1 << 20


def _trim():
    """Hand free heap pages back to the OS (glibc), so RSS counts live memory rather than fragmentation."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also counts freed memory the allocator kept
        pass


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Footprint:
    """Resident memory, allocated blocks, tracked objects and threads, measured after a full collection."""

    def __init__(self):
        gc.collect()
        # Counting objects builds and frees a list of all of them (~1 MB): before the trim, not after it.
        self.objects, self.threads = len(gc.get_objects()), threading.active_count()
        _trim()
        self.blocks, self.rss = sys.getallocatedblocks(), _rss()

    def growth(self):
        now = Footprint()
        return {"rss": now.rss - self.rss, "blocks": now.blocks - self.blocks,
                "objects": now.objects - self.objects, "threads": now.threads - self.threads}


def assert_flat(growth, what):
    print(f"\n{what}: rss {growth['rss'] / 1024:+.0f} kB, allocated blocks {growth['blocks']:+d}, "
          f"tracked objects {growth['objects']:+d}, threads {growth['threads']:+d}")
    assert growth["rss"] <= 1 * MB, growth
    # The interpreter's own caches (json scanners, ctypes, dtype lookups) settle at a few hundred blocks
    # (measured); a leak of one block per step is 10**5 and more, of one model per cycle thousands of objects.
    assert growth["blocks"] < 1000, growth
    assert growth["objects"] < 200, growth
    assert growth["threads"] <= 0, growth


def isolated(name, *args):
    """Run ``name(*args)`` of this module in a fresh interpreter and fail with its output if it fails."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import test_soak; test_soak.{name}(*{args!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=840)
    print(done.stdout)
    assert done.returncode == 0, f"{name}{args} failed:\n{done.stdout}\n{done.stderr[-4000:]}"


def _recurrent_model():
    torch.manual_seed(0)
    return le.from_torch(torch.nn.LSTM(32, 64, num_layers=2))


def _lm():
    torch.manual_seed(1)
    emb, rnn, head = torch.nn.Embedding(50, 16), torch.nn.GRU(16, 64, batch_first=True), torch.nn.Linear(64, 50)
    return le.Model([le.Embedding(emb.weight), *le.from_torch(rnn).layers, le.Dense(head.weight, head.bias)])


def _stream_steps(steps):
    model = _recurrent_model()
    session = model.session()
    x = np.random.default_rng(0).standard_normal((4096, 1, 32)).astype(np.float32)
    out = np.empty((1, 64), np.float32)
    for t in range(20_000):
        session.step(x[t % 4096], out=out)
    before = Footprint()
    for t in range(steps):
        session.step(x[t % 4096], out=out)
    assert np.isfinite(out).all()
    assert_flat(before.growth(), f"{steps} session.step calls")


def test_streaming_steps_stay_flat():
    isolated("_stream_steps", 100_000)


@pytest.mark.slow
def test_million_streaming_steps_stay_flat():
    isolated("_stream_steps", 1_000_000)


def _mixed_streaming(rounds):
    """Steps without out=, chunks of every length, resets and state round trips on an Embedding -> GRU -> Linear."""
    model = _lm()
    session = model.session(2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, (2, 4096))

    def one_round(r):
        t = r % 4000
        session.step(ids[:, t])
        session.feed(ids[:, t:t + 1 + r % 64])
        if r % 97 == 0:
            session.reset(r % 2)
        if r % 251 == 0:
            session.load_state(session.save_state())
        return 2 + r % 64

    for r in range(2000):
        one_round(r)
    before = Footprint()
    steps = sum(one_round(r) for r in range(rounds))
    assert_flat(before.growth(), f"{rounds} rounds, {steps} steps of session.step/feed/reset/state")


def test_mixed_streaming_stays_flat():
    isolated("_mixed_streaming", 5_000)


@pytest.mark.slow
def test_mixed_streaming_long():
    isolated("_mixed_streaming", 30_000)


def _pool_steps(steps):
    """Streams stepping through a pool from two threads, leaving and joining every 500 steps."""
    model = _lm()
    ids = np.random.default_rng(2).integers(0, 50, 4096)
    with model.pool(max_batch=4) as pool:
        def run(n):
            def thread():
                stream = pool.open()
                for t in range(n):
                    if t % 500 == 499:
                        stream.close()
                        stream = pool.open()
                    stream.step(int(ids[t % 4096]))
                stream.close()

            threads = [threading.Thread(target=thread) for _ in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(600)
            assert not any(th.is_alive() for th in threads)

        run(5_000)
        before = Footprint()
        run(steps // 2)
        growth = before.growth()
        assert pool.num_streams == 0
    assert_flat(growth, f"{steps} pool steps, streams joining and leaving")


def test_pool_steps_stay_flat():
    isolated("_pool_steps", 20_000)


@pytest.mark.slow
def test_pool_million_steps_stay_flat():
    isolated("_pool_steps", 1_000_000)


# ----------------------------------------------------------------------------------------------------------
# Loading and dropping models


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """One file per format, each holding ~1.6 MB of weights: a model kept alive by mistake shows in RSS."""
    keras = pytest.importorskip("keras")
    root = tmp_path_factory.mktemp("soak_models")
    torch.manual_seed(2)
    files = {"pt": str(root / "m.pt"), "native": str(root / "m.safetensors"), "keras": str(root / "m.keras"),
             "h5": str(root / "m.h5")}
    torch.save(torch.nn.LSTM(128, 256).state_dict(), files["pt"])
    emb, rnn, head = torch.nn.Embedding(100, 128), torch.nn.LSTM(128, 256, batch_first=True), torch.nn.Linear(256, 100)
    le.save(le.Model([le.Embedding(emb.weight), *le.from_torch(rnn).layers, le.Dense(head.weight, head.bias)]),
            files["native"])
    k = keras.Sequential([keras.Input((None, 128)), keras.layers.LSTM(256, return_sequences=True),
                          keras.layers.Dense(8)])
    k.save(files["keras"])
    k.save(files["h5"])
    return files


def _cycle(path):
    """Load, run forward, a session and a pool stream; return weak references to the model and a weight."""
    model = le.load(path)
    x = np.zeros((1, 3), np.int64) if model.takes_ids else np.zeros((1, 3, model.input_size), np.float32)
    model.forward(x)
    model.session().feed(x)
    with model.pool(max_batch=2) as pool, pool.open() as stream:
        stream.step(x[0, 0])
    layer = model.recurrent_layers[0]
    return weakref.ref(model), weakref.ref(layer.weights()["weight_ih"])


def _load_cycles(path, cycles):
    for _ in range(10):
        _cycle(path)
    before = Footprint()
    for _ in range(cycles):
        refs = _cycle(path)
    gc.collect()
    assert all(ref() is None for ref in refs), "the last model loaded is still alive after being dropped"
    assert_flat(before.growth(), f"{os.path.basename(path)}: {cycles} load/drop cycles")


@pytest.mark.parametrize("fmt", ["native", "pt", "keras", "h5"])
def test_loading_and_dropping_leaks_nothing(model_files, fmt):
    isolated("_load_cycles", model_files[fmt], 50)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["native", "pt", "keras", "h5"])
def test_thousand_load_drop_cycles(model_files, fmt):
    isolated("_load_cycles", model_files[fmt], 1000)
