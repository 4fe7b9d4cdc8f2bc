"""Model: a chain of layers run as one, with input checks and the recurrent state in and out."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import _kernels
from ._base import Layer, as_real_array

if TYPE_CHECKING:  # imported by the methods that make them
    from .pool import StreamPool
    from .session import Session

State = list  # one tuple per recurrent layer: (h, c) for LSTM, (h,) for GRU and RNN


def check_state(value: Any, layers: list, batch: int, what: str, check_dtype: Callable[[np.ndarray, str], None],
                allow_missing: bool = False) -> list[tuple[np.ndarray, ...] | None]:
    """Check a state given by a caller: one (h, c) or (h,) per recurrent layer, each (directions, batch, width).

    Returns the arrays (as given, not copied) per layer; an entry given as None stays None when
    ``allow_missing``. ``check_dtype(array, where)`` raises TypeError for a dtype the caller refuses.
    Shared by Model.forward(initial_state=), Session.state and the pool's Stream.state.
    """
    if not isinstance(value, (list, tuple)) or len(value) != len(layers):
        raise ValueError(f"{what}: expected a list of {len(layers)} entries, one per recurrent layer")
    out: list[tuple[np.ndarray, ...] | None] = []
    for k, (layer, given) in enumerate(zip(layers, value)):
        if given is None and allow_missing:
            out.append(None)
            continue
        if isinstance(given, np.ndarray):
            given = (given,)
        names = ("h", "c")[: len(layer.state_shapes)]
        if not isinstance(given, (list, tuple)) or len(given) != len(names):
            raise ValueError(f"{what}[{k}]: expected a tuple ({', '.join(names)}) for {layer!r}")
        entry = []
        for name, arr, (D, W) in zip(names, given, layer.state_shapes):
            arr = np.asarray(arr)
            check_dtype(arr, f"{what}[{k}] {name}")
            if arr.shape != (D, batch, W):
                raise ValueError(f"{what}[{k}] {name}: expected shape {(D, batch, W)} "
                                 f"(directions, batch, width), got {arr.shape}")
            entry.append(arr)
        out.append(tuple(entry))
    return out


class Model:
    """A chain of layers: an optional Embedding, recurrent layers, and heads.

    ``forward(x, lengths=None, initial_state=None)`` takes batch-major input — (B, T, F) floats, or
    (B, T) token ids when the first layer is an Embedding — and returns ``(y, state)``: y (B, T, out)
    (or (B, out) after a layer with return_sequences=False) and one state tuple per recurrent layer,
    each array (directions, B, width).
    """

    def __init__(self, layers: Sequence[Layer], *, metadata: dict | None = None,
                 threads: int | None = None) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("Model: expected at least one layer")
        size = None
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Model: layer {i} is a {type(layer).__name__}, not an lstm_engine layer")
            if getattr(layer, "accepts_ids", False) and i:
                raise ValueError(f"Model: layer {i} ({layer!r}) takes token ids, so it must come first")
            if layer.input_size is not None and size is not None and layer.input_size != size:
                raise ValueError(f"Model: layer {i} ({layer!r}) expects {layer.input_size} features, "
                                 f"but the layer before it gives {size}")
            size = layer.output_size if layer.output_size is not None else size
        dtypes = [dt for dt in layers[0].dtypes if all(dt in layer.dtypes for layer in layers)]
        if not dtypes:
            raise ValueError("Model: the layers keep weights in no common dtype; build them with the same dtype=")
        self.layers = layers
        self.dtypes = tuple(dtypes)
        self.metadata = dict(metadata or {})
        self.takes_ids = bool(getattr(layers[0], "accepts_ids", False))
        # Width-preserving layers (Masking, Dropout...) have no size: the first layer that has one decides.
        self.input_size = None if self.takes_ids else next(
            (layer.input_size for layer in layers if layer.input_size is not None), None)
        self.output_size = size
        self.threads = threads

    @property
    def threads(self) -> int:
        """Threads one call may use, the engine's own and BLAS's (default: every core of the process).

        Sessions of the model use it too. Two calls running at once in different Python threads
        each get one core when the engine's workers are busy with the other.
        """
        return self._threads

    @threads.setter
    def threads(self, threads: int | None) -> None:
        if threads is None:
            threads = _kernels.cpu_count()
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
            raise TypeError(f"threads: expected an int or None, got {type(threads).__name__}")
        if threads < 1:
            raise ValueError(f"threads: expected at least 1, got {threads}")
        self._threads = int(threads)
        for layer in self.recurrent_layers:
            for kernel in layer._kernels.values():
                kernel.threads = self._threads
        for layer in self.layers:
            if getattr(layer, "_packed", None) is not None:  # a quantized Dense head
                layer.threads = self._threads

    @property
    def dtype(self) -> np.dtype:
        """The dtype inputs are cast to with ``cast=True`` (the first one the model keeps)."""
        return self.dtypes[0]

    @property
    def recurrent_layers(self) -> list:
        return [layer for layer in self.layers if layer.is_recurrent]

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Model([\n{inner}\n])"

    # -- input checks -------------------------------------------------------------------------
    def _check_x(self, x: Any, cast: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The input as a C-contiguous array of a dtype this model runs, and token ids if any."""
        if self.takes_ids:
            ids = np.asarray(x)
            if ids.ndim != 2:
                raise ValueError(f"x: expected token ids of shape (batch, steps), got shape {ids.shape}")
            self.layers[0].check_ids(ids)
            return ids, ids
        if not isinstance(x, np.ndarray):
            x = as_real_array(x, self.dtype)
        native = x.dtype.newbyteorder("=") if x.dtype.kind == "f" else x.dtype
        if native not in self.dtypes:
            if not (cast and x.dtype.kind in "fiu" and x.dtype.kind != "b"):
                kept = " or ".join(str(d) for d in self.dtypes)
                if cast:
                    raise TypeError(f"x: dtype {x.dtype} cannot be cast to {self.dtype}; expected real numbers "
                                    "(floats or integers)")
                raise TypeError(f"x: dtype {x.dtype}, but this model runs {kept}; pass cast=True to convert, "
                                f"or build the model with dtype=(np.float32, np.float64)")
            native = self.dtype
        if x.ndim != 3 or (self.input_size is not None and x.shape[2] != self.input_size):
            raise ValueError(f"x: expected shape (batch, steps, {self.input_size or 'features'}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=native), None

    @staticmethod
    def _check_lengths(lengths: Any, B: int, T: int) -> np.ndarray:
        """Packed-sequence lengths as a validity mask (B, T)."""
        lengths = np.asarray(lengths)
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths: expected shape ({B},), one length per batch row, got {lengths.shape}")
        bad = np.flatnonzero((lengths < 1) | (lengths > T))
        if bad.size:
            raise ValueError(f"lengths: every length must be in 1..{T} (the number of steps); "
                             f"row {bad[0]} has {lengths[bad[0]]}")
        return np.arange(T) < lengths[:, None]

    def _check_state(self, initial_state: Any, B: int, dtype: np.dtype, cast: bool) -> list[tuple]:
        """Copies of the initial state (zeros where not given), which the kernels update in place."""
        layers = self.recurrent_layers
        if initial_state is None:
            return [layer.zero_state(B, dtype) for layer in layers]

        def check_dtype(arr: np.ndarray, where: str) -> None:
            if arr.dtype.newbyteorder("=") != dtype and not (cast and arr.dtype.kind in "fiu"):
                raise TypeError(f"{where}: dtype {arr.dtype}, expected {dtype} like x")

        given = check_state(initial_state, layers, B, "initial_state", check_dtype, allow_missing=True)
        return [layer.zero_state(B, dtype) if entry is None
                else tuple(np.array(arr, dtype=dtype, order="C") for arr in entry)
                for layer, entry in zip(layers, given)]

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: Any, lengths: Any = None, initial_state: Any = None, *,
                cast: bool = False, record: bool = False) -> tuple:
        """Run the whole model over x; see the class docstring for shapes.

        ``lengths`` (B,) gives packed-sequence semantics: row b runs on its first lengths[b] steps,
        its outputs after them are 0 and its final state is taken at its last valid step.
        ``cast=True`` converts an input of another dtype to ``self.dtype`` instead of raising TypeError.
        ``record=True`` returns ``(y, state, gates)``: gates has one dict per recurrent layer,
        name -> (D, B, T, width) activations (i, f, g, o, c, h for LSTM; r, z, n, h for GRU; h for RNN),
        from a step-by-step NumPy run of the same equations (slow; see lstm_engine.gates).
        """
        x, mask, packed, layers, states = self._prepare(x, lengths, initial_state, cast)
        if record:
            from .gates import forward_recorded

            return forward_recorded(self, x, mask, packed, layers, states)[:3]
        # The recurrent kernels hold BLAS to self.threads themselves; Dense heads run in NumPy's BLAS.
        blas = _kernels.blas_threads()
        limit = blas > self._threads
        if limit:
            _kernels.set_blas_threads(self._threads)
        try:
            k = 0
            for layer in layers:
                if layer.is_recurrent:
                    x, mask = layer.forward_with_state(x, mask, states[k], packed or layer.zero_output_for_mask)
                    k += 1
                else:
                    x, mask = layer.forward(x, mask)
        finally:
            if limit:
                _kernels.set_blas_threads(blas)
        return x, states

    def _prepare(self, x: Any, lengths: Any, initial_state: Any, cast: bool) -> tuple:
        """Checked inputs for the layers: (x or embedded ids, mask, packed, layers to run, states)."""
        x, ids = self._check_x(x, cast)
        B, T = x.shape[:2]
        if T == 0:
            raise ValueError(f"x: expected at least one step, got shape {x.shape}")
        mask = None if lengths is None else self._check_lengths(lengths, B, T)
        packed = mask is not None
        layers = self.layers
        if ids is not None:
            emb = layers[0]
            x = emb.embed(ids, self.dtype)
            if emb.mask_zero:
                mask = ids != 0 if mask is None else mask & (ids != 0)
            layers = layers[1:]
        states = self._check_state(initial_state, B, x.dtype, cast)
        return x, mask, packed, layers, states

    __call__ = forward

    # -- streaming ----------------------------------------------------------------------------
    def session(self, batch_size: int = 1, *, dtype: Any = None) -> "Session":
        """A stateful Session for streaming ``batch_size`` sequences step by step (see lstm_engine.session)."""
        from .session import Session

        return Session(self, batch_size, dtype=dtype)

    def pool(self, max_batch: int = 64, *, max_delay: float = 0.001, dtype: Any = None) -> "StreamPool":
        """A StreamPool: many independent streams whose concurrent steps run as one batch (see lstm_engine.pool)."""
        from .pool import StreamPool

        return StreamPool(self, max_batch, max_delay=max_delay, dtype=dtype)
