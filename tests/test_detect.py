"""formats.detect: the one place that says what a file is, from its content (never its name)."""
import io
import pickle
import zipfile

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import formats
from lstm_engine.formats._safetensors import write_safetensors


def _model():
    rng = np.random.default_rng(0)
    return le.Model([le.LSTM(rng.standard_normal((16, 3)), rng.standard_normal((16, 4)))])


def test_every_kind_from_content(tmp_path):
    torch = pytest.importorskip("torch")
    h5py = pytest.importorskip("h5py")
    files = {}
    le.save(_model(), files.setdefault("lstm_engine", tmp_path / "a.bin"))
    write_safetensors(files.setdefault("safetensors", tmp_path / "b.bin"), {"weight_ih_l0": np.zeros((4, 3), np.float32)})
    net = torch.nn.LSTM(3, 4)
    torch.save(net.state_dict(), files.setdefault("torch", tmp_path / "c.bin"))
    torch.save(net.state_dict(), files.setdefault("torch-legacy", tmp_path / "d.bin"),
               _use_new_zipfile_serialization=False)
    with open(files.setdefault("npz", tmp_path / "e.bin"), "wb") as f:
        np.savez(f, w=np.zeros(3))
    with zipfile.ZipFile(files.setdefault("keras", tmp_path / "f.bin"), "w") as zf:
        zf.writestr("config.json", "{}")
    with h5py.File(files.setdefault("hdf5", tmp_path / "g.bin"), "w", userblock_size=512) as f:
        f["w"] = np.zeros(3)  # a user block moves the HDF5 signature to byte 512
    files.setdefault("pickle", tmp_path / "h.bin").write_bytes(pickle.dumps({"w": np.zeros(3)}))
    files.setdefault("unknown", tmp_path / "i.bin").write_bytes(b"hello, world\n" * 4)
    for kind, path in files.items():
        assert formats.detect(path) == kind, path
        assert formats.describe(path).startswith(formats.FILE_KINDS[kind])
    assert "format version" in formats.describe(files["lstm_engine"])
    with open(files["lstm_engine"], "rb") as f:
        assert formats.detect(io.BytesIO(f.read())) == "safetensors"  # a file object: the container only


def test_a_program_from_torch_export_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), path)
    assert formats.detect(path) == "torch-export"
    with pytest.raises(le.LoadError, match=r"torch\.export program.*le\.from_torch\(module, example_input\)"):
        le.load(path)


def test_unreadable_files_are_load_errors(tmp_path):
    with pytest.raises(le.LoadError, match="cannot be read"):
        formats.detect(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(le.LoadError, match="not a readable zip archive"):
        formats.detect(bad)
