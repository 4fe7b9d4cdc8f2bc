"""Fit the float32 kernels' rational tanh: tanh(x) ~ x P(x^2) / Q(x^2) on |x| < 9, P and Q of degree 4.

    python benches/fit_tanh.py

Lawson's iteratively reweighted least squares on the linearised error x P - tanh(x) Q (Sanathanan-Koerner
weighting by the previous Q) converges to the minimax fit. Prints the float64 minimax error, the
coefficients rounded to float32 as _cpu.c spells them, and the error of a float32 evaluation in Horner
form against float64 tanh. Beyond |x| = 9 the kernel returns +-1: tanh(9) = 1 - 3.0e-8.
"""
from __future__ import annotations

import numpy as np

CLAMP = 9.0
DEGREE = 4  # in x^2: numerator x^9, denominator x^8


def fit(degree: int = DEGREE, clamp: float = CLAMP, iterations: int = 100) -> tuple[float, np.ndarray, np.ndarray]:
    x = np.linspace(0, clamp, 20001)[1:]
    s, t = x * x, np.tanh(x)
    weight = np.ones_like(x)
    q_prev = np.ones_like(x)
    best = (np.inf, None, None)
    for _ in range(iterations):
        # Unknowns p0..p_d and q1..q_d, with q0 = 1.
        a = np.concatenate([np.stack([x * s**k for k in range(degree + 1)], 1),
                            np.stack([-t * s**k for k in range(1, degree + 1)], 1)], 1)
        scale = np.sqrt(weight) / q_prev
        sol = np.linalg.lstsq(a * scale[:, None], t * scale, rcond=None)[0]
        p, q = sol[: degree + 1], np.concatenate([[1.0], sol[degree + 1:]])
        q_val = np.polynomial.polynomial.polyval(s, q)
        err = x * np.polynomial.polynomial.polyval(s, p) / q_val - t
        worst = float(np.abs(err).max())
        if worst < best[0]:
            best = (worst, p, q)
        q_prev = q_val
        weight = weight * np.abs(err)
        weight *= len(weight) / weight.sum()
    return best


def tanh32(x: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The kernel's evaluation order in float32 (without FMA, the portable variant)."""
    f = np.float32
    xc = np.clip(x, -CLAMP, CLAMP).astype(f)
    s = xc * xc
    num, den = f(p[-1]), f(q[-1])
    for k in range(len(p) - 2, -1, -1):
        num = num * s + f(p[k])
        den = den * s + f(q[k])
    r = np.clip(xc * num / den, -1, 1)
    return np.where(x >= CLAMP, f(1), np.where(x <= -CLAMP, f(-1), r)).astype(f)


def main() -> None:
    worst, p, q = fit()
    print(f"minimax error in float64: {worst:.2e}")
    for name, coef in (("P", p), ("Q", q)):
        for k, v in enumerate(coef):
            print(f"#define {name}{k} {float(np.float32(v))!r}f")
    x = np.linspace(-10, 10, 4_000_001, dtype=np.float32)
    t = tanh32(x, p, q)
    print(f"float32 tanh vs float64 tanh: max abs error {np.abs(t - np.tanh(x.astype(np.float64))).max():.2e}")
    sig = np.float32(0.5) * tanh32(x * np.float32(0.5), p, q) + np.float32(0.5)
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    print(f"float32 sigmoid vs float64: max abs error {np.abs(sig - ref).max():.2e}")


if __name__ == "__main__":
    main()
