"""PyTorch models end to end: real modules and real files, loaded without torch, against torch's outputs."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lstm_engine as le

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def torch_out(module, x):
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    y, st = out if isinstance(out, tuple) else (out, None)
    st = st if isinstance(st, tuple) else (st,)
    return y.numpy(), [s.numpy() for s in st if s is not None]


def engine_states(state):
    return [np.concatenate([entry[k] for entry in state]) for k in range(len(state[0]))]


BARE = [
    (torch.nn.LSTM, dict(num_layers=3)),
    (torch.nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3)),
    (torch.nn.GRU, dict(num_layers=3, bidirectional=True)),
    (torch.nn.RNN, dict(num_layers=2, nonlinearity="relu", bidirectional=True)),
    (torch.nn.LSTM, dict(bias=False)),
]


@pytest.mark.parametrize("save", ["pt", "safetensors", "le"])
@pytest.mark.parametrize("cls,kwargs", BARE)
def test_bare_state_dict_files(tmp_path, cls, kwargs, save):
    torch.manual_seed(0)
    module = cls(5, 6, batch_first=True, **kwargs).eval()
    x = np.random.default_rng(0).standard_normal((3, 11, 5)).astype(np.float32)
    y_ref, st_ref = torch_out(module, x)
    options = {"nonlinearity": kwargs["nonlinearity"]} if "nonlinearity" in kwargs else {}
    if save == "pt":
        path = tmp_path / "m.pt"
        torch.save(module.state_dict(), path)
    elif save == "safetensors":
        path = tmp_path / "m.safetensors"
        safetensors_torch.save_file(module.state_dict(), path)
    else:
        path = tmp_path / "engine.safetensors"
        le.save(le.from_torch(module), path)
        options = {}
    y, state = le.load(path, **options).forward(x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for got, want in zip(engine_states(state), st_ref):
        np.testing.assert_allclose(got, want, atol=1e-5)


class TokenModel(torch.nn.Module):
    """The usual language-model shape: Embedding -> LSTM -> LayerNorm -> Linear."""

    def __init__(self, cell=torch.nn.LSTM):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 12)
        self.rnn = cell(12, 16, num_layers=2, batch_first=True)
        self.drop = torch.nn.Dropout(0.3)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Sequential(torch.nn.Linear(16, 20), torch.nn.Tanh(), torch.nn.Linear(20, 50))

    def forward(self, ids):
        return self.head(self.norm(self.drop(self.rnn(self.embed(ids))[0])))


@pytest.mark.parametrize("cell", [torch.nn.LSTM, torch.nn.GRU])
def test_custom_modules_need_their_forward(cell):
    torch.manual_seed(1)
    net = TokenModel(cell).eval()
    ids = np.random.default_rng(1).integers(0, 50, size=(4, 9))
    with torch.no_grad():
        want = net(torch.from_numpy(ids)).numpy()
    with pytest.raises(ValueError, match="pass an example input"):  # its forward decides what runs
        le.from_torch(net)
    model = le.from_torch(net, torch.from_numpy(ids))
    got, _ = model.forward(ids)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(np.array([[0, 50]]))


def test_sequential_with_batchnorm_and_softmax():
    torch.manual_seed(2)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                              torch.nn.Linear(6, 3), torch.nn.Softmax(dim=-1)).eval()
    seq[1].running_mean.uniform_(-1, 1)
    seq[1].running_var.uniform_(0.5, 2)
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        want = seq(torch.from_numpy(x)).numpy()
    # BatchNorm1d normalises axis 1, the features of (B, F) but the steps of (B, T, F): only an input says which.
    with pytest.raises(ValueError, match="BatchNorm1d"):
        le.from_torch(seq)
    got, _ = le.from_torch(seq, x).forward(x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unsupported_children_are_named():
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"'1' \(Conv1d\)"):
        le.from_torch(net)


def test_container_state_dict_file_points_to_the_export_path(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(TokenModel().state_dict(), path)
    with pytest.raises(le.LoadError, match="le.save\\(le.from_torch"):
        le.load(path)


def test_whole_module_file_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.LSTM(2, 3), path)
    with pytest.raises(le.LoadError, match="state_dict"):
        le.load(path)


def test_loading_needs_no_framework(tmp_path):
    torch.manual_seed(3)
    module = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
    torch.save(module.state_dict(), tmp_path / "m.pt")
    x = np.random.default_rng(3).standard_normal((2, 5, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", torch_out(module, x)[0])
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None      # any 'import torch' now fails
        sys.modules["keras"] = None
        sys.modules["tensorflow"] = None
        import numpy as np
        import lstm_engine as le
        y, _ = le.load({str(tmp_path / "m.pt")!r}).forward(np.load({str(tmp_path / "x.npy")!r}))
        assert np.abs(y - np.load({str(tmp_path / "want.npy")!r})).max() < 1e-5
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
