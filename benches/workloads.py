"""The issue's workloads, built in lstm_engine from one set of NumPy weights (no framework needed).

peers.py loads the same weights into PyTorch and ONNX Runtime; test_bench_workloads.py times the engine alone.
Weights are in PyTorch's layout (gate rows i, f, g, o / r, z, n), drawn like PyTorch's default init.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import lstm_engine as le


@dataclass(frozen=True)
class Workload:
    name: str
    cell: str  # "lstm" or "gru"
    input_size: int
    hidden_size: int
    num_layers: int
    batch: int
    steps: int  # per call
    stateful: bool  # one step per call, state carried between calls
    vocab: int = 0  # token-lm: Embedding(vocab, input_size) before, Linear(hidden, vocab) after

    @property
    def gates(self) -> int:
        return 4 if self.cell == "lstm" else 3

    def flops(self) -> float:
        """Multiply-adds x 2 of the recurrent layers per call (gates and heads not counted)."""
        total, size = 0, self.input_size
        for _ in range(self.num_layers):
            total += 2 * self.batch * self.steps * self.gates * self.hidden_size * (size + self.hidden_size)
            size = self.hidden_size
        return float(total)

    def weight_bytes(self, itemsize: int = 4) -> tuple[int, int]:
        """(read at every step, read once per call) bytes of weights of a batch-1 call: the recurrent
        weights, every step; the input weights with the head, once when a call is one step. With a
        vocabulary the first layer's input weights are a table whose one row a token reads."""
        hh, other, size = 0, 0, self.input_size
        for i in range(self.num_layers):
            hh += self.gates * self.hidden_size * self.hidden_size
            other += self.gates * self.hidden_size * (0 if (i == 0 and self.vocab) else size)
            size = self.hidden_size
        other += self.vocab * self.hidden_size
        if self.steps == 1:
            return (hh + other) * itemsize, 0
        return hh * itemsize, other * itemsize


WORKLOADS = [
    Workload("stream-tiny", "lstm", 64, 64, 1, 1, 1, True),
    Workload("stream", "lstm", 256, 256, 2, 1, 1, True),
    Workload("stream-gru", "gru", 256, 256, 1, 1, 1, True),
    Workload("sequence", "lstm", 512, 512, 1, 1, 256, False),
    Workload("batch", "lstm", 512, 512, 1, 64, 64, False),
    Workload("batch-large", "lstm", 1024, 1024, 1, 128, 32, False),
    Workload("token-lm", "lstm", 128, 512, 2, 1, 1, True, vocab=10000),
    # The pool's ceiling: one step of 32 streams at once (what StreamPool runs per batch).
    Workload("pool-step", "lstm", 256, 256, 2, 32, 1, True),
]
BY_NAME = {w.name: w for w in WORKLOADS}


def make_weights(w: Workload, seed: int = 0) -> dict:
    """{'layers': [(w_ih, w_hh, b_ih, b_hh), ...], 'embedding': (V, E) or None, 'head': (W, b) or None}."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(w.hidden_size)
    layers, size = [], w.input_size
    for _ in range(w.num_layers):
        gh = w.gates * w.hidden_size
        layers.append(tuple(rng.uniform(-bound, bound, shape).astype(np.float32)
                            for shape in ((gh, size), (gh, w.hidden_size), (gh,), (gh,))))
        size = w.hidden_size
    out = {"layers": layers, "embedding": None, "head": None}
    if w.vocab:
        out["embedding"] = rng.standard_normal((w.vocab, w.input_size)).astype(np.float32)
        out["head"] = (rng.uniform(-bound, bound, (w.vocab, w.hidden_size)).astype(np.float32),
                       rng.uniform(-bound, bound, (w.vocab,)).astype(np.float32))
    return out


def make_inputs(w: Workload, calls: int = 1, seed: int = 1) -> list[np.ndarray]:
    """Inputs of `calls` consecutive calls: token ids (B, steps) int64 or floats (B, steps, input_size)."""
    rng = np.random.default_rng(seed)
    if w.vocab:
        return [rng.integers(0, w.vocab, (w.batch, w.steps)) for _ in range(calls)]
    return [rng.standard_normal((w.batch, w.steps, w.input_size)).astype(np.float32) for _ in range(calls)]


def engine_model(w: Workload, weights: dict, **options) -> le.Model:
    cls = le.LSTM if w.cell == "lstm" else le.GRU
    layers: list = []
    if weights["embedding"] is not None:
        layers.append(le.Embedding(weights["embedding"]))
    layers += [cls(*lw) for lw in weights["layers"]]
    if weights["head"] is not None:
        layers.append(le.Dense(*weights["head"]))
    return le.Model(layers, **options)


def engine_runner(w: Workload, model: le.Model) -> Callable[[np.ndarray], np.ndarray]:
    """A function running one call of the workload; streaming ones carry the state between calls.

    Streaming uses a Session when the model has one, else Model.forward with the state handed back.
    """
    if not w.stateful:
        return lambda x: model.forward(x)[0]
    if hasattr(model, "session"):
        session = model.session(batch_size=w.batch)
        return lambda x: session.step(x[:, 0])
    state = None

    def step(x: np.ndarray) -> np.ndarray:
        nonlocal state
        y, state = model.forward(x, initial_state=state)
        return y[:, 0]

    return step
