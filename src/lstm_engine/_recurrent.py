"""What LSTM, GRU and RNN layers share: weight checks, one kernel per dtype, and running them.

Weights arrive in PyTorch's layout (gate blocks in PyTorch's order, rows = gates x hidden units),
one set per direction. They are checked and shaped once here; per call only buffers are made.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import activations
from ._base import Layer, as_dtypes, as_weight
from ._kernels import RecurrentKernel

MERGE_MODES = ("concat", "sum", "ave", "mul")
_SPARE_WORK_BYTES = 64 << 20


def _is_aligned(a: np.ndarray, alignment: int = 64) -> bool:
    return a.ctypes.data % alignment == 0


def _aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """a itself if it starts on an `alignment`-byte boundary, else an aligned copy."""
    if _is_aligned(a, alignment):
        return a
    buf = np.empty(a.nbytes + alignment, np.uint8)
    start = -buf.ctypes.data % alignment
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class RecurrentLayer(Layer):
    """Base of LSTM, GRU and RNN. Subclasses set the gate count and how the biases are pre-summed.

    Activations (``activation``, ``recurrent_activation``, LSTM's ``cell_activation``) are names from
    ``activations.CODES``, or dicts ``{"name": "leaky_relu", "alpha": 0.1}`` for those that take
    parameters (``activations.PARAMS``); a list gives one per direction. ``clip`` bounds every gate's
    pre-activation to [-clip, clip] before its function (ONNX). Layers using these options, or
    LSTM's peepholes and input_forget, run a general gate loop; the others keep the fused ones.
    """

    is_recurrent = True
    num_gates: int

    def __init__(
        self,
        weight_ih: Any,
        weight_hh: Any,
        bias_ih: Any = None,
        bias_hh: Any = None,
        weight_hr: Any = None,
        *,
        bidirectional: bool | None = None,
        activation: str = "tanh",
        recurrent_activation: str = "sigmoid",
        go_backwards: bool = False,
        return_sequences: bool = True,
        merge_mode: str = "concat",
        zero_output_for_mask: bool = False,
        cell_activation: Any = None,
        clip: float | None = None,
        input_forget: bool = False,
        peephole: Any = None,
        dtype: Any = np.float32,
        quantization: Any = None,
    ) -> None:
        self.dtypes = as_dtypes(dtype)
        wide = max(self.dtypes, key=lambda d: d.itemsize)
        name = type(self).__name__
        # hidden_size comes from weight_hh's columns (weight_hr's with a projection), so that each weight
        # is blamed for its own shape, in the shape the caller gave.
        w_ih = as_weight(weight_ih, f"{name} weight_ih", (2, 3), wide)
        ih_given = w_ih.shape
        w_ih = self._directions(w_ih, 2)
        D, GH, I = w_ih.shape
        G = self.num_gates
        if D not in (1, 2) or GH == 0 or GH % G or I == 0:
            raise ValueError(
                f"{name} weight_ih: expected shape ({G}*hidden_size, input_size), or "
                f"(2, {G}*hidden_size, input_size) when bidirectional, got {ih_given}"
            )
        if bidirectional is not None and bool(bidirectional) != (D == 2):
            raise ValueError(
                f"{name}: bidirectional={bidirectional} but weight_ih has {D} direction(s); give "
                "bidirectional weights stacked on a leading axis of 2 (forward, reverse)"
            )
        per_dir = "" if D == 1 else " for each of the 2 directions"
        hr = None
        hh = as_weight(weight_hh, f"{name} weight_hh", (2, 3), wide)
        hh_given = hh.shape
        hh = self._directions(hh, 2)
        if weight_hr is not None:
            if G != 4:
                raise ValueError(f"{name}: weight_hr (a projection) exists only for LSTM")
            hr = as_weight(weight_hr, f"{name} weight_hr", (2, 3), wide)
            hr_given = hr.shape
            hr = self._directions(hr, 2)
            P, H = hr.shape[1:]
            if hr.shape[0] != D or P == 0 or H == 0:
                raise ValueError(f"{name} weight_hr: expected shape (proj_size, hidden_size){per_dir}, "
                                 f"got {hr_given}")
        else:
            H = P = hh.shape[2]
        if hh.shape != (D, G * H, P) or H == 0:
            width = "proj_size" if hr is not None else "hidden_size"
            want = f"({G}*hidden_size, {width})" + (f" = {(G * H, P)}" if hr is not None else "")
            raise ValueError(f"{name} weight_hh: expected shape {want}{per_dir}, got {hh_given}")
        if GH != G * H:
            src = "weight_hr" if hr is not None else "weight_hh"
            raise ValueError(f"{name} weight_ih {ih_given} and {src} {hr_given if hr is not None else hh_given} "
                             f"disagree: weight_ih's {GH} rows ({G}*hidden_size) give hidden_size {GH // G}, "
                             f"{src}'s columns {H}")
        biases = []
        for arg, bname in ((bias_ih, "bias_ih"), (bias_hh, "bias_hh")):
            if arg is None:
                biases.append(None)
                continue
            b = self._directions(as_weight(arg, f"{name} {bname}", (1, 2), wide), 1)
            if b.shape != (D, GH):
                raise ValueError(f"{name} {bname}: expected shape ({GH},) for each of {D} direction(s), "
                                 f"got {b.shape}")
            biases.append(b)
        if go_backwards and D == 2:
            raise ValueError(f"{name}: go_backwards applies to a single direction, not a bidirectional layer")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"{name}: merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        lstm_only = {"cell_activation": cell_activation is not None, "input_forget": bool(input_forget),
                     "peephole": peephole is not None}
        if G != 4 and any(lstm_only.values()):
            raise ValueError(f"{name}: {', '.join(k for k, v in lstm_only.items() if v)} exist only for LSTM")
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float, np.integer, np.floating)) \
                    or not clip > 0 or not np.isfinite(clip):
                raise ValueError(f"{name}: clip must be a positive finite number (the gates' pre-activation "
                                 f"bound) or None, got {clip!r}")
            clip = float(clip)
        if peephole is not None:
            peephole = self._directions(as_weight(peephole, f"{name} peephole", (1, 2), wide), 1)
            if peephole.shape != (D, 3 * H):
                raise ValueError(f"{name} peephole: expected shape ({3 * H},) (3*hidden_size: rows i, f, o) for "
                                 f"each of {D} direction(s), got {peephole.shape}")
        self._specs = {
            "recurrent_activation": self._activation_specs(recurrent_activation, "recurrent_activation", D),
            "activation": self._activation_specs(activation, "activation", D),
            "cell_activation": self._activation_specs(
                activation if cell_activation is None else cell_activation, "cell_activation", D),
        }
        self.clip = clip
        self.input_forget = bool(input_forget)

        self.input_size = I
        self.hidden_size = H
        self.proj_size = P if hr is not None else 0
        self.bidirectional = D == 2
        self.num_directions = D
        # Names for the common case (one plain function for every direction), else as the constructor takes them.
        self.activation = self._describe("activation")
        self.recurrent_activation = self._describe("recurrent_activation")
        self.cell_activation = self._describe("cell_activation")
        self.go_backwards = bool(go_backwards)
        self.return_sequences = bool(return_sequences)
        self.merge_mode = merge_mode
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self._state_out = P  # h's width
        self.output_size = P * (D if merge_mode == "concat" else 1)
        self._weights = {"weight_ih": w_ih, "weight_hh": hh, "bias_ih": biases[0],
                         "bias_hh": biases[1], "weight_hr": hr, "peephole": peephole}
        self.uses_options = self._uses_options()
        self.quantization = quantization
        if quantization is not None and self.dtypes != (np.dtype(np.float32),):
            raise ValueError(f"{name}: a quantized layer runs float32 only, got dtype={dtype!r}")
        self._kernels = {dt: self._build_kernel(dt) for dt in self.dtypes}
        kernel = self._kernels[self.dtypes[0]]
        self._packed_only = len(self.dtypes) == 1 and kernel.packed is not None
        if self._packed_only:
            # The float32 kernels run on their packed copies alone: keeping PyTorch's layout as well
            # would hold every recurrent weight twice. weights() lays it out again when asked.
            self._weights["weight_ih"] = self._weights["weight_hh"] = None
        elif quantization is None and not (_is_aligned(w_ih) and _is_aligned(hh)):
            # Kernels that read these arrays (BLAS): cache-line aligned, so that 32-byte loads never
            # straddle two lines (NumPy's large arrays start 16 bytes into a page; measured 10-20% on
            # the batch GEMMs). Only here: a packed-only layer's aligned copy was freed at once, and the
            # heap kept it (token-lm: 8 MB of its resident footprint).
            self._weights["weight_ih"], self._weights["weight_hh"] = _aligned(w_ih), _aligned(hh)
            self._kernels = {dt: self._build_kernel(dt) for dt in self.dtypes}
        if quantization is not None:
            # Kept once, as stored: weights() widens them when asked.
            for k in quantization.stored:
                self._weights[k] = None
        # Work buffers lent to one call at a time (list.pop/append are atomic under the GIL, so
        # concurrent calls each get their own): a fresh 32 MB buffer per call cost the batch
        # workload 16% of its time in the kernel's page zeroing (perf).
        self._spare_work: list[np.ndarray] = []

    @staticmethod
    def _activation_specs(value: Any, what: str, D: int) -> list[tuple[str, float, float]]:
        """One activation spec per direction, from one for all or a list of D."""
        if isinstance(value, list):
            if len(value) != D:
                raise ValueError(f"{what}: a list gives one activation per direction; expected {D}, "
                                 f"got {len(value)}")
            return [activations.spec(v, what) for v in value]
        return [activations.spec(value, what)] * D

    def _describe(self, key: str) -> Any:
        specs = [activations.describe(s) for s in self._specs[key]]
        return specs[0] if all(s == specs[0] for s in specs) else specs

    def _uses_options(self) -> bool:
        """Whether the general gate loop must run: an option the fused loops do not have is in use."""
        if self.clip is not None or self.input_forget or self._weights["peephole"] is not None:
            return True
        if self.num_gates == 4 and self._specs["cell_activation"] != self._specs["activation"]:
            return True
        for key in ("activation", "recurrent_activation"):
            specs = self._specs[key]
            if any(s != specs[0] for s in specs):
                return True
            # The fused loops know the codes below FIRST_GENERAL_CODE with their default parameters only.
            if isinstance(activations.describe(specs[0]), dict) \
                    or activations.CODES[specs[0][0]] >= activations.FIRST_GENERAL_CODE:
                return True
        return False

    def _kernel_options(self, dtype: np.dtype) -> list[dict] | None:
        """Per direction, the general gate loop's options (see RecurrentKernel), or None for the fused loops."""
        if not self.uses_options:
            return None
        peephole = self._weights["peephole"]
        out = []
        for d in range(self.num_directions):
            def coded(key: str) -> tuple[int, float, float]:
                name, alpha, beta = self._specs[key][d]
                return activations.CODES[name], alpha, beta

            out.append({
                "gate": coded("recurrent_activation"),
                "act": coded("activation"),
                "cell_act": coded("cell_activation"),
                "clip": self.clip or 0.0,
                "input_forget": self.input_forget,
                "peephole": None if peephole is None else np.ascontiguousarray(peephole[d], dtype),
            })
        return out

    @staticmethod
    def _directions(arr: np.ndarray, per_direction_ndim: int) -> np.ndarray:
        """Give a one-direction weight the leading direction axis."""
        return arr[None] if arr.ndim == per_direction_ndim else arr

    # -- what subclasses provide -------------------------------------------------------------
    def _cell_code(self) -> int:
        raise NotImplementedError

    def _kernel_biases(self, b_ih: np.ndarray, b_hh: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The kernel's (bias, bias_hn) for one direction from PyTorch's two biases."""
        return b_ih + b_hh, None

    # -- built once ---------------------------------------------------------------------------
    def _build_kernel(self, dtype: np.dtype) -> RecurrentKernel:
        w = {k: (None if v is None else v.astype(dtype, copy=False)) for k, v in self._weights.items()}
        quant = None
        if self.quantization is not None:
            quant = self.quantization.recurrent_directions(self)
            # The kernel reads only the shapes of float weights it does not multiply by.
            w.update({k: np.broadcast_to(np.zeros((), dtype), w[k].shape) for k in self.quantization.stored})
        D, GH = self.num_directions, self.num_gates * self.hidden_size
        zeros = np.zeros((D, GH), dtype)
        bias, bias_hn = [], []
        for d in range(D):
            b, bhn = self._kernel_biases(
                zeros[d] if w["bias_ih"] is None else w["bias_ih"][d],
                zeros[d] if w["bias_hh"] is None else w["bias_hh"][d],
            )
            bias.append(np.ascontiguousarray(b, dtype))
            bias_hn.append(None if bhn is None else np.ascontiguousarray(bhn, dtype))
        return RecurrentKernel(
            self._cell_code(),
            activations.CODES[self._specs["activation"][0][0]],
            activations.CODES[self._specs["recurrent_activation"][0][0]],
            list(w["weight_ih"]),
            list(w["weight_hh"]),
            [None] * D if w["weight_hr"] is None else list(w["weight_hr"]),
            bias,
            bias_hn,
            self.go_backwards,
            self._kernel_options(dtype),
            quant,
        )

    # -- describing ---------------------------------------------------------------------------
    @property
    def state_shapes(self) -> tuple[tuple[int, int], ...]:
        """(directions, width) of each state tensor: h, and c for LSTM."""
        return ((self.num_directions, self._state_out),)

    def config(self) -> dict:
        cfg = {
            "activation": self.activation,
            "recurrent_activation": self.recurrent_activation,
            "go_backwards": self.go_backwards,
            "return_sequences": self.return_sequences,
            "merge_mode": self.merge_mode,
            "zero_output_for_mask": self.zero_output_for_mask,
        }
        # The general-loop options only when set: configs of plain layers stay as they were.
        if self.num_gates == 4 and self.cell_activation != self.activation:
            cfg["cell_activation"] = self.cell_activation
        if self.clip is not None:
            cfg["clip"] = self.clip
        if self.input_forget:
            cfg["input_forget"] = True
        return cfg

    def weights(self) -> dict[str, np.ndarray]:
        w = dict(self._weights)
        if self._packed_only:
            H = self.hidden_size
            for key, index in (("weight_ih", 0), ("weight_hh", 1)):
                # Panels (P, K, G, 16) back to gate blocks (G*H, K), one direction after the other.
                mats = [p[index].transpose(2, 0, 3, 1).reshape(self.num_gates, -1, p[index].shape[1])[:, :H]
                        .reshape(self.num_gates * H, -1) for p in self._kernels[self.dtypes[0]].packed]
                w[key] = np.stack(mats)
        if self.quantization is not None:
            w.update(self.quantization.dequantized())
        return {k: v for k, v in w.items() if v is not None}

    def __repr__(self) -> str:
        extra = f", proj_size={self.proj_size}" if self.proj_size else ""
        return (f"{type(self).__name__}(input_size={self.input_size}, hidden_size={self.hidden_size}"
                f"{extra}, bidirectional={self.bidirectional})")

    # -- running ------------------------------------------------------------------------------
    def zero_state(self, batch: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
        """A zero initial state for a batch."""
        return tuple(np.zeros((d, batch, w), dtype) for d, w in self.state_shapes)

    def run(
        self,
        x: np.ndarray,
        state: tuple[np.ndarray, ...],
        mask: np.ndarray | None,
        zero_masked: bool,
        out: np.ndarray | None = None,
        work: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run every direction over valid x (B, T, I); state arrays are updated in place.

        Returns the raw outputs (B, T, D*P), each at its own timestep, before any Keras options.
        """
        kernel = self._kernels[x.dtype]
        B, T = x.shape[:2]
        if out is None:
            out = np.empty((B, T, self.num_directions * self._state_out), x.dtype)
        h = state[0]
        c = state[1] if len(state) > 1 else h
        if work is not None:
            kernel.run(x, out, h, c, mask, work, zero_masked)
            return out
        work = self.take_work(kernel, B, T)
        try:
            kernel.run(x, out, h, c, mask, work, zero_masked)
        finally:
            self.give_work(work)
        return out

    def take_work(self, kernel: Any, B: int, T: int) -> np.ndarray:
        """A work buffer for one run of kernel over (B, T): the layer's spare one when it fits (give it back)."""
        need = kernel.work_size(B, T)
        try:
            work = self._spare_work.pop()
        except IndexError:
            work = None
        if work is None or work.dtype != kernel.dtype or work.size < need:
            work = np.empty(need, kernel.dtype)
        return work

    def give_work(self, work: np.ndarray) -> None:
        """Keep a buffer from take_work for the next call, unless huge (a one-off giant batch should not pin it)."""
        if not self._spare_work and work.nbytes <= _SPARE_WORK_BYTES:
            self._spare_work.append(work)

    def forward_with_state(
        self, x: np.ndarray, mask: np.ndarray | None, state: tuple[np.ndarray, ...], zero_masked: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run and apply go_backwards, return_sequences and merge_mode; state is updated in place."""
        kmask = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
        return self.arrange(self.run(x, state, kmask, zero_masked), mask)

    def arrange(self, y: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Apply go_backwards, return_sequences and merge_mode to raw outputs y (B, T, D*P) of ``run``."""
        if self.go_backwards:
            # Keras returns a backwards layer's outputs in the order it produced them.
            y = y[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if not self.return_sequences:
            P = self._state_out
            # The last output of each direction in its own running order.
            y = y[:, -1] if self.num_directions == 1 else np.concatenate([y[:, -1, :P], y[:, 0, P:]], axis=-1)
            mask = None
        if self.num_directions == 2 and self.merge_mode != "concat":
            P = self._state_out
            fw, bw = y[..., :P], y[..., P:]
            y = fw + bw if self.merge_mode == "sum" else (fw + bw) / 2 if self.merge_mode == "ave" else fw * bw
        return np.ascontiguousarray(y), mask

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run from a zero state (as a stage of a Model without given state)."""
        state = self.zero_state(x.shape[0], x.dtype)
        return self.forward_with_state(x, mask, state, self.zero_output_for_mask)
