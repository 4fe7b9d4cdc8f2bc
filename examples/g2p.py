"""Words to phonemes with g2p-en's trained GRU encoder-decoder, run by lstm_engine alone.

    python examples/g2p.py [WORD ...]

The first run fetches g2p-en 2.1.0's wheel from PyPI with ``pip download`` (nothing is installed) into
``$LSTM_ENGINE_ZOO_CACHE`` (default ``~/.cache/lstm_engine/zoo``) and takes from it the weights
(``g2p_en/checkpoint20.npz``) and the two vocabularies written in ``g2p_en/g2p.py``. Every word goes through the
network: the words are encoded in one padded batch with ``lengths``, then each is decoded greedily, one session step
per phoneme, from its encoder state. (g2p-en itself looks words up in the CMU dictionary first and uses the network
for the rest; the phonemes printed here are the network's.)
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

import lstm_engine as le

PACKAGE = "g2p-en==2.1.0"
MAX_PHONEMES = 20  # g2p-en's own limit
EOS, SOS, UNK = "</s>", "<s>", "<unk>"


def wheel() -> Path:
    """g2p-en's wheel in the cache, downloaded with pip on first use."""
    folder = Path(os.environ.get("LSTM_ENGINE_ZOO_CACHE") or Path.home() / ".cache" / "lstm_engine" / "zoo")
    folder = folder / "downloads" / PACKAGE
    found = sorted(folder.glob("*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--disable-pip-version-check", PACKAGE, "-d", str(folder)], check=True)
        found = sorted(folder.glob("*.whl"))
    return found[0]


def _list_value(node: ast.expr) -> list[str]:
    """A vocabulary written as list literals, ``list("abc")`` calls and ``+`` between them."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _list_value(node.left) + _list_value(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list":
        return list(ast.literal_eval(node.args[0]))
    return list(ast.literal_eval(node))


def vocabularies(source: str) -> tuple[list[str], list[str]]:
    """The graphemes and phonemes that g2p.py assigns in G2p.__init__, read from its syntax tree (not run)."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            if node.targets[0].attr in ("graphemes", "phonemes"):
                found[node.targets[0].attr] = _list_value(node.value)
    return found["graphemes"], found["phonemes"]


class G2P:
    """g2p-en's network: an Embedding -> GRU encoder and an Embedding -> GRU -> Dense greedy decoder."""

    def __init__(self, path: Path) -> None:
        with zipfile.ZipFile(path) as whl:
            source = whl.read("g2p_en/g2p.py").decode("utf8")
            weights = path.parent.parent.parent / "examples" / f"{path.stem}-checkpoint20.npz"
            if not weights.exists():
                weights.parent.mkdir(parents=True, exist_ok=True)
                weights.write_bytes(whl.read("g2p_en/checkpoint20.npz"))
        self.graphemes, self.phonemes = vocabularies(source)
        w = le.load_state_dict(weights)
        self.encoder = le.Model([le.Embedding(w["enc_emb"]),
                                 le.GRU(w["enc_w_ih"], w["enc_w_hh"], w["enc_b_ih"], w["enc_b_hh"])])
        self.decoder = le.Model([le.Embedding(w["dec_emb"]),
                                 le.GRU(w["dec_w_ih"], w["dec_w_hh"], w["dec_b_ih"], w["dec_b_hh"]),
                                 le.Dense(w["fc_w"], w["fc_b"])])
        self.session = self.decoder.session()
        self._g2idx = {g: i for i, g in enumerate(self.graphemes)}

    def encode(self, words: list[str]) -> np.ndarray:
        """The encoder's final states (1, len(words), hidden) for a padded batch of words with lengths."""
        rows = [[self._g2idx.get(ch, self._g2idx[UNK]) for ch in word] + [self._g2idx[EOS]] for word in words]
        lengths = np.array([len(r) for r in rows])
        ids = np.zeros((len(rows), lengths.max()), np.int64)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = row
        return self.encoder.forward(ids, lengths=lengths)[1][0][0]

    def decode(self, h: np.ndarray) -> list[str]:
        """Greedy decoding from one encoder state h (1, 1, hidden): the likeliest phoneme at each step."""
        self.session.state = [(h,)]
        token = np.array([self.phonemes.index(SOS)])
        eos = self.phonemes.index(EOS)
        out = []
        for _ in range(MAX_PHONEMES):
            token = self.session.step(token).argmax(axis=1)
            if token[0] == eos:
                break
            out.append(self.phonemes[token[0]])
        return out

    def __call__(self, words: list[str]) -> list[list[str]]:
        words = [w.lower() for w in words]
        states = self.encode(words)
        return [self.decode(states[:, b:b + 1]) for b in range(len(words))]


def main(argv: list[str]) -> int:
    words = argv or ["activationist", "lstm", "zoology", "phoneme"]
    g2p = G2P(wheel())
    for word, phonemes in zip(words, g2p(words)):
        print(f"{word:>20}  {' '.join(phonemes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
