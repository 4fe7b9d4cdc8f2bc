"""The lstm-engine command end to end: subprocesses on real files made here."""
import os

import numpy as np
import pytest

import lstm_engine as le
from helpers import run_cli as cli, run_main

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(300)

COMMANDS = ["generate", "inspect", "run", "verify", "bench", "gates", "quantize", "serve"]


def assert_user_error(proc, *words):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A bidirectional 2-layer torch LSTM (.pt state_dict and engine file) and an Embedding->GRU->Linear net."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 16, num_layers=2, bidirectional=True, batch_first=True)
    torch.save(lstm.state_dict(), d / "lstm.pt")
    le.save(le.from_torch(lstm), d / "lstm.safetensors")
    # An nn.Sequential runs its children in order, so it maps to a chain without an example input.
    lm = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8), torch.nn.GRU(8, 12, batch_first=True))
    torch.save(lm.state_dict(), d / "lm.pt")
    le.save(le.from_torch(lm), d / "lm.safetensors")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((10, 7, 6)).astype(np.float32))
    np.save(d / "lengths.npy", rng.integers(1, 8, 10))
    np.save(d / "bad.npy", rng.standard_normal((10, 7, 5)).astype(np.float32))
    np.save(d / "ids.npy", rng.integers(0, 20, (3, 9)))
    return d


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(capsys, command):
    proc = run_main(capsys, command, "--help")
    assert proc.returncode == 0
    assert f"example: lstm-engine {command}" in proc.stdout


def test_inspect_torch_files(files, capsys):
    proc = cli("inspect", files / "lstm.safetensors")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    model = le.load(files / "lstm.safetensors")
    params = sum(w.size for layer in model.layers for w in layer.weights().values())
    assert f"{params:,} parameters" in out
    assert out.count("LSTM") == 2 and "float32" in out
    assert f"source: torch {torch.__version__}" in out
    assert "lstm_engine safetensors" in out
    proc = run_main(capsys, "inspect", files / "lstm.pt")
    assert proc.returncode == 0, proc.stderr
    assert "torch.save zip" in proc.stdout and "source: torch" in proc.stdout
    proc = run_main(capsys, "inspect", files / "lm.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "Embedding" in proc.stdout and "vocab 20" in proc.stdout and "GRU" in proc.stdout


def test_inspect_legacy_torch_file(tmp_path, capsys):
    torch.save(torch.nn.GRU(3, 4, num_layers=2).state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    proc = run_main(capsys, "inspect", tmp_path / "old.pt")
    assert proc.returncode == 0, proc.stderr
    assert "legacy torch.save stream" in proc.stdout and proc.stdout.count("GRU") == 2


def test_inspect_keras(tmp_path, capsys):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    net = keras.Sequential([keras.Input((None, 3)), keras.layers.GRU(5, reset_after=False, return_sequences=True),
                            keras.layers.Dense(2)])
    net.save(tmp_path / "k.keras")
    proc = cli("inspect", tmp_path / "k.keras")
    assert proc.returncode == 0, proc.stderr
    assert "Keras .keras archive" in proc.stdout and f"source: keras {keras.__version__}" in proc.stdout
    assert "reset_before" in proc.stdout
    proc = run_main(capsys, "verify", tmp_path / "k.keras", "--source", tmp_path / "k.keras", "--atol", "1e-5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "output" in proc.stdout and "ok:" in proc.stdout and "keras" in proc.stdout


def test_run_in_chunks_with_lengths_and_states(files):
    out, states = files / "y.npy", files / "s.npz"
    proc = cli("run", files / "lstm.safetensors", files / "x.npy", "--lengths", files / "lengths.npy",
               "--batch-size", 3, "--threads", 1, "-o", out, "--state-out", states)
    assert proc.returncode == 0, proc.stderr
    assert "10/10 sequences" in proc.stderr  # progress over 4 chunks
    model = le.load(files / "lstm.safetensors")
    y, state = model.forward(np.load(files / "x.npy"), np.load(files / "lengths.npy"))
    np.testing.assert_allclose(np.load(out), y, atol=1e-6, rtol=0)
    saved = np.load(states)
    assert sorted(saved.files) == ["layer0_c", "layer0_h", "layer1_c", "layer1_h"]
    np.testing.assert_allclose(saved["layer1_c"], state[1][1], atol=1e-6, rtol=0)


def test_run_token_ids_default_batch(files):
    proc = cli("run", files / "lm.safetensors", files / "ids.npy", "-o", files / "ylm.npy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # one chunk: no progress bar
    y, _ = le.load(files / "lm.safetensors").forward(np.load(files / "ids.npy"))
    np.testing.assert_allclose(np.load(files / "ylm.npy"), y, atol=1e-6, rtol=0)


def test_user_mistakes_are_one_line(files, capsys):
    model = files / "lstm.safetensors"
    assert_user_error(cli("run", model, files / "missing.npy", "-o", files / "o.npy"), "missing.npy", "no such file")
    out = files / "o.npy"
    assert_user_error(run_main(capsys, "run", model, files / "bad.npy", "-o", out), "bad.npy", "(batch, steps, 6)")
    assert_user_error(run_main(capsys, "run", model, files / "x.npy", "-o", out, "--lengths", files / "ids.npy"),
                      "--lengths")
    assert_user_error(run_main(capsys, "run", model, files / "x.npy"), "-o")  # a usage error
    assert_user_error(run_main(capsys, "inspect", files / "x.npy"), "x.npy")  # not a model
    assert_user_error(run_main(capsys, "gates", model, files / "x.npy", "--row", 10), "--row")
    assert_user_error(run_main(capsys, "bench", model, "--batch", 0), "--batch")
    assert_user_error(run_main(capsys, "verify", files / "missing.pt"), "missing.pt")


def test_verify_against_torch(files, capsys):
    proc = cli("verify", files / "lstm.safetensors", "--source", files / "lstm.pt", "--atol", "1e-5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lengths" in proc.stdout and "ok:" in proc.stdout
    assert "layer 0 h" in proc.stdout and "layer 1 c" in proc.stdout
    # A container's state_dict holds weights, not the forward that chains them: never rebuilt as a guess.
    proc = run_main(capsys, "verify", files / "lm.safetensors", "--source", files / "lm.pt", "--atol", "1e-5")
    assert proc.returncode == 2 and "NOT CHECKED" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "not its forward" in proc.stdout + proc.stderr and "ok:" not in proc.stdout
    # Another network's weights in the same shapes: the errors are large and the status says so.
    torch.manual_seed(1)
    other = torch.nn.LSTM(6, 16, num_layers=2, bidirectional=True, batch_first=True)
    torch.save(other.state_dict(), files / "other.pt")
    proc = run_main(capsys, "verify", files / "lstm.safetensors", "--source", files / "other.pt")
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    # Weights that do not fit: one line.
    torch.save(torch.nn.GRU(6, 16).state_dict(), files / "gru.pt")
    assert_user_error(run_main(capsys, "verify", files / "lstm.safetensors", "--source", files / "gru.pt"))


def test_verify_without_source(files):
    proc = cli("verify", files / "lm.safetensors", "--batch", 3, "--steps", 5)
    # The self-checks pass, but nothing was compared with the source: not "ok".
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "save/load round trip" in proc.stdout and "step-by-step NumPy" in proc.stdout
    assert proc.stdout.count("max abs") == 4
    assert "NOT CHECKED against the model's source: no --source given" in proc.stdout and "ok:" not in proc.stdout


def _graph_file(path):
    rng = np.random.default_rng(4)
    lstm = le.LSTM(rng.standard_normal((16, 6)), rng.standard_normal((16, 4)))
    g = le.Graph([le.ValueInfo("x", "float", ["batch", "steps", 6])], ["y"], [
        le.Node("Recurrent", ["x"], ["out", "h", "c"], {"layer": 0}, "lstm", "net.lstm (net.py:9)"),
        le.Node("ReduceMean", ["out"], ["pooled"], {"axes": [1], "keepdims": 0}, "mean_over_time"),
        le.Node("Relu", ["pooled"], ["y"], {}, "relu")], {}, [lstm])
    le.save(le.Model(g), path)
    return path


def test_graph_model_inspect_run_verify(files, capsys):
    path = _graph_file(files / "graph.safetensors")
    proc = run_main(capsys, "inspect", path)
    assert proc.returncode == 0, proc.stderr
    ops = [line.split()[2] for line in proc.stdout.splitlines()[1:4]]
    assert ops == ["Recurrent", "ReduceMean", "Relu"]
    assert "format version 2" in proc.stdout and "inputs: x float (batch, steps, 6)" in proc.stdout
    proc = run_main(capsys, "run", path, files / "x.npy", "-o", files / "yg.npy")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(files / "yg.npy"), le.load(path).forward(np.load(files / "x.npy"))[0],
                               atol=1e-6, rtol=0)
    # A state_dict is not the forward of a graph model: verify says so instead of comparing with a guess.
    proc = run_main(capsys, "verify", path, "--source", files / "lstm.pt")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "NOT CHECKED" in proc.stdout and "holds weights, not the forward" in proc.stdout
    assert "max abs" not in proc.stdout
    proc = run_main(capsys, "bench", path, "--steps", 4, "--seconds", 0.02)
    assert "streaming step:  n/a" in proc.stdout and "mean_over_time" in proc.stdout


def test_verify_takes_sources_registered_by_other_formats(files, capsys, monkeypatch):
    from lstm_engine import cli as cli_mod

    path = _graph_file(files / "graph2.safetensors")
    (files / "truth.npy").write_bytes(b"")

    def reference(model, source, x, rng, args):
        y, state = model.forward(x)
        return cli_mod.Reference("fake 1.0", {"y": y + 1e-7}, note="(outputs only)")

    monkeypatch.setattr(cli_mod, "SOURCES", list(cli_mod.SOURCES))
    cli_mod.register_source(cli_mod.Source("fake", lambda p: str(p).endswith("truth.npy"), reference))
    proc = run_main(capsys, "verify", path, "--source", files / "truth.npy", "--atol", "1e-6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(fake 1.0)" in proc.stdout and "ok:" in proc.stdout and "y " in proc.stdout


def test_bench(files, capsys):
    proc = cli("bench", files / "lm.safetensors", "--batch", 2, "--steps", 8, "--threads", 1, "--seconds", 0.05)
    assert proc.returncode == 0, proc.stderr
    assert "streaming step:  median" in proc.stdout and "p99" in proc.stdout
    assert "whole sequence:  median" in proc.stdout
    proc = run_main(capsys, "bench", files / "lstm.safetensors", "--steps", 4, "--seconds", 0.05)
    assert proc.returncode == 0 and "n/a" in proc.stdout and "bidirectional" in proc.stdout


@pytest.mark.parametrize("bias", [10, -10])
def test_gates_forced_forget_bias(tmp_path, capsys, bias):
    pytest.importorskip("matplotlib")
    H, T = 8, 30
    rng = np.random.default_rng(0)
    b = rng.uniform(-0.1, 0.1, 4 * H)
    b[H:2 * H] = bias
    lstm = le.LSTM(rng.uniform(-0.3, 0.3, (4 * H, 3)), rng.uniform(-0.01, 0.01, (4 * H, H)), b)
    le.save(le.Model([lstm]), tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", rng.standard_normal((T, 3)).astype(np.float32))  # one sequence, no batch axis
    # One case in a subprocess with the drawing, the other in this process (interpreter start-up is slow).
    run = (lambda *a: cli(*a)) if bias > 0 else (lambda *a: run_main(capsys, *a))
    proc = run("gates", tmp_path / "m.safetensors", tmp_path / "x.npy", "-o", tmp_path / "g.png")
    assert proc.returncode == 0, proc.stderr
    horizon = float(proc.stdout.split("memory horizon")[1].split()[0])
    flow = [float(v) for v in proc.stdout.split("|dc_T/dc_T-k|")[1].split("\n")[0].split()]
    if bias > 0:
        assert horizon == T and all(0.99 < v < 1.5 for v in flow)
    else:
        assert horizon == 1 and flow[-1] < 1e-10
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_gates_rnn_next_to_lstm(tmp_path, capsys):
    rng = np.random.default_rng(1)
    H, T = 8, 40
    w = lambda *s: rng.uniform(-0.3, 0.3, s)  # noqa: E731
    b = w(4 * H)
    b[H:2 * H] = 10
    le.save(le.Model([le.RNN(w(H, 3), w(H, H), w(H))]), tmp_path / "rnn.safetensors")
    le.save(le.Model([le.LSTM(w(4 * H, 3), w(4 * H, H), b)]), tmp_path / "lstm.safetensors")
    np.save(tmp_path / "x.npy", rng.standard_normal((1, T, 3)).astype(np.float32))
    rnn = cli("gates", tmp_path / "rnn.safetensors", tmp_path / "x.npy")
    lstm = run_main(capsys, "gates", tmp_path / "lstm.safetensors", tmp_path / "x.npy")
    assert rnn.returncode == lstm.returncode == 0, rnn.stderr + lstm.stderr
    assert "memory horizon     -" in rnn.stdout and "|dc_T" not in rnn.stdout
    # The last column is k = 20, the largest printed lag within T = 40.
    rnn_h = float(rnn.stdout.split("|dh_T/dh_T-k|")[1].split("\n")[0].split()[-1])
    lstm_c = float(lstm.stdout.split("|dc_T/dc_T-k|")[1].split("\n")[0].split()[-1])
    assert rnn_h < 1e-3 and lstm_c > 0.9


SCRIPT = '''
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)  # declared before the GRU it follows
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True, bidirectional=True)

    def forward(self, ids):
        out, h_n = self.rnn(self.embed(ids))
        return torch.log_softmax(self.head(out), dim=-1), h_n


torch.manual_seed(SEED)
model = Tagger().eval()
'''


def test_verify_a_forward_against_its_module(tmp_path, capsys):
    """A model read from a module's forward is checked against that module (script or .pt2), nothing else."""
    (tmp_path / "tagger.py").write_text(SCRIPT.replace("SEED", "0"))
    (tmp_path / "other.py").write_text(SCRIPT.replace("SEED", "1"))
    import runpy

    module = runpy.run_path(str(tmp_path / "tagger.py"))["model"]
    ids = torch.randint(0, 20, (2, 6))
    le.save(le.from_torch(module, ids), tmp_path / "tagger.safetensors")
    torch.export.save(torch.export.export(module, (ids,)), tmp_path / "tagger.pt2")
    torch.save(module.state_dict(), tmp_path / "tagger.pt")
    model = tmp_path / "tagger.safetensors"

    proc = run_main(capsys, "verify", model)
    assert proc.returncode == 2 and "NOT CHECKED" in proc.stdout and "ok:" not in proc.stdout, proc.stdout
    outputs = le.load(model).graph.outputs
    for source in ("tagger.py", "tagger.pt2"):
        proc = run_main(capsys, "verify", model, "--source", tmp_path / source, "--atol", "1e-5")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert all(name in proc.stdout for name in outputs) and "ok:" in proc.stdout
    proc = run_main(capsys, "verify", model, "--source", tmp_path / "other.py")
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    proc = run_main(capsys, "verify", model, "--source", tmp_path / "tagger.pt")
    assert proc.returncode == 2 and "holds weights, not the forward" in proc.stdout
