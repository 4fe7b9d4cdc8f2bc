"""read_safetensors/write_safetensors against the reference safetensors writer, and against hand-made bad headers.

Every file is built in tmp_path during the run. Bad headers must raise LoadError naming the file (and the tensor)
before anything of the claimed size is allocated.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from helpers import allocates_less_than, byte_edits
from lstm_engine.errors import LoadError
from lstm_engine.formats._safetensors import read_safetensors, write_safetensors

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _raw_file(path, header, data: bytes = b"", header_len: int | None = None) -> str:
    """A safetensors file from a header (dict -> JSON, or raw bytes) and a data buffer."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(encoded) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + encoded + data)
    return str(path)


def _raises_quickly(path: str, pattern: str) -> None:
    """read_safetensors(path) raises LoadError matching ``pattern`` and naming the file, allocating < 1 MB."""
    with allocates_less_than(1 << 20), pytest.raises(LoadError, match=pattern) as info:
        read_safetensors(path)
    assert path in str(info.value)


def _numpy_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "lstm.weight_ih_l0": rng.standard_normal((16, 3)).astype(np.float32),
        "f64": rng.standard_normal((2, 3, 4)),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i64": np.arange(-4, 4, dtype=np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i16": np.array([-7, 7], dtype=np.int16),
        "i8": np.array([-1, 1], dtype=np.int8),
        "u8": np.arange(3, dtype=np.uint8),
        "u16": np.array([65535], dtype=np.uint16),
        "u32": np.array([2**32 - 1], dtype=np.uint32),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "flag": np.array([True, False, True]),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same names, exactly equal values; float16 widened to float32; native, C-contiguous, writable."""
    assert set(got) == set(expected)
    for name, want in expected.items():
        want = want.astype(np.float32 if want.dtype == np.float16 else want.dtype.newbyteorder("="))
        np.testing.assert_array_equal(got[name], want, err_msg=name, strict=True)
        assert got[name].dtype.isnative and got[name].flags.c_contiguous and got[name].flags.writeable, name


# ---------------------------------------------------------------------------------------------------------------
# Valid files


def test_reads_reference_numpy_writer(tmp_path):
    tensors = _numpy_tensors()
    path = str(tmp_path / "np.safetensors")
    safetensors_numpy.save_file(tensors, path, metadata={"format": "np", "hidden_size": "16"})
    got, metadata = read_safetensors(path)
    _assert_same(got, tensors)
    assert metadata == {"format": "np", "hidden_size": "16"}


def test_reads_reference_torch_writer(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    state = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2).state_dict()
    tensors = {
        **state,
        "half": torch.randn(3, 2).half(),
        "bf16": torch.randn(4, 3).bfloat16(),
        "double": torch.randn(2, 2).double(),
        "long": torch.arange(5),
        "bool": torch.tensor([True, False]),
    }
    path = str(tmp_path / "torch.safetensors")
    safetensors_torch.save_file(tensors, path)
    got, metadata = read_safetensors(path)
    expected = {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v).numpy() for k, v in tensors.items()}
    _assert_same(got, expected)
    assert got["bf16"].dtype == np.float32 and set(state) <= set(got)
    assert metadata == {}


def test_writer_round_trip(tmp_path):
    tensors = _numpy_tensors()
    tensors["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    tensors["transposed"] = np.arange(12, dtype=np.float64).reshape(3, 4).T
    path = str(tmp_path / "ours.safetensors")
    write_safetensors(path, tensors, {"source": "test"})
    reference = safetensors_numpy.load_file(path)
    for name, want in tensors.items():
        np.testing.assert_array_equal(reference[name], want, err_msg=name)
    got, metadata = read_safetensors(path)
    _assert_same(got, tensors)
    assert metadata == {"source": "test"}
    # Names keep their order; data is aligned: every tensor starts at a multiple of its item size.
    assert list(got) == list(tensors)
    raw = (tmp_path / "ours.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    for name, entry in json.loads(raw[8 : 8 + header_len]).items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % tensors[name].itemsize == 0, name


def test_writer_without_metadata(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    write_safetensors(path, {"w": np.ones(3, np.float32)})
    assert read_safetensors(path)[1] == {}


@pytest.mark.parametrize(
    "tensors, metadata, error",
    [
        ({"c": np.ones(2, np.complex64)}, None, ValueError),
        ({"o": np.array([None])}, None, ValueError),
        ({"__metadata__": np.ones(2)}, None, ValueError),
        ({"w": np.ones(2)}, {"k": 1}, TypeError),
    ],
)
def test_writer_refuses(tmp_path, tensors, metadata, error):
    with pytest.raises(error):
        write_safetensors(tmp_path / "bad.safetensors", tensors, metadata)


def test_gaps_between_tensors_allowed(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I32", "shape": [1], "data_offsets": [16, 20]},
    }
    data = np.float32([1, 2]).tobytes() + bytes(8) + np.int32([7]).tobytes()
    got, _ = read_safetensors(_raw_file(tmp_path / "gaps.safetensors", header, data))
    np.testing.assert_array_equal(got["a"], [1, 2])
    np.testing.assert_array_equal(got["b"], [7])


def test_bool_bytes_other_than_one(tmp_path):
    header = {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    got, _ = read_safetensors(_raw_file(tmp_path / "bool.safetensors", header, b"\x00\x02\xff"))
    np.testing.assert_array_equal(got["m"], [False, True, True], strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, data_len, pattern",
    [
        (
            {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))},
            12,
            r"tensors 'a' \[0, 8\) and 'b' \[4, 12\) overlap",
        ),
        ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(0, 8))}, 8, "overlap"),
        ({"w": _entry(offsets=(8, 16))}, 12, r"tensor 'w'.*outside the 12-byte data buffer"),
        ({"w": _entry(offsets=(8, 4))}, 12, r"tensor 'w'.*outside"),
        ({"w": _entry(offsets=(-4, 4))}, 12, r"tensor 'w'.*outside"),
        ({"w": _entry(shape=(10**6, 10**6), offsets=(0, 8))}, 8, r"tensor 'w'.*needs 4000000000000 bytes"),
        ({"w": _entry(shape=(3,))}, 8, r"tensor 'w'.*needs 12 bytes.*hold 8"),
        ({"w": _entry(shape=(0, 2**40, 2**40), offsets=(0, 0))}, 8, r"tensor 'w'.*too large"),
        ({"w": _entry(shape=(-2, -1))}, 8, r"tensor 'w'.*shape"),
        ({"w": _entry(shape=(2.0,))}, 8, r"tensor 'w'.*shape"),
        ({"w": {"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]}}, 8, r"tensor 'w'.*shape"),
        ({"w": _entry(shape=[1] * 65, offsets=(0, 4))}, 8, r"tensor 'w'.*shape"),
        ({"w": _entry(dtype="F17")}, 8, r"tensor 'w'.*unknown dtype 'F17'"),
        ({"w": _entry(dtype=3)}, 8, r"tensor 'w'.*unknown dtype"),
        ({"w": _entry(dtype="F8_E4M3", offsets=(0, 2))}, 8, r"tensor 'w'.*F8_E4M3 is not supported"),
        ({"w": {"dtype": "F32", "shape": [2]}}, 8, r"tensor 'w'.*data_offsets"),
        ({"w": _entry(offsets=(0, 4, 8))}, 8, r"tensor 'w'.*data_offsets"),
        ({"w": [1, 2]}, 8, r"tensor 'w'"),
        ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
        ({"__metadata__": [1]}, 0, "__metadata__"),
    ],
)
def test_bad_headers(tmp_path, header, data_len, pattern):
    _raises_quickly(_raw_file(tmp_path / "bad.safetensors", header, bytes(data_len)), pattern)


@pytest.mark.parametrize(
    "raw_header, pattern",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[1, 2]", "JSON list, expected an object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}', "names 'w' twice"),
        (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', "not valid"),
    ],
    ids=["syntax", "not_utf8", "list", "deeply_nested", "duplicate_name", "5000_digit_int"],
)
def test_bad_json(tmp_path, raw_header, pattern):
    _raises_quickly(_raw_file(tmp_path / "bad.safetensors", raw_header, bytes(4)), pattern)


@pytest.mark.parametrize("header_len", [10**12, 2**64 - 1, 100_000_001, 1000])
def test_header_length_out_of_range(tmp_path, header_len):
    # 1000 is under the limit but past the end of this small file
    _raises_quickly(_raw_file(tmp_path / "len.safetensors", b"{}", header_len=header_len), "header length")


@pytest.mark.parametrize("content", [b"", b"\x01", b"1234567"])
def test_too_short(tmp_path, content):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    _raises_quickly(str(path), "too short")


def test_random_bytes(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "random.safetensors"
    for n in (8, 9, 100, 5000):
        path.write_bytes(rng.randbytes(n))
        with pytest.raises(LoadError):
            read_safetensors(path)


_VALID_HEADER = json.dumps({"a": _entry(), "b": _entry("I32", (1,), (8, 12)), "__metadata__": {"k": "v"}}).encode()
_VALID = len(_VALID_HEADER).to_bytes(8, "little") + _VALID_HEADER + bytes(12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=byte_edits(_VALID))
def test_mutated_files(tmp_path, data):
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(data)
    try:
        tensors, metadata = read_safetensors(path)
    except LoadError:
        return
    # A file that reads is read as its header says: those names, shapes and dtypes, that metadata.
    header = json.loads(bytes(data[8:8 + int.from_bytes(data[:8], "little")]))
    assert metadata == header.pop("__metadata__", {})
    assert set(tensors) == set(header)
    for name, entry in header.items():
        assert tensors[name].shape == tuple(entry["shape"])
        assert tensors[name].dtype == {"F32": np.float32, "I32": np.int32}.get(entry["dtype"], tensors[name].dtype)
