"""Pickles of NumPy arrays and plain containers (read_pickle, le.load_state_dict), and hostile pickles refused.

Valid pickles are written by pickle itself with every protocol and compared exactly with what was pickled; hostile
ones must raise UnsafeModelError/LoadError without running anything.
"""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine.errors import LoadError, UnsafeModelError
from lstm_engine.formats.numpy_pickle import arrays, loads, read_pickle

PROTOCOLS = range(2, pickle.HIGHEST_PROTOCOL + 1)


def _values():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "ints": np.arange(-3, 3, dtype=np.int16),
        "flags": np.array([True, False, True]),
        "text": np.array(["ab", "c"]),
        "empty": np.zeros((0, 5), np.float32),
        "scalars": [np.float32(1.5), np.int64(-7)],
        "plain": {"name": "run", "step": 3, "lr": 0.1, "tuple": (1, "a"), "set": {1, 2}, "bytes": b"\x00\x01",
                  "none": None},
        "nested": collections.OrderedDict(lstm={"weight_ih_l0": np.ones((8, 2), np.float32)}),
        "object": np.array({"inner": np.arange(3)}, dtype=object),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_values_read_exactly(protocol):
    expected = _values()
    got = loads(pickle.dumps(expected, protocol=protocol))
    assert list(got) == list(expected)
    for key in ("f32", "big_endian", "fortran", "ints", "flags", "text", "empty"):
        np.testing.assert_array_equal(got[key], expected[key], strict=True if key != "big_endian" else False)
        assert got[key].flags.c_contiguous and got[key].dtype.isnative, key
    assert got["big_endian"].dtype == np.float64
    assert [v.item() for v in got["scalars"]] == [1.5, -7]
    assert got["plain"] == expected["plain"]
    assert isinstance(got["nested"], collections.OrderedDict)
    np.testing.assert_array_equal(got["nested"]["lstm"]["weight_ih_l0"], np.ones((8, 2)))
    np.testing.assert_array_equal(got["object"].item()["inner"], np.arange(3))


def test_shared_and_cyclic_references():
    a = np.arange(4.0)
    inner = [a]
    inner.append(inner)
    got = loads(pickle.dumps({"x": a, "y": a, "cycle": inner}))
    assert got["x"] is got["y"]
    assert got["cycle"][1] is got["cycle"]


def test_arrays_flattens_a_checkpoint():
    checkpoint = {"step": 3, "model": {"lstm.weight_ih_l0": np.ones((4, 2))}, "names": np.array(["a"]),
                  "opt": {0: {"m": np.zeros(2)}}}
    got = arrays(loads(pickle.dumps(checkpoint)), "ckpt")
    assert list(got) == ["model.lstm.weight_ih_l0", "opt.0.m"]


def test_arrays_needs_a_dict_with_arrays():
    with pytest.raises(LoadError, match=r"ckpt: holds a list, expected a dict of arrays"):
        arrays([np.ones(2)], "ckpt")
    with pytest.raises(LoadError, match=r"ckpt: the pickle holds no numeric arrays"):
        arrays({"a": 1}, "ckpt")


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Custom:
    pass


def _raw_array_pickle(shape, dtype_spec: str, data, state_extra=()) -> bytes:
    """A protocol-2 pickle of numpy's _reconstruct + BUILD with the given (possibly lying) fields."""
    from numpy._core import multiarray

    class Fake:
        def __reduce__(self):
            return (multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, shape, np.dtype(dtype_spec), False, data, *state_extra))

    return pickle.dumps(Fake(), protocol=2)


@pytest.mark.parametrize(
    "obj, error, message",
    [
        (_Reduce(os.system, "echo hacked"), UnsafeModelError, r"refusing pickle global 'posix\.system'"),
        ({"w": _Custom()}, UnsafeModelError, r"refusing pickle global 'test_numpy_pickle\._Custom'"),
        (_Reduce(collections.Counter, "ab"), UnsafeModelError, r"'collections\.Counter'"),
        (np.ma.masked_array([1.0, 2.0]), UnsafeModelError, r"numpy\.ma"),
        (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), LoadError, "not supported"),
        (_Reduce(bytearray, 1 << 40), LoadError, "bytearray is allowed only from bytes"),
        ({"ok": bytearray(b"xyz")}, None, None),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), LoadError, r"dtype 'M8' is not supported"),
    ],
)
def test_hostile_or_unsupported_objects_refused(obj, error, message):
    if error is None:  # the harmless neighbour of a refused case
        assert loads(pickle.dumps(obj, protocol=2)) == {"ok": b"xyz"}
        return
    with pytest.raises(error, match=message):
        loads(pickle.dumps(obj, protocol=2), "evil.pkl")


@pytest.mark.parametrize(
    "data, message",
    [
        (_raw_array_pickle((3,), "f4", b"\x00" * 8), r"needs 12 bytes, its data has 8"),
        (_raw_array_pickle((1 << 40, 1 << 30), "O", [1]), r"object array of shape"),
        (_raw_array_pickle((-1,), "f4", b""), r"has shape"),
        (_raw_array_pickle((2,), "f4", 5), r"expected bytes"),
        (b"\x80\x02]q\x00r\xff\xff\xff\x00.", r"memo entry"),  # LONG_BINPUT far ahead: a memo bomb
        (b"\x80\x02" + b"]" * 100 + b"a" * 99 + b".", r"nests deeper"),
        (b"\x80\x02X\xff\xff\xff\x7fab.", r"not a valid pickle"),  # claims 2 GiB of text
        (pickle.dumps(_Reduce(np.dtype, "f4", False, True), protocol=2)[:-1], r"not a valid pickle"),
    ],
)
def test_malformed_pickles_refused(data, message):
    with pytest.raises(LoadError, match=message):
        loads(data, "bad.pkl")


def test_persistent_ids_refused():
    import io

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "external" if isinstance(obj, _Custom) else None

    buffer = io.BytesIO()
    P(buffer, protocol=2).dump({"w": _Custom()})
    with pytest.raises(LoadError, match="external object 'external'"):
        loads(buffer.getvalue(), "p.pkl")


# ---------------------------------------------------------------------------------------------------------------
# le.load_state_dict and le.load on the formats it reads


def _lstm_state(rng):
    return {
        "weight_ih_l0": rng.standard_normal((16, 3)).astype(np.float32),
        "weight_hh_l0": rng.standard_normal((16, 4)).astype(np.float32),
        "bias_ih_l0": rng.standard_normal(16).astype(np.float32),
        "bias_hh_l0": rng.standard_normal(16).astype(np.float32),
    }


def test_load_state_dict_reads_pickles_npz_and_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    state = _lstm_state(rng)
    with open(tmp_path / "w.pkl", "wb") as f:
        pickle.dump(state, f)
    np.savez(tmp_path / "w.npz", **state)
    np.savez_compressed(tmp_path / "wc.npz", **state)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save(tensors, tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("w.pkl", "w.npz", "wc.npz", "zip.pt", "legacy.pt"):
        got = le.load_state_dict(tmp_path / name)
        assert list(got) == list(state), name
        for key in state:
            np.testing.assert_array_equal(got[key], state[key], strict=True, err_msg=f"{name} {key}")
        # The same files load as models of their bare LSTM.
        model = le.load(tmp_path / name)
        assert isinstance(model.layers[0], le.LSTM) and model.layers[0].hidden_size == 4, name


def test_load_state_dict_refusals(tmp_path):
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(LoadError, match=r"objects\.npz: not a readable \.npz of plain arrays"):
        le.load_state_dict(tmp_path / "objects.npz")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"w": _Reduce(os.system, "echo hacked")}, f, protocol=2)
    with pytest.raises(UnsafeModelError, match=r"evil\.pkl: refusing pickle global 'posix\.system'"):
        le.load_state_dict(tmp_path / "evil.pkl")
    with pytest.raises(UnsafeModelError, match=r"evil\.pkl"):
        le.load(tmp_path / "evil.pkl")
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(LoadError, match=r"text\.txt: not a weights file"):
        le.load_state_dict(tmp_path / "text.txt")


def test_read_pickle_of_a_vocabulary(tmp_path):
    vocab = [50, {"a": 0, "b": 1, "é": 2}]
    with open(tmp_path / "vocab.pkl", "wb") as f:
        pickle.dump(vocab, f, protocol=2)
    assert read_pickle(tmp_path / "vocab.pkl") == vocab


# ---------------------------------------------------------------------------------------------------------------
# madmom files: classes read as records; damaged or hostile networks refused by name


@pytest.fixture
def fake_madmom(monkeypatch):
    """Stand-in madmom modules, so that pickle writes the GLOBALs madmom's files hold."""
    import sys
    import types

    modules = {}
    for name in ("madmom", "madmom.ml", "madmom.ml.nn", "madmom.ml.nn.layers", "madmom.ml.nn.activations"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])

    def cls(module, name):
        made = type(name, (), {"__module__": module, "__init__": lambda self, **state: self.__dict__.update(state)})
        setattr(modules[module], name, made)
        return made

    def fn(name):
        def f(x):
            return x
        f.__module__, f.__qualname__, f.__name__ = "madmom.ml.nn.activations", name, name
        setattr(modules["madmom.ml.nn.activations"], name, f)
        return f

    return {"NeuralNetwork": cls("madmom.ml.nn", "NeuralNetwork"),
            **{n: cls("madmom.ml.nn.layers", n) for n in ("FeedForwardLayer", "RecurrentLayer", "LSTMLayer",
                                                            "Gate", "Cell", "ConvolutionalLayer")},
            "tanh": fn("tanh"), "sigmoid": fn("sigmoid"), "softplus": fn("softplus")}


def test_madmom_networks_and_their_refusals(fake_madmom, tmp_path):
    m = fake_madmom
    rng = np.random.default_rng(3)

    def network(*layers, protocol=2):
        path = tmp_path / f"net{protocol}.pkl"
        path.write_bytes(pickle.dumps(m["NeuralNetwork"](layers=list(layers)), protocol=protocol))
        return path

    rnn = m["RecurrentLayer"](weights=rng.standard_normal((3, 4)).astype(np.float32),
                              bias=np.zeros(4, np.float32), recurrent_weights=np.eye(4, dtype=np.float32),
                              activation_fn=m["tanh"], init=np.zeros(4, np.float32))
    head = m["FeedForwardLayer"](weights=np.ones((4, 1), np.float32), bias=np.zeros(1, np.float32),
                                 activation_fn=m["sigmoid"])
    for protocol in (0, 2):
        model = le.load(network(rnn, head, protocol=protocol))
        x = rng.standard_normal((1, 5, 3)).astype(np.float32)
        h, expected = np.zeros(4), []
        for t in range(5):
            h = np.tanh(x[0, t] @ rnn.weights + h @ rnn.recurrent_weights)
            expected.append(1 / (1 + np.exp(-h.sum())))
        np.testing.assert_allclose(model.forward(x)[0][0, :, 0], expected, rtol=0, atol=1e-5)

    cases = [
        ((m["ConvolutionalLayer"](weights=np.ones((2, 2, 3, 3))),), r"layers\[0\]: madmom ConvolutionalLayer is not "
                                                                   r"supported"),
        ((m["FeedForwardLayer"](weights=np.ones((4, 1)), bias=np.zeros(1), activation_fn=m["softplus"]),),
         r"refusing pickle global 'madmom\.ml\.nn\.activations\.softplus'"),  # a function madmom lacks
        ((m["FeedForwardLayer"](weights=np.ones(4), bias=np.zeros(1), activation_fn=m["tanh"]),),
         r"layers\[0\]: 'weights' is ndarray, expected a 2-D float array"),
        ((m["RecurrentLayer"](weights=np.ones((3, 4), np.float32), bias=np.zeros(4, np.float32),
                              recurrent_weights=np.ones((5, 5), np.float32), activation_fn=m["tanh"]),),
         r"layers\[0\] \(RecurrentLayer\): RNN weight_ih \(4, 3\) and weight_hh \(5, 5\) disagree"),
        ((m["LSTMLayer"](input_gate=None, forget_gate=None, cell=None, output_gate=None, activation_fn=m["tanh"]),),
         r"layers\[0\]\.input_gate is not a madmom object with a state"),
        (("not a layer",), r"layers\[0\]: madmom str is not supported"),
    ]
    for layers, message in cases:
        with pytest.raises(le.LoadError, match=rf"net2\.pkl: {message}"):
            le.load(network(*layers))
