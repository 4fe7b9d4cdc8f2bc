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

# (batch, steps) besides the export's (2, 5).
SIZES = [(2, 5), (3, 9), (1, 1), (4, 2)]


class HeadFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.rnn = nn.LSTM(4, 16, batch_first=True)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return torch.relu(self.fc(self.rnn(x)[0][:, -1]))


class FinalHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        _, (h_n, c_n) = self.rnn(x)
        return self.fc(h_n[-1]), c_n


class BiGRUConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 10, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        _, h = self.gru(x)
        return self.fc(torch.cat([h[-2], h[-1]], dim=1))


class Pooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.fc = nn.Linear(24, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(torch.cat([out.mean(dim=1), out.max(dim=1)[0], out.sum(1)], dim=-1))


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


class ResidualLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 16)
        self.rnns = nn.ModuleList([nn.LSTM(16, 16, batch_first=True) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(2)])

    def forward(self, x):
        x = self.proj(x)
        for rnn, norm in zip(self.rnns, self.norms):
            x = norm(x + rnn(x)[0])
        return x


class SoftmaxHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 8, batch_first=True, nonlinearity="relu", num_layers=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        logits = self.fc(self.rnn(x)[0])
        return F.softmax(logits, dim=-1), F.log_softmax(logits, dim=2)


class TimeMajor(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, (h, c) = self.rnn(x.transpose(0, 1))
        return self.fc(out.permute(1, 0, 2)), c[-1]


class AttentionPool(nn.Module):
    def __init__(self, use_einsum=False):
        super().__init__()
        self.use_einsum = use_einsum
        self.rnn = nn.GRU(4, 8, batch_first=True, bidirectional=True)
        self.score = nn.Linear(16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        w = torch.softmax(self.score(out), dim=1)
        if self.use_einsum:
            pooled = torch.einsum("bt,btf->bf", w.squeeze(-1), out)
        else:
            pooled = torch.bmm(w.transpose(1, 2), out).squeeze(1)
        return self.fc(pooled)


class CRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 8, kernel_size=3, stride=1, padding=2, dilation=2, groups=2)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, kernel_size=3, padding="same")
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        z = F.relu(self.bn(self.conv(x.transpose(1, 2))))
        z = F.gelu(self.conv2(z)).transpose(1, 2)
        return self.fc(self.gru(z)[0])


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


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True, dropout=0.3)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 30)

    def forward(self, tokens):
        return self.out(self.drop(self.rnn(self.embed(tokens))[0]))


class MultiOutput(nn.Module):
    """Nested returns (torch.onnx.export cannot export proj_size: that stays le.from_torch's)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.fc(out), (h, c), [out[:, 0], h[-2:]]


class SpeakerEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 64, num_layers=3, batch_first=True)
        self.linear = nn.Linear(64, 32)

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        e = torch.relu(self.linear(hidden[-1]))
        return e / torch.norm(e, dim=1, keepdim=True)


class InitialState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, batch_first=True)

    def forward(self, x, h0, c0):
        out, (h, c) = self.rnn(x, (h0, c0))
        return out, h, c


class ZerosState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h0 = torch.zeros(2, x.size(0), 8)
        return self.fc(self.rnn(x, h0)[0][:, -1, :])


class Reshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        out, (h, _) = self.rnn(x)
        a = torch.stack([out[:, 0], out[:, -1]], dim=1).flatten(1)
        b = out.unsqueeze(1).reshape(out.shape[0], -1, 6).permute(0, 2, 1)
        c = h.squeeze(0).view(-1, 3, 2).sum(-1) * 0.5 - 1.0
        return a, b.mean(dim=-1, keepdim=True), c, torch.tanh(torch.sigmoid(h[-1]) / 2)


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)

    def forward(self, x):
        y = self.rnn(x)[0] * 3
        return (F.elu(y, 0.7), F.leaky_relu(y, 0.2), F.gelu(y), torch.sigmoid(y), F.softplus(y),
                y - 2 * torch.tanh(y), 2 / (y.abs() + 1), torch.clamp(y, -1, 0.5), y.pow(2).sqrt())


def floats(features):
    return lambda B, T: (torch.randn(B, T, features),)


MODULES = {
    "head declared first": (HeadFirst, floats(4)),
    "out[:, -1] then relu": (LastStep, floats(4)),
    "h_n[-1] of a bidirectional stack, and c_n": (FinalHidden, floats(4)),
    "bidirectional GRU states concatenated": (BiGRUConcat, floats(4)),
    "mean, max and sum pooling": (Pooling, floats(4)),
    "sum over steps divided by the run-time length": (LengthMean, floats(4)),
    "packed sequences (sorted lengths)": (Packed, sorted_lengths),
    "slice bounds from the run-time length": (SizeSlices, floats(4)),
    "residual LSTMs with LayerNorm": (ResidualLN, floats(4)),
    "softmax heads on a relu RNN": (SoftmaxHeads, floats(4)),
    "batch_first=False with transposes": (TimeMajor, floats(4)),
    "attention pooling (bmm)": (AttentionPool, floats(4)),
    "attention pooling (einsum)": (lambda: AttentionPool(use_einsum=True), floats(4)),
    "Conv1d and BatchNorm front end": (CRNN, floats(6)),
    "reflect pad and strided Conv1d": (StridedFrontEnd, floats(1)),
    "Embedding -> LSTM -> Linear": (LanguageModel, lambda B, T: (torch.randint(0, 30, (B, T)),)),
    "tuple and list returns": (MultiOutput, floats(4)),
    "L2-normalised speaker embedding": (SpeakerEncoder, floats(40)),
    "initial states as inputs": (InitialState, lambda B, T: (torch.randn(B, T, 4), torch.randn(2, B, 8),
                                                             torch.randn(2, B, 8))),
    "zero states built in forward": (ZerosState, floats(4)),
    "stack, flatten, reshape, permute, slices": (Reshapes, floats(4)),
    "activations and arithmetic": (Activations, floats(4)),
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
