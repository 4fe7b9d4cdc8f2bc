"""A float64 NumPy reference of ONNX's LSTM, GRU and RNN operators, written from the operator spec.

Independent of the engine's mapping (it reads W, R, B, P in ONNX's own gate orders and layouts), so it
checks the loader and the kernels together, including where onnxruntime has no kernel (layout=1).
"""
from __future__ import annotations

import numpy as np

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
TAKES = {"affine": 2, "leakyrelu": 1, "thresholdedrelu": 1, "scaledtanh": 2, "hardsigmoid": 2, "elu": 1}
DEFAULTS = {"leakyrelu": (0.01,), "hardsigmoid": (0.2, 0.5), "elu": (1.0,)}


def activation(name: str, alpha: float | None, beta: float | None):
    key = name.lower()
    fns = {
        "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "tanh": np.tanh,
        "relu": lambda x: np.maximum(x, 0),
        "affine": lambda x: alpha * x + beta,
        "leakyrelu": lambda x: np.where(x >= 0, x, alpha * x),
        "thresholdedrelu": lambda x: np.where(x > alpha, x, 0.0),
        "scaledtanh": lambda x: alpha * np.tanh(beta * x),
        "hardsigmoid": lambda x: np.clip(alpha * x + beta, 0, 1),
        "elu": lambda x: np.where(x >= 0, x, alpha * np.expm1(np.minimum(x, 0))),
        "softsign": lambda x: x / (1 + np.abs(x)),
        "softplus": lambda x: np.logaddexp(x, 0),
    }
    return fns[key]


def functions(op: str, D: int, names: list | None, alphas: list | None, betas: list | None) -> list[list]:
    """Per direction, the activation functions in ONNX's order (f, g, h), with alpha/beta consumed in order."""
    n = len(DEFAULT_ACTIVATIONS[op])
    names = list(names or DEFAULT_ACTIVATIONS[op] * D)
    alphas, betas = list(alphas or []), list(betas or [])
    out = []
    for name in names:
        k = name.lower()
        takes = TAKES.get(k, 0)
        defaults = DEFAULTS.get(k, ())
        a = (alphas.pop(0) if alphas else defaults[0]) if takes >= 1 else None
        b = (betas.pop(0) if betas else defaults[1]) if takes >= 2 else None
        out.append(activation(name, a, b))
    return [out[d * n:(d + 1) * n] for d in range(D)]


def run(op: str, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
        direction="forward", layout=0, activations=None, activation_alpha=None, activation_beta=None,
        clip=None, input_forget=0, linear_before_reset=0):
    """(Y, Y_h[, Y_c]) of one ONNX recurrent node, in float64 and ONNX's layouts."""
    X, W, R = (np.asarray(a, np.float64) for a in (X, W, R))
    if layout == 1:
        X = X.transpose(1, 0, 2)
        initial_h = None if initial_h is None else np.asarray(initial_h).transpose(1, 0, 2)
        initial_c = None if initial_c is None else np.asarray(initial_c).transpose(1, 0, 2)
    T, Bt, _ = X.shape
    D, GH, _ = W.shape
    G = GATES[op]
    H = GH // G
    B = np.zeros((D, 2 * GH)) if B is None else np.asarray(B, np.float64)
    P = np.zeros((D, 3 * H)) if P is None else np.asarray(P, np.float64)
    lens = np.full(Bt, T) if sequence_lens is None else np.asarray(sequence_lens)
    h0 = np.zeros((D, Bt, H)) if initial_h is None else np.asarray(initial_h, np.float64)
    c0 = np.zeros((D, Bt, H)) if initial_c is None else np.asarray(initial_c, np.float64)
    fns = functions(op, D, activations, activation_alpha, activation_beta)
    cl = (lambda x: np.clip(x, -clip, clip)) if clip else (lambda x: x)
    Y = np.zeros((T, D, Bt, H))
    Y_h = np.zeros((D, Bt, H))
    Y_c = np.zeros((D, Bt, H))
    for d in range(D):
        reverse = direction == "reverse" or d == 1
        Wd, Rd, Wb, Rb = W[d], R[d], B[d, :GH], B[d, GH:]
        for b in range(Bt):
            n = int(lens[b])
            h, c = h0[d, b].copy(), c0[d, b].copy()
            if n == 0:
                Y_h[d, b] = 0
                Y_c[d, b] = 0
                continue
            for t in (range(n - 1, -1, -1) if reverse else range(n)):
                x = X[t, b]
                if op == "LSTM":
                    f, g, hh = fns[d]
                    pre = Wd @ x + Wb + Rd @ h + Rb
                    pi, po, pf, pc = (pre[k * H:(k + 1) * H] for k in range(4))
                    Pi, Po, Pf = (P[d, k * H:(k + 1) * H] for k in range(3))
                    i = f(cl(pi + Pi * c))
                    fg = 1 - i if input_forget else f(cl(pf + Pf * c))
                    ct = g(cl(pc))
                    c = fg * c + i * ct
                    o = f(cl(po + Po * c))
                    h = o * hh(c)
                elif op == "GRU":
                    f, g = fns[d]
                    xw = Wd @ x + Wb
                    z = f(cl(xw[:H] + Rd[:H] @ h + Rb[:H]))
                    r = f(cl(xw[H:2 * H] + Rd[H:2 * H] @ h + Rb[H:2 * H]))
                    if linear_before_reset:
                        ht = g(cl(xw[2 * H:] + r * (Rd[2 * H:] @ h + Rb[2 * H:])))
                    else:
                        ht = g(cl(xw[2 * H:] + Rd[2 * H:] @ (r * h) + Rb[2 * H:]))
                    h = (1 - z) * ht + z * h
                else:
                    (f,) = fns[d]
                    h = f(cl(Wd @ x + Wb + Rd @ h + Rb))
                Y[t, d, b] = h
            Y_h[d, b], Y_c[d, b] = h, c
    if layout == 1:
        Y, Y_h, Y_c = Y.transpose(2, 0, 1, 3), Y_h.transpose(1, 0, 2), Y_c.transpose(1, 0, 2)
    return (Y, Y_h, Y_c) if op == "LSTM" else (Y, Y_h)
