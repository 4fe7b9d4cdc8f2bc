"""Modules exported with torch.onnx.export load with le.load and match onnxruntime at every size — or are
refused with an error naming the ONNX node; there is no third outcome."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn
F = torch.nn.functional

import lstm_engine as le  # noqa: E402
from torch_modules import MODULES as SHARED  # noqa: E402
from torch_modules import MultiOutput, SpeakerEncoder, floats  # noqa: E402

# (batch, steps) besides the export's (2, 5).
SIZES = [(2, 5), (3, 9), (1, 1), (4, 2)]


class LengthMean(nn.Module):
    """A mean written as a sum over the run-time length: Shape -> Gather -> Cast(float) -> Div."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(x)
        return out.sum(1) / out.size(1)


class Packed(nn.Module):
    """pack_padded_sequence / pad_packed_sequence: ONNX's sequence_lens from a run-time input."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)  # sorted, longest first
        out, (h, _) = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.fc(out), h


def sorted_lengths(B, T):
    lengths = torch.sort(torch.randint(1, T + 1, (B,)), descending=True)[0]
    lengths[0] = T
    return torch.randn(B, T, 4), lengths


class SizeSlices(nn.Module):
    """Slice bounds computed from the run-time length: the same bounds counted from the end."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(x)
        T = x.size(1)
        return out[:, :T - 1] - out[:, 1:], out[:, T - 2:].mean(1), out[:, : T + 3].sum(1)


class StridedFrontEnd(nn.Module):
    """A speech front end: reflect padding, a strided Conv1d and ReLU before the LSTM."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, kernel_size=4, stride=2)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 1)

    def forward(self, x):  # x (B, T, 1)
        z = F.pad(x.transpose(1, 2), (3, 3), mode="reflect")
        z = torch.relu(self.conv(z)).transpose(1, 2)
        return torch.sigmoid(self.fc(self.rnn(z)[0]))


# The modules le.from_torch reads too (tests/torch_modules.py), smaller where onnxruntime's run is slow and
# without the projection torch.onnx.export cannot write; then what only an ONNX graph carries.
MODULES = {
    **SHARED,
    "tuple and list returns": (lambda: MultiOutput(proj_size=0), floats(4)),
    "L2-normalised speaker embedding": (lambda: SpeakerEncoder(64, 32), floats(40)),
    "sum over steps divided by the run-time length": (LengthMean, floats(4)),
    "packed sequences (sorted lengths)": (Packed, sorted_lengths),
    "slice bounds from the run-time length": (SizeSlices, floats(4)),
    "reflect pad and strided Conv1d": (StridedFrontEnd, floats(1)),
}


def export(module, inputs, path, dynamic=True, opset=None):
    names = [f"input{i}" for i in range(len(inputs))]
    with torch.no_grad():
        n_out = len(torch.utils._pytree.tree_leaves(module(*inputs)))
    outputs = [f"output{i}" for i in range(n_out)]
    axes = None
    if dynamic:
        axes = {n: {0: "batch", 1: "steps"} for n in names[:1]}
        axes.update({n: {1 if t.dim() > 1 else 0: "batch"} for n, t in zip(names[1:], inputs[1:])})
        axes.update({o: {0: "batch"} for o in outputs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), str(path), input_names=names, output_names=outputs,
                          dynamic_axes=axes, dynamo=False, **({} if opset is None else {"opset_version": opset}))
    return names, outputs


# The exporter's default opset, with dynamic axes and with static shapes; and opsets 11 (axes, splits and
# pads as attributes, Softmax's old semantics) and 20 with dynamic axes.
VARIANTS = [(True, None), (False, None), (True, 11), (True, 20)]


@pytest.mark.parametrize("dynamic, opset", VARIANTS, ids=["dynamic axes", "static shapes", "opset 11", "opset 20"])
@pytest.mark.parametrize("name", MODULES)
def test_exported_module_matches_onnxruntime(name, dynamic, opset, tmp_path):
    make, make_input = MODULES[name]
    if opset == 11 and "einsum" in name:
        pytest.skip("torch exports einsum from opset 12")
    torch.manual_seed(0)
    module = make().eval()
    path = tmp_path / "m.onnx"
    names, outputs = export(module, make_input(2, 5), path, dynamic, opset)
    model = le.load(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B, T in SIZES if dynamic else [(2, 5)]:
        feeds = {n: t.numpy() for n, t in zip(names, make_input(B, T))}
        try:
            with torch.no_grad():
                ref = torch.utils._pytree.tree_leaves(module(*[torch.from_numpy(feeds[n]) for n in names]))
        except RuntimeError:  # too short for the module (reflect padding): the engine says so too
            with pytest.raises(ValueError):
                model.run(feeds)
            continue
        got = model.run(feeds)
        want = sess.run(None, feeds)
        assert list(got) == outputs
        for o, w, r in zip(outputs, want, ref):
            assert got[o].shape == w.shape, (o, B, T)
            np.testing.assert_allclose(got[o], w, rtol=1e-4, atol=1e-5, err_msg=f"{o} at batch {B}, steps {T}")
            np.testing.assert_allclose(got[o], r.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{o} vs torch")
