"""Streams that move: a pool stream's save_state/load_state, the same bytes as a batch-1 session's, so a
stream goes on in another pool, session or process exactly as if it had never moved."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lstm_engine as le

pytestmark = pytest.mark.timeout(120)


def float_model(dtype=np.float32, head_bias=0.0):
    r = np.random.default_rng(4).standard_normal
    return le.Model([le.LSTM(r((64, 6)) * 0.3, r((64, 16)) * 0.3, r(64), r(64), dtype=dtype),
                     le.GRU(r((30, 16)) * 0.3, r((30, 10)) * 0.3, r(30), r(30), dtype=dtype),
                     le.Dense(r((3, 10)), r(3) + head_bias, dtype=dtype)])


def masked_lm():
    r = np.random.default_rng(5).standard_normal
    return le.Model([le.Embedding(r((9, 4)), mask_zero=True), le.LSTM(r((24, 4)), r((24, 6)), r(24), r(24)),
                     le.Dense(r((9, 6)), r(9))])


X = np.random.default_rng(6).standard_normal((12, 6)).astype(np.float32)
IDS = np.array([3, 0, 5, 0, 0, 7, 1, 0, 2, 8, 0, 4])  # padding ids (0) the mask repeats over, moved mid-run


def steps(stream, xs):
    return np.stack([stream.step(x) for x in xs])


@pytest.mark.parametrize("make,xs", [(float_model, X), (masked_lm, IDS)], ids=["float", "masked-ids"])
def test_a_pool_stream_moves_to_another_pool_and_to_a_session(make, xs):
    model = make()
    with model.pool() as pool:
        stay = steps(pool.open(), xs)  # never moved
        a = pool.open()
        first = steps(a, xs[:5])
        blob = a.save_state()
    with make().pool() as other:  # another pool of a model loaded again: same weights, another object
        b = other.open()
        b.load_state(blob)
        rest = steps(b, xs[5:])
        assert b.save_state() != blob
    assert np.array_equal(np.concatenate([first, rest]), stay)
    # A pool stream's bytes are a batch-1 session's: the stream goes on in a session and back.
    session = model.session()
    session.load_state(blob)
    from_session = np.concatenate([session.step(np.asarray(x)[None]) for x in xs[5:8]])
    with model.pool() as pool:
        back = pool.open()
        back.load_state(session.save_state())
        from_pool = steps(back, xs[8:])
    assert np.array_equal(np.concatenate([first, from_session, from_pool]), stay)


def test_a_session_state_and_a_stream_state_are_the_same_bytes():
    model = float_model()
    session = model.session()
    for x in X[:4]:
        session.step(x[None])
    with model.pool() as pool:
        s = pool.open()
        steps(s, X[:4])
        assert s.save_state() == session.save_state()


def test_load_state_refuses_what_it_cannot_take():
    model = float_model()
    with model.pool() as pool:
        s = pool.open()
        steps(s, X[:3])
        before = s.state
        with pytest.raises(TypeError, match="expected bytes"):
            s.load_state("state")
        with pytest.raises(ValueError, match="not a saved session state"):
            s.load_state(b"\0" * 64)
        blob = s.save_state()
        with pytest.raises(ValueError, match="checksum"):
            s.load_state(blob[:-9] + bytes([blob[-9] ^ 1]) + blob[-8:])
        with pytest.raises(ValueError, match="batch size 2"):
            s.load_state(model.session(batch_size=2).save_state())
        with pytest.raises(ValueError, match="different model"):
            s.load_state(masked_lm().session().save_state())
        with pytest.raises(ValueError, match="different weights"):
            s.load_state(float_model(head_bias=1.0).session().save_state())
        for got, want in zip(s.state, before):  # nothing written by a refused load
            assert all(np.array_equal(a, b) for a, b in zip(got, want))
        s.close()
        with pytest.raises(RuntimeError, match="closed"):
            s.save_state()
        with pytest.raises(RuntimeError, match="closed"):
            s.load_state(blob)
    f64 = float_model(dtype=(np.float32, np.float64))
    with f64.pool(dtype=np.float64) as pool:
        with pytest.raises(ValueError, match="float32 but this pool stream runs float64"):
            pool.open().load_state(f64.session().save_state())


HALF = """
import sys
import numpy as np
import lstm_engine as le
model = le.load(sys.argv[1])
xs = np.load(sys.argv[2])
with model.pool() as pool:
    s = pool.open()
    if sys.argv[3] == "first":
        ys = [s.step(x) for x in xs[:5]]
        open(sys.argv[4], "wb").write(s.save_state())
    else:
        s.load_state(open(sys.argv[4], "rb").read())
        ys = [s.step(x) for x in xs[5:]]
np.save(sys.argv[5], np.stack(ys))
"""


@pytest.mark.parametrize("make,xs", [(float_model, X), (masked_lm, IDS)], ids=["float", "masked-ids"])
def test_a_pool_stream_moves_between_two_processes(make, xs, tmp_path):
    model = make()
    le.save(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "xs.npy", xs)
    for half in ("first", "rest"):
        out = subprocess.run([sys.executable, "-c", HALF, tmp_path / "m.safetensors", tmp_path / "xs.npy", half,
                              tmp_path / "state.bin", tmp_path / f"{half}.npy"],
                             capture_output=True, text=True, timeout=100)
        assert out.returncode == 0, out.stderr
    with model.pool() as pool:
        stay = steps(pool.open(), xs)
    assert np.array_equal(np.concatenate([np.load(tmp_path / "first.npy"), np.load(tmp_path / "rest.npy")]), stay)
