"""Token generation: sampling rules, reproducibility, the state it leaves, and the `lstm-engine generate` command."""
import os
import shutil
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

import lstm_engine as le
from helpers import run_cli as cli
from lstm_engine.generate import check_sampling, sample

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(120)

VOCAB = "\n abcdefghij.,"


def char_lm(head_activation="linear", seed=0):
    torch.manual_seed(seed)
    V = len(VOCAB)
    emb, rnn, head = torch.nn.Embedding(V, 6), torch.nn.LSTM(6, 16, 2, batch_first=True), torch.nn.Linear(16, V)
    with torch.no_grad():
        head.weight.mul_(8)  # sharper distributions, so that sampling choices are visible
    return le.Model([le.Embedding(emb.weight), *le.from_torch(rnn).layers,
                     le.Dense(head.weight, head.bias, activation=head_activation)],
                    metadata={"vocab": VOCAB})


# -- sampling --------------------------------------------------------------------------------------

def test_greedy_and_degenerate_filters_pick_the_argmax():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 30))
    want = scores.argmax(axis=1)
    np.testing.assert_array_equal(sample(scores, 0.0, None, None, rng), want)
    np.testing.assert_array_equal(sample(scores, 1.0, 1, None, rng), want)
    np.testing.assert_array_equal(sample(scores, 1.0, None, 1e-9, rng), want)


def test_samples_follow_the_softmax():
    rng = np.random.default_rng(1)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    many = np.repeat(logits, 20000, axis=0)  # one row per draw
    draws = sample(many, 1.0, None, None, rng)
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # Temperature 0.5 squares the probabilities (then renormalises).
    draws = sample(many, 0.5, None, None, rng)
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, p / p.sum(), atol=0.015)


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(2)
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    many = np.repeat(logits, 3000, axis=0)
    assert set(sample(many, 1.0, 2, None, rng).tolist()) == {1, 3}
    # 0.4 + 0.3 = 0.7 < 0.75, so the nucleus needs the third likeliest (0.15) too.
    assert set(sample(many, 1.0, None, 0.75, rng).tolist()) == {1, 3, 4}
    assert set(sample(many, 1.0, None, 0.69, rng).tolist()) == {1, 3}
    assert set(sample(many, 1.0, 99, None, rng).tolist()) == {0, 1, 2, 3, 4}


def test_infinite_and_nan_scores():
    rng = np.random.default_rng(3)
    scores = np.array([[0.0, np.inf, -np.inf, np.inf], [1.0, 2.0, -np.inf, 0.5]])
    picks = np.stack([sample(scores, 1.0, None, None, rng) for _ in range(200)])
    assert set(picks[:, 0].tolist()) == {1, 3}
    assert 2 not in picks[:, 1]
    with pytest.raises(ValueError, match="NaN"):
        sample(np.array([[0.0, np.nan]]), 1.0, None, None, rng)
    with pytest.raises(ValueError, match="all -inf"):
        sample(np.full((1, 3), -np.inf), 0.0, None, None, rng)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -3}, "seed"),
    ({"seed": "abc"}, "seed"),
])
def test_argument_checks(kwargs, match):
    args = dict(max_new_tokens=5, temperature=1.0, top_k=None, top_p=None, seed=None) | kwargs
    with pytest.raises(ValueError, match=match):
        check_sampling(**args)
    s = char_lm().session()
    with pytest.raises(ValueError, match=match):
        s.generate([1, 2], **args)  # raised at the call, not at the first next()


# -- generation from a session ----------------------------------------------------------------------

def test_fixed_seed_reproduces_and_greedy_is_the_argmax_chain():
    model = char_lm()
    prompt = [VOCAB.index(c) for c in "abc d"]
    a = list(model.session().generate(prompt, 40, temperature=1.0, seed=11))
    b = list(model.session().generate(prompt, 40, temperature=1.0, seed=11))
    c = list(model.session().generate(prompt, 40, temperature=1.0, seed=12))
    assert a == b and a != c
    assert all(isinstance(t, int) and 0 <= t < len(VOCAB) for t in a)

    greedy = list(model.session().generate(prompt, 15, temperature=0))
    seq = list(prompt)
    for _ in range(15):
        logits = model.forward(np.array([seq]))[0][0, -1]
        seq.append(int(logits.argmax()))
    assert greedy == seq[len(prompt):]


def test_the_state_includes_every_yielded_token():
    model = char_lm()
    s = model.session()
    prompt = [3, 4, 5]
    toks = []
    for tok in s.generate(prompt, 10, seed=0):
        toks.append(tok)
        _, state = model.forward(np.array([prompt + toks]))
        np.testing.assert_allclose(s.state[1][0], state[1][0], atol=1e-6)
    # A second call continues the same text.
    more = list(s.generate([1], 3, temperature=0))
    seq = prompt + toks + [1]
    for _ in range(3):
        seq.append(int(model.forward(np.array([seq]))[0][0, -1].argmax()))
    assert more == seq[-3:]


def test_softmax_head_and_batches():
    model = char_lm("softmax")
    s = model.session(3)
    prompt = np.array([[1, 2], [3, 4], [5, 6]])
    out = list(s.generate(prompt, 6, temperature=0))
    assert len(out) == 6 and all(t.shape == (3,) for t in out)
    logits_model = char_lm("linear")
    want = list(logits_model.session(3).generate(prompt, 6, temperature=0))
    np.testing.assert_array_equal(np.stack(out), np.stack(want))
    a = list(char_lm("softmax").session().generate([1], 30, seed=5))
    b = list(char_lm("linear").session().generate([1], 30, seed=5))
    assert a == b  # log(softmax) differs from the logits by a constant per row


def test_generate_checks_the_model_and_prompt():
    s = char_lm().session()
    assert list(s.generate([1], 0)) == []
    with pytest.raises(ValueError, match="at least one token"):
        s.generate([], 3)
    with pytest.raises(ValueError, match="out of range"):
        s.generate([99], 3)
    with pytest.raises(TypeError, match="integers"):
        s.generate([1.5], 3)
    with pytest.raises(ValueError, match=r"\(2, steps\)"):
        char_lm().session(2).generate([1, 2], 3)
    floats = le.Model([le.LSTM(np.zeros((8, 3)), np.zeros((8, 2)))])
    with pytest.raises(ValueError, match="Embedding"):
        floats.session().generate([1], 3)


# -- the command -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    le.save(char_lm(), path)
    return str(path)


def test_cli_streams_reproducible_text(model_file):
    r1 = cli("generate", "abc", "--model", model_file, "-n", "25", "--seed", "3")
    r2 = cli("generate", "abc", "--model", model_file, "--max-new-tokens", "25", "--seed", "3", "--top-k", "5")
    assert r1.returncode == 0 and r1.stderr == ""
    assert r1.stdout.startswith("abc") and len(r1.stdout) == len("abc") + 25 + 1
    assert set(r1.stdout) <= set(VOCAB)
    assert r1.stdout == cli("generate", "abc", "--model", model_file, "-n", "25", "--seed", "3").stdout
    assert r2.returncode == 0
    ids = list(char_lm().session().generate([VOCAB.index(c) for c in "abc"], 25, temperature=0.8, seed=3))
    assert r1.stdout == "abc" + "".join(VOCAB[i] for i in ids) + "\n"


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["-n", "many"], "invalid int value"),
    (["--model", "/nonexistent/model.safetensors"], "nonexistent"),
    (["--prompt-typo"], "unrecognized arguments"),
])
def test_cli_user_errors_are_one_line(model_file, args, match):
    if "--model" not in args:
        args = args + ["--model", model_file]
    r = cli("generate", "abc", *args)
    assert r.returncode != 0
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert match in r.stderr


def test_cli_refuses_unknown_characters_and_non_lm_models(model_file, tmp_path):
    r = cli("generate", "abcZ", "--model", model_file)
    assert r.returncode == 1 and "'Z'" in r.stderr and len(r.stderr.splitlines()) == 1
    plain = tmp_path / "plain.safetensors"
    le.save(le.Model([le.LSTM(np.zeros((8, 3)), np.zeros((8, 2)))]), plain)
    r = cli("generate", "abc", "--model", str(plain))
    assert r.returncode == 1 and "not a character-level language model" in r.stderr
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    r = cli("generate", "abc", "--model", str(garbage))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_console_script_is_installed():
    exe = shutil.which("lstm-engine")
    if exe is None:
        pytest.skip("the lstm-engine script is not on PATH (package not installed with pip)")
    r = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "example:" in r.stdout


# -- the shipped model ---------------------------------------------------------------------------------

def shipped():
    ref = resources.files("lstm_engine").joinpath("data", "charlm.safetensors")
    with resources.as_file(ref) as path:
        return le.load(path), os.path.getsize(path)


def test_shipped_model_is_small_and_knows_english():
    model, size = shipped()
    assert size <= 5 * 1024 * 1024
    vocab = model.metadata["vocab"]
    assert isinstance(vocab, str) and len(set(vocab)) == len(vocab)

    def bits_per_char(text):
        ids = np.array([[vocab.index(c) for c in text]])
        logits = model.forward(ids[:, :-1])[0][0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        return -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean() / np.log(2)

    line = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    scrambled = "".join(np.random.default_rng(0).permutation(list(line)))
    real, noise = bits_per_char(line), bits_per_char(scrambled)
    assert real < 3.0 < noise, (real, noise)


def test_shipped_model_runs_from_the_command_line():
    r = cli("generate", "Once upon a", "-n", "80", "--seed", "0")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("Once upon a") and len(text) == len("Once upon a") + 80 + 1
    words = text.split()
    assert sum(w.isalpha() for w in words) >= len(words) // 2


def test_readme_sample_is_what_its_command_prints():
    """The README's sample of the shipped model, regenerated by the command it names (same seed, same text)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    m = re.search(r'A real, unedited sample \(`lstm-engine generate "([^"]+)" --seed (\d+)`\):\n\n```text\n(.*?)```',
                  readme, re.S)
    assert m, "README.md: the sample and its command were not found"
    prompt, seed, sample = m.groups()
    r = cli("generate", prompt, "--seed", seed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == sample.rstrip("\n")


def test_generate_imports_no_framework():
    code = ("import sys\nfrom lstm_engine.cli import main\nmain(['generate', 'ROMEO:', '-n', '5', '--seed', '1'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'keras', 'h5py', 'tensorflow')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"


def test_generate_does_not_wait_for_scipy():
    """`lstm-engine generate` answers its first character in well under 0.3 s only if the package's import stays
    light: scipy.special alone takes ~0.2 s to import, and nothing on the shipped model's path needs scipy."""
    code = ("import sys\n"
            "from lstm_engine.cli import main\n"
            "code = main(['generate', 'Once upon a', '-n', '3', '--seed', '1'])\n"
            "print('scipy' in sys.modules, code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] in ("False 0", "False None"), out.stdout
