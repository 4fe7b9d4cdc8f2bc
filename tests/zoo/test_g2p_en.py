"""g2p-en 2.1.0: a GRU encoder and a greedy GRU decoder (checkpoint20.npz) against the package's own NumPy code.

The reference is g2p-en's own ``G2p`` methods compiled from the wheel's ``g2p_en/g2p.py`` without running that module
(packages.g2p_en says which); every word of the package's homograph list goes through the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import zoo_packages as packages
import pytest

import lstm_engine as le

pytestmark = pytest.mark.zoo

EOS, SOS, UNK = 3, 2, 1  # phoneme </s>, phoneme <s>, grapheme <unk>
MAX_STEPS = 20  # g2p-en's predict stops after 20 phonemes


@pytest.fixture(scope="module")
def package(zoo):
    return zoo("g2p-en", "2.1.0") / "g2p_en"


def engine_models(folder):
    """The encoder (Embedding -> GRU) and decoder (Embedding -> GRU -> Dense) from checkpoint20.npz."""
    w = le.load_state_dict(folder / "checkpoint20.npz")
    encoder = le.Model([le.Embedding(w["enc_emb"]),
                        le.GRU(w["enc_w_ih"], w["enc_w_hh"], w["enc_b_ih"], w["enc_b_hh"])])
    decoder = le.Model([le.Embedding(w["dec_emb"]),
                        le.GRU(w["dec_w_ih"], w["dec_w_hh"], w["dec_b_ih"], w["dec_b_hh"]),
                        le.Dense(w["fc_w"], w["fc_b"])])
    return encoder, decoder


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
    ref = packages.g2p_en(package)
    encoder, decoder = engine_models(package)
    vocab = packages.g2p_en_words(package)
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
    ref = packages.g2p_en(package)
    encoder, _ = engine_models(package)
    vocab = packages.g2p_en_words(package)
    rows = [[ref.g2idx.get(ch, UNK) for ch in word] + [ref.g2idx["</s>"]] for word in vocab]
    lengths = np.array([len(r) for r in rows])
    ids = np.zeros((len(rows), lengths.max()), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    y, [(h,)] = encoder.forward(ids, lengths=lengths)
    for b, word in enumerate(vocab):
        _, [(alone,)] = encoder.forward(ids[b:b + 1, :lengths[b]])
        # float32: a batch of 376 and a batch of one run different micro-kernel tiles (AVX-512 sums in
        # another order), so they agree to rounding — the engine's float32 bound, 1e-5 — not bit for bit.
        np.testing.assert_allclose(h[:, b], alone[:, 0], rtol=0, atol=1e-5, err_msg=word)
        assert not y[b, lengths[b]:].any(), word


def test_example_g2p_prints_the_package_phonemes(package):
    """examples/g2p.py, run as the README says, prints what g2p-en's own code predicts."""
    ref = packages.g2p_en(package)
    words = ["activationist", "zoology", "Tomato"]
    example = Path(__file__).parents[2] / "examples" / "g2p.py"
    env = {**os.environ, "LSTM_ENGINE_ZOO_CACHE": str(packages.cache_dir())}
    done = subprocess.run([sys.executable, str(example), *words], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    printed = [line.split() for line in done.stdout.splitlines()]
    assert printed == [[w, *ref.predict(w.lower())] for w in words]
