"""read_torch_file against files written by torch itself, and against hand-made hostile or broken files.

Every file is built in tmp_path during the run. Valid files are compared exactly with the tensors torch saved;
hostile ones must raise UnsafeModelError/LoadError without running anything or allocating much.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import allocates_less_than, byte_edits
from lstm_engine.errors import LoadError, UnsafeModelError
from lstm_engine.formats._torch_pickle import read_torch_file

torch = pytest.importorskip("torch")
nn = torch.nn


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _expected(t: torch.Tensor) -> np.ndarray:
    """What the reader must return for ``t``: its values, fp16/bf16 widened to float32."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.numpy()


def _assert_same(arrays: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, every array exactly equal, same dtype, C-contiguous and writable."""
    assert list(arrays) == list(tensors)
    for key, t in tensors.items():
        expected, got = _expected(t), arrays[key]
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key, strict=True)
        assert got.flags.c_contiguous and got.flags.writeable, key


def _save(tmp_path, obj, name: str = "model.pt", **kwargs) -> str:
    path = str(tmp_path / name)
    torch.save(obj, path, **kwargs)
    return path


def _rezip(src: str, dst: str, replace: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> None:
    """Copy a zip entry by entry, replacing the contents of entries whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)


class _Storage:
    """A storage for hand-made pickles: pickled as the persistent id torch.save writes."""

    def __init__(self, key: str, numel: int, storage_type=None) -> None:
        self.key, self.numel = key, numel
        self.storage_type = storage_type if storage_type is not None else torch.FloatStorage


class _Reduce:
    """Pickles as the call ``fn(*args)``: any call torch.save would write, or a hostile one."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def _v2(storage: _Storage, offset, size, stride) -> _Reduce:
    return _Reduce(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, collections.OrderedDict())


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _write_zip(path, pickle_bytes: bytes, records: dict[str, bytes] = (), byteorder: bytes = b"little") -> str:
    """A torch-style zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in dict(records).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return str(path)


def _crafted(tmp_path, obj, records=None, name="crafted.pt") -> str:
    """A torch zip whose data.pkl is ``obj`` pickled with _Storage persistent ids; default record: 12 float32."""
    if records is None:
        records = {"0": np.arange(12, dtype="<f4").tobytes()}
    return _write_zip(tmp_path / name, _dumps(obj), records)


# ---------------------------------------------------------------------------------------------------------------
# Files written by torch


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 2))


MODELS = {
    "lstm_bidir_proj_3layers": lambda: nn.LSTM(5, 7, num_layers=3, bidirectional=True, proj_size=3),
    "gru_2layers": lambda: nn.GRU(4, 6, num_layers=2, batch_first=True),
    "rnn_relu_nobias": lambda: nn.RNN(3, 5, nonlinearity="relu", bias=False),
    "lstm_cell": lambda: nn.LSTMCell(3, 4),
    "embedding_lstm_linear": _sequential,
    "batchnorm": lambda: nn.BatchNorm1d(3),  # int64 num_batches_tracked, 0-dim
}


@pytest.mark.parametrize("name", MODELS)
def test_state_dicts_read_exactly(tmp_path, name):
    torch.manual_seed(0)
    state = MODELS[name]().state_dict()
    arrays = read_torch_file(_save(tmp_path, state))
    _assert_same(arrays, state)


def test_agrees_with_torch_load(tmp_path):
    torch.manual_seed(1)
    path = _save(tmp_path, nn.LSTM(3, 4, num_layers=2, bidirectional=True).state_dict())
    _assert_same(read_torch_file(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool])
def test_dtypes(tmp_path, dtype):
    torch.manual_seed(2)
    state = {k: v.to(dtype) for k, v in nn.GRU(3, 4).state_dict().items()}
    arrays = read_torch_file(_save(tmp_path, state))
    _assert_same(arrays, state)
    wide = np.float64 if dtype == torch.float64 else np.float32
    if dtype.is_floating_point:
        assert all(a.dtype == wide for a in arrays.values())


def test_rebuild_tensor_v3_dtypes(tmp_path):
    # uint16/uint32/uint64 are written with UntypedStorage (numel in bytes) and an explicit dtype
    state = {
        "u16": torch.tensor([1, 2, 65535]).to(torch.uint16),
        "u32": torch.tensor([[7, 8], [9, 2**31]]).to(torch.uint32),
        "u64": torch.tensor([3, 2**40]).to(torch.uint64),
    }
    path = _save(tmp_path, state)
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert b"_rebuild_tensor_v3" in pkl
    arrays = read_torch_file(path)
    for key, t in state.items():
        np.testing.assert_array_equal(arrays[key], t.to(torch.int64).numpy(), err_msg=key)
        assert arrays[key].dtype == np.dtype(str(t.dtype).removeprefix("torch."))


def test_views_sharing_storage_and_strides(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "a": t,
        "b": t[1:, ::2],
        "c": t.t(),
        "d": t[2],
        "e": t.reshape(-1)[5:11],
        "noncontig": torch.randn(5, 8)[:, 1::3],
        "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),  # stride 0
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    arrays = read_torch_file(_save(tmp_path, state))
    _assert_same(arrays, state)
    # Views come back as independent copies, not aliases of one buffer.
    arrays["a"][...] = -1
    np.testing.assert_array_equal(arrays["b"], t[1:, ::2].numpy())


def test_parameters_and_nested_dicts(tmp_path):
    torch.manual_seed(3)
    model = nn.LSTM(3, 4)
    exp_avg = torch.randn(16, 3)
    checkpoint = {
        "epoch": 3,
        "name": "run-1",
        "state_dict": model.state_dict(keep_vars=True),  # nn.Parameter -> _rebuild_parameter
        # shaped like an optimizer state_dict: state keyed by int parameter index, groups in a list
        "optimizer": {"state": {0: {"exp_avg": exp_avg}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }
    arrays = read_torch_file(_save(tmp_path, checkpoint))
    expected = {f"state_dict.{k}": p for k, p in model.state_dict().items()}
    _assert_same(arrays, {**expected, "optimizer.state.0.exp_avg": exp_avg})


def test_big_endian_file(tmp_path):
    torch.manual_seed(4)
    base = torch.randn(3, 5)
    # One storage per tensor, in dict order, so record data/i holds tensor i.
    state = {
        "f32": base,
        "f64": base.double(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.arange(-3, 3),
        "i16": torch.arange(4, dtype=torch.int16),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
    }
    little = _save(tmp_path, state, "little.pt")
    swapped = {"byteorder": b"big"}
    for i, t in enumerate(state.values()):
        raw = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        swapped[f"data/{i}"] = raw.byteswap().tobytes()
    big = str(tmp_path / "big.pt")
    _rezip(little, big, swapped)
    # torch itself reads the rewritten file back to the same tensors: the rewrite is a faithful big-endian file.
    for key, t in torch.load(big, weights_only=True).items():
        assert torch.equal(t, state[key]), key
    arrays = read_torch_file(big)
    _assert_same(arrays, state)
    assert all(a.dtype.isnative for a in arrays.values())


def test_missing_byteorder_means_little(tmp_path):
    state = {"w": torch.randn(2, 3)}
    path = str(tmp_path / "nobyteorder.pt")
    with zipfile.ZipFile(_save(tmp_path, state)) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/byteorder"):
                zout.writestr(info.filename, zin.read(info))
    _assert_same(read_torch_file(path), state)


def test_hand_made_valid_file_matches_torch(tmp_path):
    # Checks the crafting helpers write what torch.save writes, so the hostile variants below are realistic.
    storage = _Storage("0", 12)
    state = collections.OrderedDict(w=_v2(storage, 2, (2, 3), (4, 1)), v=_v2(storage, 0, (12,), (1,)))
    path = _crafted(tmp_path, state)
    expected = torch.load(path, weights_only=True)
    _assert_same(read_torch_file(path), expected)


# ---------------------------------------------------------------------------------------------------------------
# Legacy (pre-zip) files: five pickles, then each storage as int64 numel + raw bytes


class _LegacyPickler(pickle.Pickler):
    """Writes storages as the persistent ids of legacy files; ``view`` = (offset, size) makes a storage view."""

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            view = getattr(obj, "view", None)
            meta = None if view is None else (obj.key + "_view", *view)
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel, meta)
        return None


def _legacy_file(path, obj, records: dict[str, bytes], *, protocol=1001, little=True, keys=None) -> str:
    """A legacy torch.save stream of ``obj`` whose storages hold ``records`` (int64 numel from the data length)."""
    out = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, protocol, {"protocol_version": protocol, "little_endian": little,
                                                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(head, out, protocol=2)
    _LegacyPickler(out, protocol=2).dump(obj)
    pickle.dump(sorted(records) if keys is None else keys, out, protocol=2)
    for key in sorted(records):
        out.write(np.int64(len(records[key]) // 4).tobytes() + records[key])
    Path(path).write_bytes(out.getvalue())
    return str(path)


@pytest.mark.parametrize("name", MODELS)
def test_legacy_state_dicts_read_exactly(tmp_path, name):
    torch.manual_seed(5)
    state = MODELS[name]().state_dict()
    path = _save(tmp_path, state, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        assert not zipfile.is_zipfile(f)
    _assert_same(read_torch_file(path), torch.load(path, weights_only=True))
    _assert_same(read_torch_file(path), state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool])
def test_legacy_dtypes(tmp_path, dtype):
    torch.manual_seed(6)
    state = {k: v.to(dtype) for k, v in nn.GRU(3, 4).state_dict().items()}
    _assert_same(read_torch_file(_save(tmp_path, state, _use_new_zipfile_serialization=False)), state)


def test_legacy_views_parameters_and_nested_dicts(tmp_path):
    torch.manual_seed(7)
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    model = nn.LSTM(3, 4)
    checkpoint = {
        "step": 10,
        "model_state": model.state_dict(keep_vars=True),
        "views": {"b": t[1:, ::2], "c": t.t(), "expanded": torch.tensor([1.0, 2.0]).expand(3, 2)},
        "optimizer_state": {"state": {140234: {"exp_avg": torch.randn(16, 3)}}, "param_groups": [{"lr": 0.1}]},
    }
    path = _save(tmp_path, checkpoint, _use_new_zipfile_serialization=False)
    expected = {f"model_state.{k}": v for k, v in model.state_dict().items()}
    expected.update({f"views.{k}": v for k, v in checkpoint["views"].items()})
    expected["optimizer_state.state.140234.exp_avg"] = checkpoint["optimizer_state"]["state"][140234]["exp_avg"]
    _assert_same(read_torch_file(path), expected)


def test_legacy_storage_views(tmp_path):
    # Old torch wrote storage views as ('storage', type, root, location, numel, (view_key, offset, size)).
    root = _Storage("0", 12)
    view = _Storage("0", 12)
    view.view = (4, 6)
    state = collections.OrderedDict(w=_v2(root, 0, (12,), (1,)), v=_v2(view, 1, (2, 2), (2, 1)))
    path = _legacy_file(tmp_path / "views.pt", state, {"0": np.arange(12, dtype="<f4").tobytes()})
    arrays = read_torch_file(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(12, dtype=np.float32))
    np.testing.assert_array_equal(arrays["v"], np.array([[5, 6], [7, 8]], dtype=np.float32))


def test_hand_made_legacy_file_matches_torch(tmp_path):
    state = collections.OrderedDict(w=_v2(_Storage("0", 12), 2, (2, 3), (4, 1)))
    path = _legacy_file(tmp_path / "l.pt", state, {"0": np.arange(12, dtype="<f4").tobytes()})
    _assert_same(read_torch_file(path), torch.load(path, weights_only=True))


def _legacy_case(tmp_path, **kwargs) -> str:
    state = collections.OrderedDict(w=_v2(_Storage("0", 12), 0, (12,), (1,)))
    records = kwargs.pop("records", {"0": np.arange(12, dtype="<f4").tobytes()})
    return _legacy_file(tmp_path / "bad.pt", kwargs.pop("obj", state), records, **kwargs)


@pytest.mark.parametrize(
    "case, error, message",
    [
        (dict(protocol=1000), LoadError, "protocol version 1000, expected 1001"),
        (dict(little=False), LoadError, "big-endian"),
        (dict(records={"0": np.arange(11, dtype="<f4").tobytes()}), LoadError, r"storage '0' should hold 12"),
        (dict(keys=["0", "1"]), LoadError, r"key list names '1', a storage no tensor uses"),
        (dict(keys=[]), LoadError, r"storage '0' is used by a tensor but missing from the storage key list"),
        (dict(obj={"w": _Reduce(os.system, "echo hacked")}), UnsafeModelError, "refusing pickle global 'posix.system"),
        (dict(obj=_Reduce(collections.OrderedDict), records={}), LoadError, "no tensors"),
    ],
)
def test_legacy_bad_files_refused(tmp_path, case, error, message):
    with pytest.raises(error, match=message) as info:
        read_torch_file(_legacy_case(tmp_path, **case))
    assert str(tmp_path) in str(info.value)


def test_legacy_whole_module_refused(tmp_path):
    path = _save(tmp_path, nn.LSTM(3, 4), _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModelError, match=r"torch\.nn\.modules\.rnn\.LSTM.*state_dict\(\)"):
        read_torch_file(path)


@pytest.mark.parametrize("cut", [20, 200, -1])
def test_legacy_truncated_file_refused(tmp_path, cut):
    path = _save(tmp_path, nn.GRU(3, 4).state_dict(), _use_new_zipfile_serialization=False)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:cut])
    with pytest.raises(LoadError, match=path):
        read_torch_file(path)


# ---------------------------------------------------------------------------------------------------------------
# Refused: not a state_dict


def test_whole_module_refused_with_state_dict_hint(tmp_path):
    path = _save(tmp_path, nn.LSTM(3, 4))
    with pytest.raises(UnsafeModelError, match=r"torch\.nn\.modules\.rnn\.LSTM.*state_dict\(\)") as info:
        read_torch_file(path)
    assert path in str(info.value)


@pytest.mark.parametrize(
    "obj, message",
    [
        (torch.ones(3), "single tensor"),
        ([torch.ones(3)], "list"),
        ({"epoch": 1, "name": "x"}, "no tensors"),
    ],
)
def test_not_a_dict_of_tensors(tmp_path, obj, message):
    with pytest.raises(LoadError, match=message):
        read_torch_file(_save(tmp_path, obj))


def test_compressed_records_refused(tmp_path):
    path = str(tmp_path / "deflated.pt")
    _rezip(_save(tmp_path, {"w": torch.ones(100)}), path, {}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(LoadError, match="compressed"):
        read_torch_file(path)


# ---------------------------------------------------------------------------------------------------------------
# Hostile pickles: nothing may run


@pytest.mark.parametrize(
    "make_payload, global_name",
    [
        (lambda marker: _Reduce(os.system, f"touch {marker}"), "posix.system"),
        (lambda marker: _Reduce(eval, f"open({str(marker)!r}, 'w')"), "__builtin__.eval"),
        (lambda marker: _Reduce(exec, f"open({str(marker)!r}, 'w')"), "__builtin__.exec"),
        (lambda marker: _Reduce(open, str(marker), "w"), "io.open"),
        (lambda marker: _Reduce(torch.storage._load_from_bytes, b"\x80\x02N."), "torch.storage._load_from_bytes"),
    ],
)
def test_code_running_globals_refused(tmp_path, make_payload, global_name):
    marker = tmp_path / "pwned"
    payload = {"w": _v2(_Storage("0", 12), 0, (12,), (1,)), "x": make_payload(marker)}
    path = _crafted(tmp_path, payload)
    with pytest.raises(UnsafeModelError) as info:
        read_torch_file(path)
    assert f"'{global_name}'" in str(info.value) and path in str(info.value)
    assert not marker.exists()


def test_payload_harness_is_live(tmp_path):
    # The same payload through a plain unpickler does create the marker: the check above is meaningful.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Reduce(open, str(marker), "w"), protocol=2)).close()
    assert marker.exists()


def test_os_system_by_its_os_name_refused(tmp_path):
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    pickle_bytes = b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command + b"\x85R."
    path = _write_zip(tmp_path / "os.pt", pickle_bytes)
    with pytest.raises(UnsafeModelError, match=r"'os\.system'"):
        read_torch_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "pickle_bytes",
    [
        # BUILD (None, {"fn": 1}) on the _rebuild_tensor_v2 stand-in
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnK\x01s\x86b.",
        # BUILD {"x": 1} on the OrderedDict class
        b"\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00xK\x01sb.",
        # BUILD (None, {"name": "float64"}) on the torch.float32 stand-in
        b"\x80\x02ctorch\nfloat32\nN}X\x04\x00\x00\x00nameX\x07\x00\x00\x00float64s\x86b.",
    ],
)
def test_allowed_globals_cannot_be_modified(tmp_path, pickle_bytes):
    with pytest.raises(LoadError):
        read_torch_file(_write_zip(tmp_path / "build.pt", pickle_bytes))
    # Later loads are unaffected.
    state = {"w": torch.randn(2, 2)}
    _assert_same(read_torch_file(_save(tmp_path, state)), state)


# ---------------------------------------------------------------------------------------------------------------
# Broken files


def test_truncated_zip(tmp_path):
    data = Path(_save(tmp_path, nn.GRU(3, 4).state_dict())).read_bytes()
    for cut in (0, 1, 4, 30, len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 22, len(data) - 1):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(LoadError) as info:
            read_torch_file(path)
        assert str(path) in str(info.value)


def test_corrupted_data_record(tmp_path):
    weight = torch.arange(1000, dtype=torch.float32) + 0.5
    data = bytearray(Path(_save(tmp_path, {"lstm.weight_ih_l0": weight})).read_bytes())
    start = data.find(weight.numpy().tobytes())
    data[start + 100] ^= 0xFF
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"tensor 'lstm\.weight_ih_l0'.*CRC"):
        read_torch_file(path)


def test_corrupted_pickle(tmp_path):
    data = bytearray(Path(_save(tmp_path, {"w": torch.ones(2)})).read_bytes())
    data[data.find(b"_rebuild_tensor_v2")] ^= 0x20
    path = tmp_path / "corrupt.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="data.pkl.*CRC"):
        read_torch_file(path)


def test_missing_storage_record(tmp_path):
    path = _crafted(tmp_path, {"w": _v2(_Storage("7", 12), 0, (12,), (1,))})
    with pytest.raises(LoadError, match=r"tensor 'w'.*archive/data/7.*missing"):
        read_torch_file(path)


def test_storage_record_shorter_than_claimed(tmp_path):
    path = _crafted(tmp_path, {"w": _v2(_Storage("0", 1 << 40), 0, (4,), (1,))})
    with allocates_less_than(1 << 20), \
            pytest.raises(LoadError, match=r"tensor 'w'.*holds 48 bytes.*1099511627776 float32"):
        read_torch_file(path)


@pytest.mark.parametrize(
    "offset, size, stride, message",
    [
        (12, (1,), (1,), "holds 12 float32 elements.*needs 13"),
        (0, (3, 4), (4, 2), "needs 15"),
        (0, (2, 2), (1 << 40, 1), "needs 1099511627778"),
        (0, (2,), (-1,), "stride"),
        (-1, (2,), (1,), "offset"),
        (0, (2, -3), (1, 1), "size"),
        (0, (2.0,), (1,), "size"),
        (0, (2, 2), (1,), "different lengths"),
        (0, (1 << 70,), (0,), "size"),
        (0, (0, 1 << 62), (1, 1), "too large"),
        (0, (10**6, 10**6), (0, 0), "take more than"),
        (0, "abc", (1,), "size"),
    ],
)
def test_out_of_range_views(tmp_path, offset, size, stride, message):
    path = _crafted(tmp_path, {"lstm.w": _v2(_Storage("0", 12), offset, size, stride)})
    with allocates_less_than(1 << 20), pytest.raises(LoadError, match=r"tensor 'lstm\.w'.*" + message):
        read_torch_file(path)


def test_out_of_range_view_v3(tmp_path):
    # UntypedStorage numel is in bytes: 12 bytes hold 3 int32 elements
    storage = _Storage("0", 12, torch.UntypedStorage)
    v3 = _Reduce(torch._utils._rebuild_tensor_v3, storage, 1, (3,), (1,), False, collections.OrderedDict(), torch.int32)
    path = _crafted(tmp_path, {"w": v3}, {"0": np.arange(3, dtype="<i4").tobytes()})
    with pytest.raises(LoadError, match=r"tensor 'w'.*holds 3 int32 elements.*needs 4"):
        read_torch_file(path)


@pytest.mark.parametrize(
    "pid_obj",
    [
        _Reduce(collections.OrderedDict),  # not a storage at all
        _Storage("../../etc/passwd", 12),
        _Storage("0", -1),
        _Storage("0", 12, storage_type=torch.float32),
    ],
)
def test_bad_storages(tmp_path, pid_obj):
    with pytest.raises(LoadError):
        read_torch_file(_crafted(tmp_path, {"w": _v2(pid_obj, 0, (1,), (1,))}))


def test_several_data_pkl_refused(tmp_path):
    path = tmp_path / "two.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/data.pkl", _dumps({}))
        zf.writestr("b/data.pkl", _dumps({}))
    with pytest.raises(LoadError, match="data.pkl"):
        read_torch_file(path)


@pytest.mark.parametrize(
    "pickle_bytes",
    [
        b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc",  # BINBYTES8 claiming 1 TB
        b"\x80\x04\x8d" + (1 << 40).to_bytes(8, "little") + b"abc",  # BINUNICODE8 claiming 1 TB
        b"\x80\x02\x8b\xff\xff\xff\x7f\x00",  # LONG4 claiming 2 GB
        b"\x80\x02Nr\x00\x00\x00\x01.",  # LONG_BINPUT 2**24: the C unpickler would grow its memo to 256 MB
        b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 5000 + b"N" + b"s" * 5000 + b".",  # dicts nested 5000 deep
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf32\x86R.",
        b"\x80\x02]q\x00h\x00a.",  # a list containing itself
        b"",
        b"\x80\x02",
    ],
    ids=[
        "binbytes8",
        "binunicode8",
        "long4",
        "memo_index",
        "deep_dicts",
        "codecs_utf32",
        "self_list",
        "empty",
        "no_stop",
    ],
)
def test_malformed_pickles(tmp_path, pickle_bytes):
    path = _write_zip(tmp_path / "malformed.pt", pickle_bytes)
    with allocates_less_than(4 << 20), pytest.raises(LoadError) as info:
        read_torch_file(path)
    assert path in str(info.value)


def test_shared_dicts_fanning_out(tmp_path):
    # 30 levels of {"a": d, "b": d} pickle to a few hundred bytes but hold 2**30 paths
    nested = {}
    for _ in range(30):
        nested = {"a": nested, "b": nested}
    with pytest.raises(LoadError, match="more than 250000 entries"):
        read_torch_file(_crafted(tmp_path, nested))
    # the same with an empty tensor at every leaf: refused by the output budget
    level = {"t": _v2(_Storage("0", 12), 0, (0,), (1,))}
    for depth in range(4):
        level = {f"{depth}.{i}".ljust(1000, "x"): level for i in range(15)}
    with pytest.raises(LoadError, match="take more than"):
        read_torch_file(_crafted(tmp_path, level))


def test_random_bytes(tmp_path):
    rng = random.Random(5)
    path = tmp_path / "random.pt"
    for n in (1, 8, 100, 5000):
        for prefix in (b"", b"PK\x03\x04", b"\x80\x02"):
            path.write_bytes(prefix + rng.randbytes(n))
            with pytest.raises(LoadError):
                read_torch_file(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300))
def test_random_pickles_in_valid_zip(tmp_path, payload):
    path = _write_zip(tmp_path / "fuzz.pt", b"\x80\x02" + payload, {"0": bytes(48)})
    try:
        read_torch_file(path)
    except LoadError:
        pass


_REAL_FILE = io.BytesIO()
torch.save({"w": torch.arange(6.0).reshape(2, 3), "v": torch.ones(3).half()}, _REAL_FILE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=byte_edits(_REAL_FILE.getvalue()))
def test_mutated_files(tmp_path, data):
    # Flipped bytes anywhere: zip headers, versions, flags, sizes, CRCs, pickle, data.
    path = tmp_path / "mutated_file.pt"
    path.write_bytes(data)
    try:
        arrays = read_torch_file(path)
    except LoadError:
        return
    assert all(isinstance(a, np.ndarray) for a in arrays.values())


_REAL_PICKLE = _dumps(
    collections.OrderedDict(
        w=_v2(_Storage("0", 12), 0, (3, 4), (4, 1)),
        u=_Reduce(
            torch._utils._rebuild_parameter, _v2(_Storage("0", 12), 2, (2,), (3,)), True, collections.OrderedDict()
        ),
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=byte_edits(_REAL_PICKLE))
def test_mutated_pickles(tmp_path, data):
    path = _write_zip(tmp_path / "mutated.pt", data, {"0": np.arange(12, dtype="<f4").tobytes()})
    try:
        arrays = read_torch_file(path)
    except LoadError:
        return
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    # Whatever the mutated pickle says, a float32 tensor is a view of the storage's bytes, never of others.
    for a in arrays.values():
        if a.dtype == np.float32:
            assert np.isin(a, np.arange(12)).all(), a
