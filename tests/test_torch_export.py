"""le.from_torch(module, example_input): the real forward, read with torch.export, against torch itself.

Every module here either matches torch within 1e-5 (float32) at the example's shape and at other batch
sizes and lengths, or is refused with an error naming the op, the module path and the source line.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import lstm_engine as le  # noqa: E402
from torch_modules import (MODULES, FinalHidden, HeadFirst, InitialState, LanguageModel, LastStep,  # noqa: E402
                           Pooling, floats)

# (batch, steps) the engine runs besides the example's (2, 5): other batches, other lengths, and 1s.
SIZES = [(2, 5), (3, 9), (1, 4), (4, 1), (1, 1)]


def to_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return type(value)(to_numpy(v) for v in value)


def assert_same(got, want, atol=1e-5, where="y"):
    """Same nesting (a tuple stays a tuple, a list a list) and the same numbers."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), f"{where}: got a {type(got).__name__}"
        assert got.shape == tuple(want.shape), f"{where}: shape {got.shape}, torch {tuple(want.shape)}"
        np.testing.assert_allclose(got, want.detach().numpy(), atol=atol, rtol=1e-5, err_msg=where)
        return
    assert type(got) is type(want), f"{where}: got a {type(got).__name__}, torch a {type(want).__name__}"
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, atol, f"{where}[{i}]")


def check(module, make_input, sizes=SIZES, atol=1e-5, seed=0):
    """Export at (2, 5), then compare with torch at every size; returns the model."""
    torch.manual_seed(seed)
    module.eval()
    example = make_input(2, 5)
    model = le.from_torch(module, example if len(example) > 1 else example[0])
    for B, T in sizes:
        inputs = make_input(B, T)
        with torch.no_grad():
            want = module(*inputs)
        arrays = tuple(t.numpy() for t in inputs)
        got, state = model.forward(arrays if len(arrays) > 1 else arrays[0])
        assert_same(got, want, atol, where=f"y at batch {B}, steps {T}")
    return model


# -- the modules of issue 10 -------------------------------------------------------------------------



@pytest.mark.parametrize("name", MODULES)
def test_module_matches_torch(name):
    make, make_input = MODULES[name]
    torch.manual_seed(7)
    module = make()
    for m in module.modules():  # statistics a trained BatchNorm would have
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    check(module, make_input)


def test_state_is_the_recurrent_layers_final_states():
    torch.manual_seed(3)
    module = FinalHidden().eval()
    x = torch.randn(3, 6, 4)
    model = le.from_torch(module, x)
    _, state = model.forward(x.numpy())
    with torch.no_grad():
        _, (h, c) = module.rnn(x)
    assert len(state) == 2  # one entry per layer, as for a chain: (directions, batch, hidden)
    for k in range(2):
        np.testing.assert_allclose(state[k][0], h[2 * k:2 * k + 2].numpy(), atol=1e-5)
        np.testing.assert_allclose(state[k][1], c[2 * k:2 * k + 2].numpy(), atol=1e-5)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("options", [
    dict(num_layers=1, bidirectional=False, bias=True, batch_first=True),
    dict(num_layers=3, bidirectional=True, bias=False, batch_first=False),
    dict(num_layers=2, bidirectional=True, bias=True, batch_first=True, dropout=0.5),
    dict(num_layers=2, bidirectional=False, bias=True, batch_first=False, proj_size=3),
])
def test_every_recurrent_option(cell, options):
    if "proj_size" in options and cell != "LSTM":
        pytest.skip("proj_size is LSTM-only")
    kwargs = dict(options)
    if cell == "RNN":
        kwargs["nonlinearity"] = "relu"
    rnn = getattr(nn, cell)(5, 7, **kwargs)
    first = options["batch_first"]

    def make_input(B, T):
        return (torch.randn(B, T, 5) if first else torch.randn(T, B, 5),)

    check(rnn, make_input)


def test_unbatched_input():
    torch.manual_seed(4)
    rnn = nn.GRU(3, 5, num_layers=2).eval()
    model = le.from_torch(rnn, torch.randn(6, 3))
    x = torch.randn(9, 3)
    with torch.no_grad():
        want = rnn(x)
    got, _ = model.forward(x.numpy())
    assert_same(got, want)


def test_numpy_and_tuple_example_inputs():
    torch.manual_seed(5)
    module = InitialState().eval()
    rng = np.random.default_rng(5)
    arrays = (rng.standard_normal((2, 5, 4), np.float32), rng.standard_normal((2, 2, 8), np.float32),
              rng.standard_normal((2, 2, 8), np.float32))
    model = le.from_torch(module, arrays)
    with torch.no_grad():
        want = module(*(torch.from_numpy(a) for a in arrays))
    assert_same(model.forward(arrays)[0], want)


@pytest.mark.parametrize("name", ["attention pooling (bmm)", "Embedding -> LSTM -> Linear", "tuple and list returns",
                                  "Conv1d and BatchNorm front end -> GRU"])
def test_exported_model_saves_and_loads(tmp_path, name):
    make, make_input = MODULES[name]
    torch.manual_seed(6)
    module = make().eval()
    model = le.from_torch(module, make_input(2, 5)[0])
    le.save(model, tmp_path / "m.safetensors")
    loaded = le.load(tmp_path / "m.safetensors")
    x = make_input(3, 7)[0]
    with torch.no_grad():
        want = module(x)
    assert_same(loaded.forward(x.numpy())[0], want)
    assert loaded.metadata["exported"] == type(module).__name__


def test_session_streams_a_causal_forward():
    """Step by step through a session equals the whole forward, for a forward that is causal in time."""
    torch.manual_seed(13)
    module = LanguageModel().eval()
    model = le.from_torch(module, torch.randint(0, 30, (2, 5)))
    tokens = torch.randint(0, 30, (3, 6))
    with torch.no_grad():
        want = module(tokens).numpy()
    session = model.session(batch_size=3)
    got = np.stack([session.step(tokens[:, t].numpy()) for t in range(6)], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_session_refuses_pooling_over_time():
    model = le.from_torch(Pooling().eval(), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="ReduceMean|ReduceMax"):
        model.session()


# -- refusals --------------------------------------------------------------------------------------------

class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.post = Post()

    def forward(self, x):
        return self.post(self.rnn(x)[0])


class Post(nn.Module):
    def forward(self, y):
        return torch.fft.rfft(y, dim=1).abs()  # the line the error names


def test_unsupported_op_names_op_module_and_line():
    with pytest.raises(le.UnsupportedOpError) as info:
        le.from_torch(Spectral().eval(), torch.randn(2, 5, 4))
    err = info.value
    assert isinstance(err, le.LoadError)
    assert err.op == "aten.fft_rfft"
    assert "post (Post)" in err.source and "test_torch_export.py:" in err.source
    assert "torch.fft.rfft(y, dim=1)" in str(err)
    assert "aten.linear" in err.supported and "nn.LSTM" in err.supported
    assert "aten.linear" in str(err)


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(x)
        if out.sum() > 0:  # decided by the data: no single graph computes this
            return out * 2
        return out


def test_data_dependent_branch_is_refused_with_its_line():
    with pytest.raises(le.LoadError, match=r"DataBranch.forward.*test_torch_export.py.*if out.sum\(\) > 0"):
        le.from_torch(DataBranch().eval(), torch.randn(2, 5, 4))


class RandomDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5)  # training=True whatever the mode


@pytest.mark.parametrize("module, match", [
    (RandomDropout(), r"RandomDropout\) at .*test_torch_export.py:\d+: return F.dropout.*aten.native_dropout"),
])
def test_other_refusals(module, match):
    with pytest.raises(le.UnsupportedOpError, match=match):
        le.from_torch(module.eval(), torch.randn(2, 5, 4))


def test_training_mode_is_refused():
    module = LastStep()  # modules start in training mode
    with pytest.raises(ValueError, match=r"training mode.*module.eval\(\)"):
        le.from_torch(module, torch.randn(2, 5, 4))


def test_custom_module_without_example_input_is_refused():
    with pytest.raises(ValueError, match="pass an example input"):
        le.from_torch(HeadFirst().eval())


def test_sizes_the_forward_bounds_are_checked_at_run_time():
    class FirstTen(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)

        def forward(self, x):
            return self.rnn(x[:, :10])[0]  # torch.export records steps <= 9 for this graph

    module = FirstTen().eval()
    model = le.from_torch(module, torch.randn(2, 5, 4))
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        assert_same(model.forward(x.numpy())[0], module(x))
    with pytest.raises(ValueError, match="steps"):
        model.forward(np.zeros((2, 12, 4), np.float32))


# -- without an example input -------------------------------------------------------------------------

def test_sequential_of_position_wise_layers_needs_no_example():
    torch.manual_seed(8)
    seq = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Dropout(0.1),
                        nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.GRU(8, 5, batch_first=True)).eval()
    tokens = torch.randint(0, 12, (3, 7))
    with torch.no_grad():
        out, h = seq(tokens)
    y, state = le.from_torch(seq).forward(tokens.numpy())
    np.testing.assert_allclose(y, out.numpy(), atol=1e-5)
    np.testing.assert_allclose(state[0][0], h.numpy(), atol=1e-5)


@pytest.mark.parametrize("seq, child", [
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), r"'1' \(BatchNorm1d\)"),
    (nn.Sequential(nn.LSTM(4, 4, batch_first=True), nn.Linear(4, 2)), r"'0' \(LSTM\) passes its"),
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)), r"'1' \(Softmax\)"),
])
def test_sequential_that_needs_its_input_is_refused(seq, child):
    with pytest.raises(ValueError, match=child + ".*pass example_input"):
        le.from_torch(seq.eval())
    # With an example input its real forward is read.
    if not isinstance(seq[0], nn.LSTM):
        x = torch.randn(3, 4)
        model = le.from_torch(seq.eval(), x)
        with torch.no_grad():
            assert_same(model.forward(x.numpy())[0], seq(x))


# -- more ops, sizes and dtypes -------------------------------------------------------------------------

class MoreOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 12))
        self.pick = nn.Parameter(torch.tensor([3, 0, 7]), requires_grad=False)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        fwd, bwd = out.chunk(2, dim=-1)
        a, b = torch.split(out * self.scale, [4, 8], dim=2)
        first, second = h.unbind(0)
        mask = out > 0
        gated = torch.where(mask, out, out * 0.1).masked_fill(out < -0.5, -1.0)
        padded = F.pad(out.transpose(1, 2), (2, 1)).transpose(1, 2)
        return (fwd.flip(1) + bwd, a.clamp(-0.2, 0.3), b.amin(1), first - second, gated,
                out[:, :, self.pick], padded, torch.argmax(out, dim=-1), F.normalize(h[-1], dim=-1),
                h[-1].unsqueeze(1).expand(-1, 3, -1), c.repeat(1, 1, 2), torch.matmul(out, out.transpose(1, 2)),
                (out.pow(2).sum(-1) + 1).rsqrt(), torch.maximum(fwd, bwd), out.mean())


def test_more_ops_match_torch():
    torch.manual_seed(9)
    check(MoreOps(), floats(4), sizes=[(2, 5), (3, 8), (1, 3)])


def test_float64_model():
    torch.manual_seed(10)
    module = LastStep().double().eval()
    with torch.no_grad():  # values float32 cannot hold
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 1e-9)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    model = le.from_torch(module, x, dtype=np.float64)
    with torch.no_grad():
        want = module(x)
    np.testing.assert_allclose(model.forward(x.numpy())[0], want.numpy(), atol=1e-12)


def test_fixed_sizes_are_checked():
    """An example of batch 1 fixes the batch (torch specialises sizes 0 and 1): other batches are refused."""
    torch.manual_seed(11)
    module = LastStep().eval()
    model = le.from_torch(module, torch.randn(1, 5, 4))
    x = torch.randn(1, 9, 4)
    with torch.no_grad():
        assert_same(model.forward(x.numpy())[0], module(x))
    with pytest.raises(ValueError, match=r"expected shape \(1, 'steps', 4\)"):
        model.forward(np.zeros((3, 5, 4), np.float32))


def test_squeeze_of_a_varying_axis_refuses_size_one():
    class SqueezeAll(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 1, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0].squeeze()  # (B, T): torch drops B and T too when they are 1

    module = SqueezeAll().eval()
    model = le.from_torch(module, torch.randn(2, 5, 4))
    x = torch.randn(3, 4, 4)
    with torch.no_grad():
        assert_same(model.forward(x.numpy())[0], module(x))
    with pytest.raises(ValueError, match="'batch' has size 1"):
        model.forward(np.zeros((1, 4, 4), np.float32))


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.full((x.shape[0],), x.shape[1]), batch_first=True)
        return self.rnn(packed)[1][0]


def test_packed_sequences_are_refused():
    with pytest.raises(le.LoadError, match=r"rnn \(LSTM\) at .*test_torch_export.py:\d+.*pack_padded_sequence"):
        le.from_torch(Packed().eval(), torch.randn(2, 5, 4))


class CellLoop(nn.Module):
    """A decoder-style loop over cells: the export unrolls it, so the number of steps is fixed."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTMCell(4, 6)
        self.gru = nn.GRUCell(6, 5)
        self.rnn = nn.RNNCell(5, 3, nonlinearity="relu", bias=False)

    def forward(self, x):
        h, c = torch.zeros(x.shape[0], 6), torch.zeros(x.shape[0], 6)
        g, outs = None, []
        for t in range(x.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
            outs.append(self.rnn(g))
        return torch.stack(outs, dim=1), c


def test_cell_loops_unrolled():
    torch.manual_seed(14)
    module = CellLoop()
    model = check(module, floats(4), sizes=[(2, 5), (3, 5), (1, 5)])
    assert len(model.layers) == 3  # one layer per cell, however many steps use it
    with pytest.raises(ValueError, match=r"expected shape \('batch', 5, 4\)"):
        model.forward(np.zeros((2, 6, 4), np.float32))


def test_example_input_is_checked():
    with pytest.raises(TypeError, match=r"example_input\[0\] is a list"):
        le.from_torch(LastStep().eval(), [[1.0, 2.0]])
    with pytest.raises(TypeError, match="example_input is for an nn.Module"):
        le.from_torch({"weight_ih_l0": np.zeros((4, 2))}, np.zeros((1, 2, 2)))


class ConvModes(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(4, 4, 3, padding=1, padding_mode=mode, bias=(mode != "zeros"))
                                    for mode in ("zeros", "reflect", "replicate")])
        self.strided = nn.Conv1d(4, 6, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        z = x.transpose(1, 2)
        for conv in self.convs:
            z = F.relu6(conv(z)) - F.hardsigmoid(z)
        return self.bn(self.strided(z)).transpose(1, 2)


def test_conv_padding_modes_and_strides():
    torch.manual_seed(12)
    check(ConvModes(), floats(4), sizes=[(2, 5), (3, 8), (1, 4)])
