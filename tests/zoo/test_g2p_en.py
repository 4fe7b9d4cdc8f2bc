"""g2p-en 2.1.0: a GRU encoder and a greedy GRU decoder (checkpoint20.npz) against the package's own NumPy code.

The reference is g2p-en's own ``G2p`` class, compiled from the wheel's ``g2p_en/g2p.py`` without running that module
(its top level imports nltk and downloads corpora): its methods ``load_variables``, ``sigmoid``, ``grucell``, ``gru``,
``encode`` and ``predict`` are taken from the file's syntax tree as written, with the vocabulary assignments of its
``__init__`` (graphemes, phonemes and their index maps); the CMU dictionary lookup around them is left out, so every
word goes through the network, as the out-of-vocabulary path does. The word list is the package's homographs file.
"""

from __future__ import annotations

import ast
import os
import warnings

import numpy as np
import pytest

import lstm_engine as le

pytestmark = pytest.mark.zoo

_METHODS = {"load_variables", "sigmoid", "grucell", "gru", "encode", "predict"}
_VOCABULARY = {"graphemes", "phonemes", "g2idx", "idx2g", "p2idx", "idx2p"}
EOS, SOS, UNK = 3, 2, 1  # phoneme </s>, phoneme <s>, grapheme <unk>
MAX_STEPS = 20  # g2p-en's predict stops after 20 phonemes


@pytest.fixture(scope="module")
def package(zoo):
    return zoo("g2p-en", "2.1.0") / "g2p_en"


def reference(folder):
    """g2p-en's G2p with its own NumPy methods, compiled from its source (see the module docstring)."""
    path = folder / "g2p.py"
    with warnings.catch_warnings():  # its regular expressions have escapes Python now warns about
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(path.read_text(encoding="utf8"), str(path))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "G2p")
    methods = [node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name in _METHODS]
    assert {m.name for m in methods} == _METHODS
    init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    vocabulary = [node for node in init.body if isinstance(node, ast.Assign)
                  and all(isinstance(t, ast.Attribute) and t.attr in _VOCABULARY for t in node.targets)]
    assert len(vocabulary) == len(_VOCABULARY)
    namespace = {"np": np, "os": os, "dirname": str(folder)}
    body = ast.Module([ast.ClassDef("G2p", [], [], methods, [])], [])
    exec(compile(ast.fix_missing_locations(body), str(path), "exec"), namespace)
    g2p = namespace["G2p"]()
    exec(compile(ast.Module(vocabulary, []), str(path), "exec"), {"self": g2p})
    g2p.load_variables()
    return g2p


def engine_models(folder):
    """The encoder (Embedding -> GRU) and decoder (Embedding -> GRU -> Dense) from checkpoint20.npz."""
    w = le.load_state_dict(folder / "checkpoint20.npz")
    encoder = le.Model([le.Embedding(w["enc_emb"]),
                        le.GRU(w["enc_w_ih"], w["enc_w_hh"], w["enc_b_ih"], w["enc_b_hh"])])
    decoder = le.Model([le.Embedding(w["dec_emb"]),
                        le.GRU(w["dec_w_ih"], w["dec_w_hh"], w["dec_b_ih"], w["dec_b_hh"]),
                        le.Dense(w["fc_w"], w["fc_b"])])
    return encoder, decoder


def words(folder) -> list[str]:
    lines = (folder / "homographs.en").read_text(encoding="utf8").splitlines()
    return [line.split("|")[0].lower() for line in lines if line and not line.startswith("#")] + [
        "activationist", "lstm", "zyxw", "o'neill", "x"]


def greedy(decoder, h: np.ndarray) -> list[int]:
    """Phoneme ids decoded greedily from the encoder's final state h (1, 1, H), one session step per phoneme."""
    session = decoder.session()
    session.state = [(h,)]
    token = np.array([SOS])
    out: list[int] = []
    for _ in range(MAX_STEPS):
        token = session.step(token).argmax(axis=1)
        if token[0] == EOS:
            break
        out.append(int(token[0]))
    return out


def test_g2p_en_phonemes_identical_to_its_numpy_code(package):
    ref = reference(package)
    encoder, decoder = engine_models(package)
    vocab = words(package)
    assert len(vocab) > 370
    differences = []
    for word in vocab:
        ids = np.array([[ref.g2idx.get(ch, UNK) for ch in word] + [ref.g2idx["</s>"]]])
        _, [(h,)] = encoder.forward(ids)
        # The encoder's last state, against the package's own GRU loop.
        enc = ref.gru(ref.encode(word), len(word) + 1, ref.enc_w_ih, ref.enc_w_hh, ref.enc_b_ih, ref.enc_b_hh,
                      h0=np.zeros((1, ref.enc_w_hh.shape[-1]), np.float32))
        np.testing.assert_allclose(h[0], enc[:, -1], rtol=0, atol=1e-5, err_msg=word)
        got = [ref.idx2p[i] for i in greedy(decoder, h)]
        if got != ref.predict(word):
            differences.append((word, got, ref.predict(word)))
    assert not differences, f"{len(differences)}/{len(vocab)} words differ, first: {differences[:3]}"


def test_g2p_en_padded_batch_with_lengths(package):
    """Every word encoded in one padded batch with lengths gives each word's own final state (packed semantics)."""
    ref = reference(package)
    encoder, _ = engine_models(package)
    vocab = words(package)
    rows = [[ref.g2idx.get(ch, UNK) for ch in word] + [ref.g2idx["</s>"]] for word in vocab]
    lengths = np.array([len(r) for r in rows])
    ids = np.zeros((len(rows), lengths.max()), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    y, [(h,)] = encoder.forward(ids, lengths=lengths)
    for b, word in enumerate(vocab):
        _, [(alone,)] = encoder.forward(ids[b:b + 1, :lengths[b]])
        np.testing.assert_allclose(h[:, b], alone[:, 0], rtol=0, atol=1e-6, err_msg=word)
        assert not y[b, lengths[b]:].any(), word
