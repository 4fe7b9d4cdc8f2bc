"""Example PyTorch modules that both front doors read: le.from_torch (torch.export, test_torch_export.py)
and torch.onnx.export then le.load (test_onnx_torch_export.py). One definition each, so the two paths are
checked on the same networks; sizes are arguments where a path wants them smaller or richer."""
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


def floats(features):
    return lambda B, T: (torch.randn(B, T, features),)


def ids(vocab):
    return lambda B, T: (torch.randint(0, vocab, (B, T)),)


class HeadFirst(nn.Module):
    """The head is declared before the LSTM it follows."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.rnn = nn.LSTM(4, 16, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return torch.relu(self.fc(out[:, -1]))


class FinalHidden(nn.Module):
    """h_n[-1] of a bidirectional stack (the last layer's backward direction), and c_n."""

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
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        top, _ = out.max(dim=1)
        return self.fc(torch.cat([out.mean(dim=1), top, torch.amax(out, 1), out.sum(1)], dim=-1))


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
    """batch_first=False with the transposes around it."""

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
        w = torch.softmax(self.score(out), dim=1)  # (B, T, 1)
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

    def forward(self, x):  # x (B, T, 6)
        z = F.relu(self.bn(self.conv(x.transpose(1, 2))))
        z = F.gelu(self.conv2(z)).transpose(1, 2)
        return self.fc(self.gru(z)[0])


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
    """Nested returns; proj_size=0 for torch.onnx.export, which cannot export a projection."""

    def __init__(self, proj_size=3):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True, bidirectional=True, proj_size=proj_size)
        self.fc = nn.Linear(2 * (proj_size or 8), 2)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.fc(out), (h, c), [out[:, 0], h[-2:]]


class SpeakerEncoder(nn.Module):
    """Resemblyzer's shape: LSTM(40, hidden, 3) -> Linear -> ReLU -> L2-normalised embedding (Resemblyzer:
    256 and 256)."""

    def __init__(self, hidden=256, embedding=256):
        super().__init__()
        self.lstm = nn.LSTM(40, hidden, num_layers=3, batch_first=True)
        self.linear = nn.Linear(hidden, embedding)
        self.relu = nn.ReLU()

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        embeds_raw = self.relu(self.linear(hidden[-1]))
        return embeds_raw / torch.norm(embeds_raw, dim=1, keepdim=True)


class InitialState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, num_layers=2, batch_first=True)

    def forward(self, x, h0, c0):
        out, (h, c) = self.rnn(x, (h0, c0))
        return out, h, c


def initial_state_inputs(B, T):
    return torch.randn(B, T, 4), torch.randn(2, B, 8), torch.randn(2, B, 8)


class ZerosState(nn.Module):
    """The tutorial habit: zero initial states built in forward from the input's batch size."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h0 = torch.zeros(2, x.size(0), 8)
        out, _ = self.rnn(x, h0)
        return self.fc(out[:, -1, :])


class Reshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        out, (h, _) = self.rnn(x)
        a = torch.stack([out[:, 0], out[:, -1]], dim=1).flatten(1)  # (B, 12)
        b = out.unsqueeze(1).reshape(out.shape[0], -1, 6).permute(0, 2, 1)  # (B, 6, T)
        c = h.squeeze(0).view(-1, 3, 2).sum(-1) * 0.5 - 1.0
        d = (out[:, 1:-1:2] if out.shape[1] > 0 else out).abs().sqrt()
        return a, b.mean(dim=-1, keepdim=True), c, torch.tanh(torch.sigmoid(h[-1]) / 2) + d.sum(1)


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)

    def forward(self, x):
        y, _ = self.rnn(x)
        y = y * 3
        return (F.elu(y, 0.7), F.leaky_relu(y, 0.2), F.gelu(y), F.gelu(y, approximate="tanh"), torch.sigmoid(y),
                F.softplus(y), F.hardtanh(y), F.silu(y), y - 2 * torch.tanh(y), 1 - y, 2 / (y.abs() + 1),
                torch.clamp(y, -1, 0.5), y.pow(2).sqrt())


# The modules both paths run, by a description of what each one exercises: (make module, make inputs(B, T)).
MODULES = {
    "head declared first": (HeadFirst, floats(4)),
    "out[:, -1] then relu": (LastStep, floats(4)),
    "h_n[-1] of a bidirectional stack, and c_n": (FinalHidden, floats(4)),
    "bidirectional GRU states concatenated": (BiGRUConcat, floats(4)),
    "mean, max, amax and sum pooling": (Pooling, floats(4)),
    "residual LSTMs with LayerNorm": (ResidualLN, floats(4)),
    "softmax heads on a relu RNN": (SoftmaxHeads, floats(4)),
    "batch_first=False with transposes": (TimeMajor, floats(4)),
    "attention pooling (bmm)": (AttentionPool, floats(4)),
    "attention pooling (einsum)": (lambda: AttentionPool(use_einsum=True), floats(4)),
    "Conv1d and BatchNorm front end -> GRU": (CRNN, floats(6)),
    "Embedding -> LSTM -> Linear": (LanguageModel, ids(30)),
    "tuple and list returns": (MultiOutput, floats(4)),
    "L2-normalised speaker embedding": (SpeakerEncoder, floats(40)),
    "initial states as inputs": (InitialState, initial_state_inputs),
    "zero states built in forward": (ZerosState, floats(4)),
    "stack, flatten, reshape, permute, slices": (Reshapes, floats(4)),
    "activations and arithmetic": (Activations, floats(4)),
}
