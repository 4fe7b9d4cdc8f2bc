"""What a newcomer reads: error messages, install advice, the shipped model's name (issue 16)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import cli as cli_mod
from helpers import run_main
from lstm_engine.errors import is_user_error

SRC = pathlib.Path(le.__file__).parent


def one_line(proc, *words):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def lstm_file(tmp_path_factory):
    rng = np.random.default_rng(16)
    path = tmp_path_factory.mktemp("messages") / "lstm.safetensors"
    le.save(le.Model([le.LSTM(rng.standard_normal((12, 4)), rng.standard_normal((12, 3)))]), path)
    return path


# -- install advice -------------------------------------------------------------------------------

def test_no_advice_to_install_from_an_index_that_lacks_the_package():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "pip install lstm_engine" not in text and "lstm_engine[" not in text, path
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()  # the checkout: le may be installed
    assert "pip install lstm_engine" not in readme and '"lstm_engine[' not in readme


def test_h5py_advice_names_both_installs():
    from lstm_engine.formats._keras_file import _H5PY_MISSING

    assert "pip install h5py" in _H5PY_MISSING and "pip install '.[keras]'" in _H5PY_MISSING


# -- the shipped model by name --------------------------------------------------------------------

def test_builtin_model_loads_by_name(capsys):
    model = le.load("builtin:charlm")
    assert isinstance(model.metadata.get("vocab"), str) and model.takes_ids
    proc = run_main(capsys, "inspect", "builtin:charlm")
    assert proc.returncode == 0 and "LSTM" in proc.stdout, proc.stderr
    with pytest.raises(le.LoadError, match="no such built-in model.*builtin:charlm"):
        le.load("builtin:nope")
    one_line(run_main(capsys, "inspect", "builtin:nope"), "builtin:nope", "builtin:charlm")


@pytest.mark.parametrize("command", [["verify"], ["bench", "--seconds", "0.05", "--steps", "3"]])
def test_every_command_takes_the_builtin_model(capsys, command):
    proc = run_main(capsys, command[0], "builtin:charlm", *command[1:])
    # verify without --source checks the engine against itself: status 2, "NOT CHECKED", never "no such file"
    assert proc.returncode == (2 if command[0] == "verify" else 0), proc.stderr
    assert "builtin:charlm" in proc.stdout and "no such file" not in proc.stderr.lower()


def test_generate_defaults_to_the_builtin_model(capsys):
    assert cli_mod.SHIPPED_MODEL == "builtin:charlm"
    a = run_main(capsys, "generate", "Once", "-n", 12, "--seed", 3)
    b = run_main(capsys, "generate", "Once", "-n", 12, "--seed", 3, "--model", "builtin:charlm")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("Once") and len(a.stdout) == 17


# -- cli.main: one line for the user's mistakes, a traceback for bugs -----------------------------

def test_is_user_error_tells_validation_from_bugs():
    with pytest.raises(ValueError) as validation:
        le.Model([le.LSTM(np.zeros((8, 3)), np.zeros((8, 2)))]).forward(np.zeros((1, 2, 5), np.float32))
    assert is_user_error(validation.value)
    with pytest.raises(ValueError) as numpy_bug:
        np.zeros(3).reshape(2)
    assert not is_user_error(numpy_bug.value)
    with pytest.raises(TypeError) as python_bug:
        iter(le.LSTM(np.zeros((8, 3)), np.zeros((8, 2))))
    assert not is_user_error(python_bug.value)
    assert is_user_error(le.LoadError("x.pt: broken"))


def test_internal_errors_keep_their_traceback(lstm_file, capsys, monkeypatch):
    def bug(args):
        return np.zeros(3).reshape(2)  # a ValueError no user input explains

    monkeypatch.setattr(cli_mod, "run_inspect", bug)
    monkeypatch.setattr(cli_mod, "COMMANDS", list(cli_mod.COMMANDS))
    parser_before = cli_mod.build_parser
    monkeypatch.setattr(cli_mod, "build_parser", lambda: _with_func(parser_before(), bug))
    with pytest.raises(ValueError, match="reshape"):
        cli_mod.main(["inspect", str(lstm_file)])


def _with_func(parser, func):
    parser.set_defaults(func=func)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices["inspect"].set_defaults(func=func)
    return parser


def test_debug_shows_the_traceback_of_user_errors(lstm_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LSTM_ENGINE_DEBUG", raising=False)
    one_line(run_main(capsys, "inspect", tmp_path / "missing.pt"), "no such file")
    with pytest.raises(cli_mod.UserError, match="no such file"):
        cli_mod.main(["--debug", "inspect", str(tmp_path / "missing.pt")])
    monkeypatch.setenv("LSTM_ENGINE_DEBUG", "1")
    with pytest.raises(cli_mod.UserError, match="no such file"):
        cli_mod.main(["inspect", str(tmp_path / "missing.pt")])


# -- the messages the issue lists ------------------------------------------------------------------

def test_run_given_a_text_file_does_not_talk_of_pickles(lstm_file, tmp_path, capsys):
    text = tmp_path / "x.txt"
    text.write_text("1 2 3\n")
    line = one_line(run_main(capsys, "run", lstm_file, text, "-o", tmp_path / "y.npy"), "x.txt", "numpy.save")
    assert "pickle" not in line


def test_gates_reports_the_shape_the_file_holds(lstm_file, tmp_path, capsys):
    # One sequence may drop the batch axis; a wrong one is reported as given, not with the axis added.
    np.save(tmp_path / "x.npy", np.zeros((1, 65), np.float32))
    one_line(run_main(capsys, "gates", lstm_file, tmp_path / "x.npy"), "x.npy", "(batch, steps, 4)", "got (1, 65)")
    np.save(tmp_path / "ids.npy", np.zeros((1, 65), np.float32))
    one_line(run_main(capsys, "gates", "builtin:charlm", tmp_path / "ids.npy"), "token ids", "float32 (1, 65)")


def test_a_legacy_torch_file_loads_or_is_named_for_what_it_holds(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.GRU(3, 4).state_dict(), tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    assert le.load(tmp_path / "sd.pt").layers[0].hidden_size == 4
    torch.save(torch.nn.GRU(3, 4), tmp_path / "module.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(le.UnsafeModelError, match=r"module\.pt.*whole pickled model.*state_dict\(\)"):
        le.load(tmp_path / "module.pt")


def test_top_p_message_names_the_option_not_none(capsys):
    line = one_line(run_main(capsys, "generate", "Once", "--top-p", 2), "--top-p", "(0, 1]")
    assert "None" not in line
    line = one_line(run_main(capsys, "generate", "Once", "--top-k", 0), "--top-k", ">= 1")
    assert "None" not in line


def test_model_of_one_layer_says_how_to_write_it():
    layer = le.LSTM(np.zeros((8, 3)), np.zeros((8, 2)))
    with pytest.raises(TypeError, match=r"one LSTM; write Model\(\[layer\]\)"):
        le.Model(layer)
    with pytest.raises(TypeError, match="list of layers or a Graph, got int"):
        le.Model(3)


def test_relu_rnn_state_dict_needs_its_nonlinearity(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(16)
    net = torch.nn.RNN(3, 5, nonlinearity="relu", batch_first=True)
    torch.save(net.state_dict(), tmp_path / "rnn.pt")
    with pytest.raises(le.LoadError, match=r"rnn.pt: .*nonlinearity='tanh' or nonlinearity='relu'"):
        le.load(tmp_path / "rnn.pt")
    with pytest.raises(ValueError, match="nonlinearity='relu'"):
        le.from_torch(net.state_dict())
    x = np.random.default_rng(16).standard_normal((2, 6, 3)).astype(np.float32)
    y, _ = le.load(tmp_path / "rnn.pt", nonlinearity="relu").forward(x)
    with torch.no_grad():
        want = net(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_verify_sets_the_keras_backend_before_importing_keras(tmp_path):
    keras = pytest.importorskip("keras")
    net = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4, return_sequences=True)])
    net.save(tmp_path / "k.keras")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.run([sys.executable, "-m", "lstm_engine.cli", "verify", str(tmp_path / "k.keras"),
                           "--source", str(tmp_path / "k.keras"), "--atol", "1e-5"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not installed" not in proc.stdout and "ok:" in proc.stdout


def test_a_bad_weight_ih_is_blamed_on_weight_ih_in_the_given_shape():
    rng = np.random.default_rng(16)
    with pytest.raises(ValueError, match=r"LSTM weight_ih \(384, 64\) and weight_hh \(512, 128\) disagree: "
                                         r"weight_ih's 384 rows \(4\*hidden_size\) give hidden_size 96, "
                                         r"weight_hh's columns 128"):
        le.LSTM(rng.standard_normal((384, 64)), rng.standard_normal((512, 128)))
    with pytest.raises(ValueError, match=r"GRU weight_ih: .*got \(16, 4\)$"):  # not 3 gates of any size
        le.GRU(rng.standard_normal((16, 4)), rng.standard_normal((12, 4)))
    with pytest.raises(ValueError, match=r"RNN weight_hh: expected shape \(1\*hidden_size, hidden_size\), got \(4, 3\)"):
        le.RNN(rng.standard_normal((4, 2)), rng.standard_normal((4, 3)))


def test_one_dtype_rule_for_arrays_tensors_and_lists():
    torch = pytest.importorskip("torch")
    model = le.Model([le.LSTM(np.zeros((8, 3)), np.zeros((8, 2)))])
    x64 = np.zeros((1, 2, 3))
    for given in (x64, torch.from_numpy(x64)):  # a dtype of its own: it must match, or cast=True
        with pytest.raises(TypeError, match="dtype float64, but this model runs float32; pass cast=True"):
            model.forward(given)
        assert model.forward(given, cast=True)[0].dtype == np.float32
    assert model.forward(x64.tolist())[0].dtype == np.float32  # a list has none: the model's
    session = model.session()
    with pytest.raises(TypeError, match="dtype float64, but this session runs float32"):
        session.step(torch.zeros((1, 3), dtype=torch.float64))
    assert session.step([[0.0, 0.0, 0.0]]).dtype == np.float32


def test_stepping_matches_forward_within_the_readme_bound():
    """The README's bound, on the shipped model over 500 steps: outputs relative to each step's largest |y|."""
    model = le.load("builtin:charlm")
    ids = np.random.default_rng(16).integers(0, len(model.metadata["vocab"]), (2, 500))
    y, ((h, c),) = model.forward(ids)
    session = model.session(batch_size=2)
    stepped = np.stack([session.step(ids[:, t]) for t in range(ids.shape[1])], axis=1)
    scale = np.abs(y).max(axis=-1, keepdims=True)
    assert (np.abs(stepped - y) <= 1e-5 * scale).all()
    (h_s, c_s), = session.state
    np.testing.assert_allclose(h_s, h, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c_s, c, rtol=0, atol=1e-5)


def test_a_mismatched_source_names_what_differs(lstm_file, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3)).state_dict(), tmp_path / "linear.pt")
    one_line(run_main(capsys, "verify", lstm_file, "--source", tmp_path / "linear.pt"),
             "linear.pt", "0.{weight, bias}", "non-recurrent", "layer 0 of the model is a LSTM")


try:  # a module class at module level, so that torch.save can pickle it by reference
    import torch as _torch
except ImportError:
    _torch = None
else:
    class _Tagger(_torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = _torch.nn.LSTM(4, 3, batch_first=True)


def test_verify_source_pickling_a_custom_module_says_so_plainly(lstm_file, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.save(_Tagger(), tmp_path / "whole.pt")
    line = one_line(run_main(capsys, "verify", lstm_file, "--source", tmp_path / "whole.pt"),
                    "whole.pt", "pickled Python objects", "state_dict()")
    assert line.rstrip().endswith("builds the module")  # the whole message, not torch's first line
