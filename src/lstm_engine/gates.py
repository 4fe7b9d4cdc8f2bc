"""A look inside recurrent layers: gate activations over time, memory horizon and gradient flow.

``model.forward(x, record=True)`` runs the model's plan with each recurrent layer run here, step by
step in NumPy from the layer's own weights, instead of through the kernel: the kernel's loop stays as fast as it is and the
gates come out as a by-product. Gates of each recurrent layer, a dict name -> (D, B, T, width):

    LSTM  i, f, g, o (hidden_size), c (hidden_size), h (proj_size or hidden_size)
    GRU   r, z, n, h
    RNN   h

indexed by input timestep (a reverse direction's step t is input t, whatever order it ran in), in the
input's dtype, NaN where a row skips the step (lengths, masks). ``analyse`` adds per layer the memory
horizon and the gradient flow ||ds_T/ds_t|| from exact Jacobian products; ``plot`` draws it all
(matplotlib: ``pip install matplotlib``, or ``pip install ".[plot]"`` from a checkout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ._base import one_blas_thread
from .activations import apply

GATES = {"LSTM": ("i", "f", "g", "o", "c", "h"), "GRU": ("r", "z", "n", "h"), "RNN": ("h",)}
# The gate whose running product is what survives of the state: LSTM's forget gate, GRU's update gate.
KEEP_GATE = {"LSTM": "f", "GRU": "z"}


def _kind(layer: Any) -> str:
    for cls in type(layer).__mro__:
        if cls.__name__ in GATES:
            return cls.__name__
    raise TypeError(f"{type(layer).__name__} is not an LSTM, GRU or RNN layer")


def _act(name: str, x: np.ndarray) -> np.ndarray:
    return apply(name, x.copy())


def _derivative(name: str, pre: np.ndarray) -> np.ndarray:
    """d act(x) / dx at the pre-activations (subgradient 0 at the kinks of relu and the hard sigmoids)."""
    if name == "sigmoid":
        s = _act("sigmoid", pre)
        return s * (1 - s)
    if name == "tanh":
        return 1 - np.tanh(pre) ** 2
    if name == "relu":
        return (pre > 0).astype(pre.dtype)
    if name == "linear":
        return np.ones_like(pre)
    if name == "hard_sigmoid":
        return np.where(np.abs(pre) < 3, 1 / 6, 0.0)
    if name == "hard_sigmoid_v2":
        return np.where(np.abs(pre) < 2.5, 0.2, 0.0)
    if name == "softsign":
        return 1 / (1 + np.abs(pre)) ** 2
    if name == "softplus":
        return _act("sigmoid", pre)
    if name == "elu":
        return np.where(pre > 0, 1.0, np.exp(np.minimum(pre, 0)))
    if name == "exponential":
        return np.exp(pre)
    raise ValueError(f"activation {name!r} has no derivative here")


@dataclass
class Trace:
    """What one recurrent layer did, in float64, enough to differentiate every step.

    pre (D, B, T, G*H) pre-activations in PyTorch's gate order (for GRU's n: the input part and the
    recurrent part W_hn h + b_hn apart, in ``hn``); h_prev, c_prev (D, B, T, width) the state each step
    started from; valid (B, T); order[d] the steps of direction d in running order.
    """

    pre: np.ndarray
    hn: np.ndarray | None
    h_prev: np.ndarray
    c_prev: np.ndarray | None
    valid: np.ndarray
    order: list[np.ndarray]
    gates: dict[str, np.ndarray] = field(default_factory=dict)


def _weights(layer: Any, d: int) -> dict[str, np.ndarray]:
    w = layer.weights()
    G, H = layer.num_gates, layer.hidden_size
    zero = np.zeros(G * H)
    return {
        "w_ih": w["weight_ih"][d].astype(np.float64),
        "w_hh": w["weight_hh"][d].astype(np.float64),
        "b_ih": w["bias_ih"][d].astype(np.float64) if "bias_ih" in w else zero,
        "b_hh": w["bias_hh"][d].astype(np.float64) if "bias_hh" in w else zero,
        "w_hr": w["weight_hr"][d].astype(np.float64) if "weight_hr" in w else None,
    }


def run_layer(layer: Any, x: np.ndarray, mask: np.ndarray | None, state: tuple[np.ndarray, ...],
              zero_masked: bool) -> tuple[np.ndarray, Trace]:
    """The recording twin of ``RecurrentLayer.run``: raw outputs (B, T, D*P) and the Trace.

    Same contract as the kernel: state arrays are updated in place, outputs sit at their own
    timestep, a masked step carries the state and outputs 0 (zero_masked) or the previous output.
    """
    if layer.uses_options:
        raise ValueError(f"record=True: {layer!r} uses options this NumPy twin does not model (peepholes, clip, "
                         "input_forget or parameterised activations); run it without record")
    kind = _kind(layer)
    B, T, _ = x.shape
    D, H, G = layer.num_directions, layer.hidden_size, layer.num_gates
    P = layer.proj_size or H
    act, gact = layer.activation, layer.recurrent_activation
    valid = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    x64 = x.astype(np.float64)
    y = np.zeros((B, T, D * P))
    pre = np.zeros((D, B, T, G * H))
    hn_all = np.zeros((D, B, T, H)) if kind == "GRU" else None
    h_prev = np.zeros((D, B, T, P))
    c_prev = np.zeros((D, B, T, H)) if kind == "LSTM" else None
    gates = {name: np.full((D, B, T, P if name == "h" else H), np.nan) for name in GATES[kind]}
    order = []
    for d in range(D):
        w = _weights(layer, d)
        xw = x64 @ w["w_ih"].T + w["b_ih"]  # (B, T, G*H)
        h = state[0][d].astype(np.float64)
        c = state[1][d].astype(np.float64) if kind == "LSTM" else None
        prev_out = np.zeros((B, P))
        steps = np.arange(T)[::-1] if (d == 1) != layer.go_backwards else np.arange(T)
        order.append(steps)
        for t in steps:
            ok = valid[:, t][:, None]
            h_prev[d, :, t] = h
            hh = h @ w["w_hh"].T + w["b_hh"]
            if kind == "LSTM":
                c_prev[d, :, t] = c
                a = xw[:, t] + hh
                pre[d, :, t] = a
                i, f, o = (_act(gact, a[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
                g = _act(act, a[:, 2 * H:3 * H])
                c_new = f * c + i * g
                h_new = o * _act(act, c_new)
                if w["w_hr"] is not None:
                    h_new = h_new @ w["w_hr"].T
                values = {"i": i, "f": f, "g": g, "o": o, "c": c_new, "h": h_new}
                c = np.where(ok, c_new, c)
            elif kind == "GRU":
                a = xw[:, t].copy()
                a[:, :2 * H] += hh[:, :2 * H]
                r = _act(gact, a[:, :H])
                z = _act(gact, a[:, H:2 * H])
                if layer.reset_after:
                    hn = hh[:, 2 * H:]
                    a[:, 2 * H:] += r * hn
                else:
                    # Keras's reset-before variant: both biases sit outside the product.
                    hn = (r * h) @ w["w_hh"][2 * H:].T
                    a[:, 2 * H:] += hn + w["b_hh"][2 * H:]
                hn_all[d, :, t] = hn
                pre[d, :, t] = a
                n = _act(act, a[:, 2 * H:])
                h_new = (1 - z) * n + z * h
                values = {"r": r, "z": z, "n": n, "h": h_new}
            else:
                a = xw[:, t] + hh
                pre[d, :, t] = a
                h_new = _act(act, a)
                values = {"h": h_new}
            for name, v in values.items():
                gates[name][d, :, t] = np.where(ok, v, np.nan)
            h = np.where(ok, h_new, h)
            out = np.where(ok, h_new, 0.0 if zero_masked else prev_out)
            y[:, t, d * P:(d + 1) * P] = out
            prev_out = out
        state[0][d] = h
        if kind == "LSTM":
            state[1][d] = c
    trace = Trace(pre, hn_all, h_prev, c_prev, valid, order, gates)
    return y.astype(x.dtype), trace


# -- memory horizon ---------------------------------------------------------------------------------

def memory_horizon(layer: Any, gates: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per direction, the steps until the running product of the keep gate falls below 1/e, mean over units.

    The keep gate is LSTM's forget gate f, GRU's update gate z (h' = z h + (1 - z) n); the product runs
    from the first step in the direction's running order, so it is how long the initial state lasts.
    A unit whose product never falls below 1/e counts the whole sequence, T. Skipped steps (NaN)
    carry the state, so they count as 1. Returns (D,) averaged over units and batch rows, or None
    for a vanilla RNN, which has no gate.
    """
    kind = _kind(layer)
    if kind not in KEEP_GATE:
        return None
    keep = np.nan_to_num(np.asarray(gates[KEEP_GATE[kind]], np.float64), nan=1.0)
    D, _, T, _ = keep.shape
    out = np.empty(D)
    for d in range(D):
        run = keep[d] if (d == 1) == layer.go_backwards else keep[d][:, ::-1]
        with np.errstate(divide="ignore"):
            logs = np.cumsum(np.log(run), axis=1)  # (B, T, H)
        below = logs < -1.0
        steps = np.where(below.any(axis=1), below.argmax(axis=1) + 1, T)
        out[d] = steps.mean()
    return out


# -- gradient flow ----------------------------------------------------------------------------------

def _step_jacobian(layer: Any, trace: Trace, d: int, t: int, w: dict[str, np.ndarray]) -> np.ndarray:
    """d s_{t+1} / d s_t for every batch row: (B, S, S), s = (h, c) for LSTM, h otherwise."""
    kind = _kind(layer)
    H = layer.hidden_size
    act, gact = layer.activation, layer.recurrent_activation
    a = trace.pre[d, :, t]
    h = trace.h_prev[d, :, t]
    B = a.shape[0]
    W = w["w_hh"]
    if kind == "LSTM":
        c = trace.c_prev[d, :, t]
        ai, af, ag, ao = (a[:, k * H:(k + 1) * H] for k in range(4))
        i, f, o = _act(gact, ai), _act(gact, af), _act(gact, ao)
        g = _act(act, ag)
        c_new = f * c + i * g
        # dc'/dh = diag(c f') W_f + diag(g i') W_i + diag(i g') W_g ; dc'/dc = diag(f)
        dc_dh = ((c * _derivative(gact, af))[:, :, None] * W[H:2 * H]
                 + (g * _derivative(gact, ai))[:, :, None] * W[:H]
                 + (i * _derivative(act, ag))[:, :, None] * W[2 * H:3 * H])
        dc_dc = np.zeros((B, H, H))
        idx = np.arange(H)
        dc_dc[:, idx, idx] = f
        # m = o act(c'): dm/dh = diag(act(c') o') W_o + diag(o act'(c')) dc'/dh
        oc = o * _derivative(act, c_new)
        dm_dh = (_act(act, c_new) * _derivative(gact, ao))[:, :, None] * W[3 * H:] + oc[:, :, None] * dc_dh
        dm_dc = oc[:, :, None] * dc_dc
        if w["w_hr"] is not None:
            dm_dh, dm_dc = w["w_hr"] @ dm_dh, w["w_hr"] @ dm_dc
        top = np.concatenate([dm_dh, dm_dc], axis=2)
        bottom = np.concatenate([dc_dh, dc_dc], axis=2)
        J = np.concatenate([top, bottom], axis=1)
        S = J.shape[1]
    elif kind == "GRU":
        ar, az, an = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
        r, z, n = _act(gact, ar), _act(gact, az), _act(act, an)
        dr = _derivative(gact, ar)[:, :, None] * W[:H]
        dz = _derivative(gact, az)[:, :, None] * W[H:2 * H]
        if layer.reset_after:
            da_n = trace.hn[d, :, t][:, :, None] * dr + r[:, :, None] * W[2 * H:]
        else:
            # a_n = W_hn (r * h) + ...: W_hn (diag(r) + diag(h) dr/dh)
            da_n = W[2 * H:] @ (r[:, :, None] * np.eye(H) + h[:, :, None] * dr)
        dn = _derivative(act, an)[:, :, None] * da_n
        J = (h - n)[:, :, None] * dz + (1 - z)[:, :, None] * dn
        idx = np.arange(H)
        J[:, idx, idx] += z
        S = H
    else:
        J = _derivative(act, a)[:, :, None] * W
        S = H
    # A skipped step carries the state unchanged.
    skip = ~trace.valid[:, t]
    if skip.any():
        J[skip] = np.eye(S)
    return J


def jacobian_products(layer: Any, trace: Trace, d: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(k, d s_T / d s_{T-k}) for k = 0..T going back from the last step of direction d; each (B, S, S).

    s_t is the state after t steps of the direction's running order (s_0 the initial state);
    exact products of the step Jacobians of the loaded weights, in float64.
    """
    w = _weights(layer, d)
    steps = trace.order[d]
    B = trace.pre.shape[1]
    S = trace.h_prev.shape[-1] + (trace.c_prev.shape[-1] if trace.c_prev is not None else 0)
    prod = np.broadcast_to(np.eye(S), (B, S, S)).copy()
    yield 0, prod
    for k, t in enumerate(steps[::-1], start=1):
        prod = prod @ _step_jacobian(layer, trace, d, int(t), w)
        yield k, prod


def gradient_flow(layer: Any, trace: Trace) -> dict[str, np.ndarray]:
    """Spectral norms of d h_T / d h_{T-k} ("h") and, for LSTM, d c_T / d c_{T-k} ("c"): (D, B, T+1) by k."""
    D, B, T = trace.pre.shape[:3]
    P = trace.h_prev.shape[-1]
    flows = {"h": np.empty((D, B, T + 1))}
    if trace.c_prev is not None:
        flows["c"] = np.empty((D, B, T + 1))
    for d in range(D):
        for k, prod in jacobian_products(layer, trace, d):
            flows["h"][d, :, k] = np.linalg.norm(prod[:, :P, :P], ord=2, axis=(1, 2))
            if "c" in flows:
                flows["c"][d, :, k] = np.linalg.norm(prod[:, P:, P:], ord=2, axis=(1, 2))
    return flows


@dataclass
class LayerReport:
    """One recurrent layer's gates (see the module docstring), memory horizon (D,) and gradient flow."""

    index: int
    layer: Any
    gates: dict[str, np.ndarray]
    horizon: np.ndarray | None
    flow: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return _kind(self.layer)


def analyse(model: Any, x: Any, lengths: Any = None, *, cast: bool = False, flow: bool = True) -> list[LayerReport]:
    """Gates, memory horizon and (with ``flow``) gradient flow of every recurrent layer for input x."""
    from .plan import Call

    inputs, dtype, B = model._inputs(x, lengths, cast)
    call = Call(model._initial(None, B, dtype, cast), record=[])
    model._execute(inputs, dtype, call)
    reports = []
    with one_blas_thread():
        for layer, trace in call.record:
            index = next(i for i, known in enumerate(model.layers) if known is layer)
            gates = {name: v.astype(dtype) for name, v in trace.gates.items()}
            reports.append(LayerReport(index, layer, gates, memory_horizon(layer, trace.gates),
                                       gradient_flow(layer, trace) if flow else {}))
    return reports


# -- drawing ----------------------------------------------------------------------------------------

PLOT_GATES = {"LSTM": ("i", "f", "o", "c"), "GRU": ("r", "z", "h"), "RNN": ("h",)}


def plot(reports: list[LayerReport], path: str, *, row: int = 0, labels: list[str] | None = None,
         title: str | None = None) -> None:
    """Heatmaps (units x time) of each layer's gates for batch row ``row``, and its gradient flow, to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("drawing the gates needs matplotlib: pip install matplotlib "
                          '(from an lstm_engine checkout: pip install ".[plot]")') from exc
    panels = [(rep, name) for rep in reports for name in PLOT_GATES[rep.kind]]
    n = len(panels) + len(reports)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.2 * n + 0.6), squeeze=False)
    axes = axes[:, 0]
    k = 0
    for rep in reports:
        for name in PLOT_GATES[rep.kind]:
            ax = axes[k]
            k += 1
            data = rep.gates[name][:, row]  # (D, T, width): directions stacked on the unit axis
            data = np.concatenate(list(data.transpose(0, 2, 1)), axis=0)
            bounded = name in ("i", "f", "o", "r", "z") and rep.layer.recurrent_activation != "relu"
            # A few saturated cells would wash out the rest: the colour scale stops at the 99th percentile.
            limit = np.nanpercentile(np.abs(data), 99) if not bounded else 1.0
            im = ax.imshow(data, aspect="auto", interpolation="nearest", origin="lower",
                           cmap="viridis" if bounded else "RdBu_r",
                           vmin=0 if bounded else -limit, vmax=limit if limit > 0 else 1)
            fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
            ax.set_ylabel("unit")
            ax.set_title(f"layer {rep.index} {rep.kind}: {name}", loc="left", fontsize=10)
            T = data.shape[1]
            if labels is not None and T <= 120:
                ax.set_xticks(range(T))
                ax.set_xticklabels([repr(s)[1:-1] if s in "\n\t" else s for s in labels], fontsize=7,
                                   family="monospace")
        ax = axes[k]
        k += 1
        for key, style in (("c", "-"), ("h", "--")):
            if key in rep.flow:
                D = rep.flow[key].shape[0]
                for d in range(D):
                    label = f"‖∂{key}_T/∂{key}_(T−k)‖" + (f" dir {d}" if D > 1 else "")
                    ax.semilogy(rep.flow[key][d, row], style, label=label)
        horizon = "" if rep.horizon is None else "   memory horizon " + ", ".join(f"{v:.1f}" for v in rep.horizon)
        ax.set_title(f"layer {rep.index} {rep.kind}: gradient flow back from the last step{horizon}",
                     loc="left", fontsize=10)
        ax.set_xlabel("k (steps back from T)")
        ax.grid(True, which="both", alpha=0.3)
        if rep.flow:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[:-1]:
        if ax.get_xlabel() == "":
            ax.set_xlabel("t")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
