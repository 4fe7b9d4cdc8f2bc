"""How the engine's time grows with sequence length T and with batch B (engine only).

    python benches/scaling.py [--hidden 512] [--reps 5]

One float32 LSTM layer, input = hidden size. Prints median milliseconds per forward call, time per
step and per (row x step), for T = 16..4096 at B = 1 and for B = 1..256 at T = 64, as Markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import lstm_engine as le


def median_ms(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    H = args.hidden
    rng = np.random.default_rng(0)
    s = 1 / np.sqrt(H)
    model = le.Model([le.LSTM(*(rng.uniform(-s, s, shape).astype(np.float32)
                                for shape in ((4 * H, H), (4 * H, H), (4 * H,), (4 * H,))))])

    print(f"LSTM {H}->{H}, float32, {model.threads} threads")
    print()
    print("| T (B = 1) | ms per call | µs per step |")
    print("| --- | --- | --- |")
    for T in (16, 64, 256, 1024, 4096):
        x = rng.standard_normal((1, T, H)).astype(np.float32)
        ms = median_ms(lambda: model.forward(x), args.reps)
        print(f"| {T} | {ms:.2f} | {ms * 1e3 / T:.1f} |")
    print()
    T = 64
    print(f"| B (T = {T}) | ms per call | µs per step | µs per row-step | GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for B in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = rng.standard_normal((B, T, H)).astype(np.float32)
        ms = median_ms(lambda: model.forward(x), args.reps)
        flops = 2 * B * T * 4 * H * 2 * H
        print(f"| {B} | {ms:.2f} | {ms * 1e3 / T:.1f} | {ms * 1e3 / (T * B):.2f} | {flops / ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
