"""Sessions: stream a model step by step or chunk by chunk, with the recurrent state kept between calls.

    s = model.session(batch_size=1)
    y_t = s.step(x_t)          # (B, F) floats or (B,) token ids -> (B, out)
    y = s.feed(x)              # (B, T, F) floats or (B, T) token ids -> (B, T, out)

Feeding a sequence in chunks of any sizes, or step by step, gives what one ``model.forward`` over the
whole of it gives. A session owns its state and every work buffer, allocated once; the model's
weights are shared read-only by all its sessions.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
import weakref
import zlib
from contextlib import nullcontext
from typing import Any, Iterator

import numpy as np

from . import _kernels, activations
from ._base import SMALL_PRODUCT_FLOPS, OneBlasThread, as_real_array
from .layers import Dense, Dropout, Embedding
from .model import check_state

_EMBED, _RECURRENT, _DENSE, _OTHER = range(4)
_ndarray = np.ndarray

# Chunks longer than this many elements of the widest buffer run in slices, so that one huge feed()
# does not keep gigabytes of scratch alive for the session's lifetime.
_MAX_CHUNK_ELEMENTS = 1 << 22


def check_floats(arr: np.ndarray, where: str) -> None:
    """A state array must hold floats; it is copied into the session's own dtype."""
    if arr.dtype.kind != "f":
        raise TypeError(f"{where}: expected floats, got dtype {arr.dtype}")


def check_streamable(model: Any, what: str = "model.session()") -> None:
    """Raise ValueError naming the layer that needs a whole sequence before its first output."""
    layers = model.layers
    recurrent = [i for i, layer in enumerate(layers) if layer.is_recurrent]
    for i in recurrent:
        layer = layers[i]
        if layer.bidirectional:
            raise ValueError(f"{what}: layer {i} ({layer!r}) is bidirectional; its reverse direction reads the "
                             "sequence from its end, so the model cannot stream step by step (use model.forward)")
        if layer.go_backwards:
            raise ValueError(f"{what}: layer {i} ({layer!r}) runs backwards (go_backwards=True); it reads the "
                             "sequence from its end, so the model cannot stream step by step (use model.forward)")
        if not layer.return_sequences and i != recurrent[-1]:
            raise ValueError(f"{what}: layer {i} ({layer!r}) has return_sequences=False but feeds the recurrent "
                             "layers after it, which need every step; the model cannot stream step by step")


class _Chain:
    """A streamable model's layers bound to buffers for up to ``rows`` batch rows.

    ``run`` takes valid input for n <= rows rows and T steps and per-recurrent-layer states of
    (1, n, width) arrays, updates the states in place and writes the last layer's output into
    ``out``. Buffers grow to the longest chunk seen (bounded by feed's slicing) and are reused.
    """

    def __init__(self, model: Any, dtype: np.dtype, rows: int) -> None:
        self.dtype = dtype
        self.rows = rows
        self.stages: list[tuple] = []
        self.masked = False  # whether any layer can produce a mask (then masked steps need care)
        widths = []
        width = model.input_size
        for layer in model.layers:
            if isinstance(layer, Dropout):
                continue
            if layer.is_recurrent:
                kernel = layer._kernels[dtype]
                width = layer.output_size
                self.stages.append((_RECURRENT, kernel, layer.zero_output_for_mask))
            elif isinstance(layer, Embedding):
                self.masked |= layer.mask_zero
                width = layer.embedding_dim
                self.stages.append((_EMBED, layer._by_dtype[dtype]["weight"], layer.mask_zero, layer))
            elif isinstance(layer, Dense) and layer.quantization is None:  # a quantized head runs its forward
                w = layer._by_dtype[dtype]
                width = layer.output_size
                # weight.T is a view: BLAS reads the (out, in) weight transposed, nothing is copied.
                self.stages.append((_DENSE, w["weight"].T, w["bias"], layer.activation, w["weight"]))
            else:
                self.masked |= type(layer).__name__ == "Masking"
                width = layer.output_size or width
                self.stages.append((_OTHER, layer))
            widths.append(width)
        self.widths = widths
        self.output_size = widths[-1] if widths else width
        self.kernels = [st[1] for st in self.stages if st[0] == _RECURRENT]
        self._steps = 0
        self._views: dict[tuple[int, int], tuple] = {}
        self._grow(1)

    def max_steps(self) -> int:
        """The longest chunk run in one piece for this many rows."""
        widest = max([self.rows * w for w in self.widths]
                     + [k.work_size(self.rows, 1) for k in self.kernels] + [1])
        return max(1, _MAX_CHUNK_ELEMENTS // widest)

    def _grow(self, steps: int) -> None:
        n = self.rows * steps
        self._buffers = [np.empty(n * w, self.dtype) for w in self.widths]
        self._work = np.empty(max([k.work_size(self.rows, steps) for k in self.kernels] + [0]), self.dtype)
        self._mask = np.empty(n, np.bool_)
        self._steps = steps
        self._views.clear()

    def views(self, n: int, T: int) -> tuple:
        """Per-stage output buffers (n, T, width), the work buffer and the mask buffers for n rows, T steps."""
        key = (n, T)
        v = self._views.get(key)
        if v is None:
            if T > self._steps:
                self._grow(T)
            bufs = [b[: n * T * w].reshape(n, T, w) for b, w in zip(self._buffers, self.widths)]
            mask = self._mask[: n * T].reshape(n, T)
            v = (bufs, self._work, mask, mask.view(np.uint8))
            if len(self._views) > 256:
                self._views.clear()
            self._views[key] = v
        return v

    def run(self, x: np.ndarray, n: int, T: int, states: list, started: list | None, out: np.ndarray) -> None:
        """Run every layer over valid x: (n, T, F) floats or (n, T) ids; out gets (n, T, out) (any shape of that size)."""
        bufs, work, mask_bool, mask_u8 = self.views(n, T)
        stages = self.stages
        last = len(stages) - 1
        mask = None  # uint8 (n, T) for the kernels, or None when every step is valid
        k = 0
        for i, st in enumerate(stages):
            kind = st[0]
            dst = out if i == last else bufs[i]
            if kind == _RECURRENT:
                h, c = states[k]
                if started is None:
                    st[1].run(x, dst, h, c, mask, work, st[2])
                else:
                    self._run_masked(st, x, dst, h, c, mask, work, started[k], n, T)
                k += 1
            elif kind == _DENSE:
                y = dst.reshape(n * T, -1)
                if n * T == 1 and y.dtype == np.float32:
                    # One row: the engine's GEMV on this thread (a 2-thread BLAS call waits for a core).
                    _kernels.dense_row(st[4], x.reshape(-1), st[2], y.reshape(-1))
                else:
                    with OneBlasThread() if 2 * y.size * x.shape[-1] < SMALL_PRODUCT_FLOPS else nullcontext():
                        np.matmul(x.reshape(n * T, -1), st[1], out=y)
                    if st[2] is not None:
                        y += st[2]
                activations.apply(st[3], y)
            elif kind == _EMBED:
                if st[1] is None:  # quantized: widened row by row
                    dst.reshape(n, T, -1)[...] = st[3].embed(x, self.dtype)
                else:
                    np.take(st[1], x, axis=0, out=dst.reshape(n, T, -1))
                if st[2]:
                    np.not_equal(x, 0, out=mask_bool)
                    mask = mask_u8
            else:
                y, m = st[1].forward(x, None if mask is None else mask.view(np.bool_))
                if m is not None:
                    mask = np.ascontiguousarray(m, dtype=np.uint8)
                if i == last:
                    out.reshape(y.shape)[...] = y
                else:
                    dst = np.ascontiguousarray(y, dtype=self.dtype)
            x = dst

    @staticmethod
    def _run_masked(st: tuple, x: np.ndarray, dst: np.ndarray, h: np.ndarray, c: np.ndarray,
                    mask: np.ndarray | None, work: np.ndarray, started: np.ndarray, n: int, T: int) -> None:
        """Run a recurrent layer of a model with masks, carrying 'the previous output' across calls.

        Within one call the kernel repeats the previous output at a masked step (Keras), but at a
        chunk's first steps it writes zeros. The previous output is h (the state is carried through
        masked steps) once the row has had a valid step since its reset, so those leading steps are
        patched from h as it was before the call.
        """
        if mask is None:
            st[1].run(x, dst, h, c, None, work, st[2])
            started[:] = True
            return
        valid = mask.view(np.bool_)
        any_valid = valid.any(axis=1)
        fix = None
        if not st[2]:
            lead = np.where(any_valid, valid.argmax(axis=1), T)
            fix = np.flatnonzero((lead > 0) & started)
            saved = h[0, fix].copy() if fix.size else None
        st[1].run(x, dst, h, c, mask, work, st[2])
        if fix is not None and fix.size:
            y = dst.reshape(n, T, -1)
            for j, b in enumerate(fix):
                y[b, : lead[b]] = saved[j]
        started |= any_valid


# -- saved states ------------------------------------------------------------------------------

_STATE_MAGIC = b"LESTATE\0"
_STATE_VERSION = 1
_STATE_HEAD = struct.Struct("<8sII")  # magic, format version, header length
_CRC = struct.Struct("<I")

_weights_digests: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_digest_lock = threading.Lock()


def architecture_fingerprint(model: Any) -> str:
    """A hash of the layer classes, their configs and weight shapes: what a saved state's layout depends on."""
    desc = [{"class": type(layer).__name__, "config": layer.config(),
             "weights": {k: list(v.shape) for k, v in layer.weights().items()}} for layer in model.layers]
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def weights_digest(model: Any) -> str:
    """A hash of the weights' bytes, computed once per model (a state means nothing under other weights)."""
    with _digest_lock:
        digest = _weights_digests.get(model)
        if digest is None:
            h = hashlib.blake2b(digest_size=16)
            for layer in model.layers:
                for name, value in sorted(layer.weights().items()):
                    h.update(name.encode())
                    h.update(np.ascontiguousarray(value).tobytes())
            digest = _weights_digests[model] = h.hexdigest()
        return digest


def _state_error(msg: str) -> ValueError:
    return ValueError(f"load_state: {msg}")


# -- sessions ------------------------------------------------------------------------------------

class Session:
    """A model's recurrent state for ``batch_size`` streams plus every buffer, kept between calls.

    Made by ``model.session(batch_size=1)``. ``step(x_t)`` runs one timestep — (B, F) floats, or (B,)
    token ids when the model starts with an Embedding — and returns (B, out); ``feed(x)`` runs a chunk
    (B, T, F) / (B, T) and returns (B, T, out). ``state`` is the per-recurrent-layer list of (h, c) /
    (h,) arrays (1, B, width) that ``model.forward`` uses. One session serves one thread at a time;
    a second thread calling in meanwhile gets RuntimeError. Sessions of one model run in parallel.
    """

    def __init__(self, model: Any, batch_size: int = 1, *, dtype: Any = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        dt = model.dtype if dtype is None else np.dtype(dtype)
        if dt not in model.dtypes:
            kept = ", ".join(str(d) for d in model.dtypes)
            raise TypeError(f"dtype: this model keeps weights in {kept}, not {dt}; build it with dtype= including {dt}")
        check_streamable(model)
        B = int(batch_size)
        self.model = model
        self.batch_size = B
        self.dtype = dt
        self._chain = _Chain(model, dt, B)
        layers = model.recurrent_layers
        self._state = [layer.zero_state(B, dt) for layer in layers]
        # The kernels take (h, c); GRU and RNN have no c, so h stands in for it.
        self._run_state = [(s[0], s[-1]) for s in self._state]
        self._started = [np.zeros(B, np.bool_) for _ in layers] if self._chain.masked else None
        # The thread guard: one token in a list. list.pop and list.append are atomic under the GIL
        # (and locked in free-threaded builds), so popping it is a non-blocking test-and-set that
        # costs a tenth of a threading.Lock round trip (measured); a call that finds no token raises.
        self._token = [True]
        self._take_token, self._give_token = self._token.pop, self._token.append
        self.takes_ids = model.takes_ids
        self.input_size = model.input_size
        self.output_size = self._chain.output_size
        self._out_shape = (B, self.output_size)
        self._out_ok = None  # the last out= buffer that passed the checks
        self._max_steps = self._chain.max_steps()
        self._one_row = B == 1
        fast = self._fast_plan()
        self._fast_head = None if fast is None else fast[:-1]
        self._fast_last = None if fast is None else fast[-1][:5]

    def _fast_plan(self) -> tuple | None:
        """For a stack of recurrent layers and nothing else, what step() calls, bound once.

        Each entry is (kernel.run, h, c, work, zero_masked, output buffer (B, 1, width)); the last
        layer writes into step's own output instead. The buffers stay valid when feed() grows the
        chain's: the old ones are still large enough for one step.
        """
        chain = self._chain
        if chain.masked or any(st[0] != _RECURRENT for st in chain.stages):
            return None
        bufs, work, _, _ = chain.views(self.batch_size, 1)
        return tuple((st[1].run, h, c, work, st[2], buf)
                     for st, (h, c), buf in zip(chain.stages, self._run_state, bufs))

    def __repr__(self) -> str:
        return f"Session(batch_size={self.batch_size}, dtype={self.dtype}, layers={len(self.model.layers)})"

    def _busy(self) -> RuntimeError:
        return RuntimeError("Session is already running in another thread; a session serves one thread at a "
                            "time: give each thread its own session (model.session()) or use model.pool()")

    # -- checks (slow paths) ------------------------------------------------------------------
    def _check_ids(self, x: Any, ndim: int, name: str = "x") -> np.ndarray:
        ids = np.asarray(x)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{name}: token ids must be integers, got dtype {ids.dtype}")
        if ndim == 1 and ids.ndim == 0 and self.batch_size == 1:
            ids = ids.reshape(1)
        want = "(batch,)" if ndim == 1 else "(batch, steps)"
        if ids.ndim != ndim or ids.shape[0] != self.batch_size:
            raise ValueError(f"{name}: expected token ids of shape {want} with batch = {self.batch_size}, "
                             f"got shape {ids.shape}")
        self.model.layers[0].check_ids(ids, name)
        return np.ascontiguousarray(ids, dtype=np.intp)

    def _check_floats(self, x: Any, ndim: int, name: str = "x") -> np.ndarray:
        if not isinstance(x, np.ndarray):
            x = as_real_array(x, self.dtype, name)
        native = x.dtype.newbyteorder("=") if x.dtype.kind == "f" else x.dtype
        if native != self.dtype:
            raise TypeError(f"{name}: dtype {x.dtype}, but this session runs {self.dtype}; convert with "
                            f".astype(np.{self.dtype}) or open the session with dtype={x.dtype.name!r} if the model "
                            f"keeps it")
        F = self.input_size
        want = (self.batch_size, F) if ndim == 2 else (self.batch_size, "steps", F)
        if x.ndim != ndim or x.shape[0] != self.batch_size or (F is not None and x.shape[-1] != F):
            raise ValueError(f"{name}: expected shape {want}, got {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _check_out(self, out: Any, shape: tuple) -> np.ndarray:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out: expected a NumPy array, got {type(out).__name__}")
        if out.dtype != self.dtype:
            raise TypeError(f"out: dtype {out.dtype}, expected {self.dtype}")
        if out.shape != shape:
            raise ValueError(f"out: expected shape {shape}, got {out.shape}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out: must be a writeable C-contiguous array")
        return out

    # -- running ------------------------------------------------------------------------------
    def step(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Run one timestep: x (B, F) floats or (B,) token ids; returns (B, out), written to ``out`` if given."""
        try:
            self._take_token()
        except IndexError:
            raise self._busy() from None
        try:
            if out is None:
                out = np.empty(self._out_shape, self.dtype)
            elif out is not self._out_ok:
                if (type(out) is not _ndarray or out.dtype is not self.dtype or out.shape != self._out_shape
                        or not out.flags.c_contiguous or not out.flags.writeable):
                    self._check_out(out, self._out_shape)
                self._out_ok = out
            last = self._fast_last
            if last is not None and type(x) is _ndarray and x.dtype is self.dtype and x.ndim == 2:
                # The fast path: the first kernel checks x's shape, batch and layout itself before it
                # touches anything; if it refuses them, the full checks below say why (or convert).
                given = x3 = x[None] if self._one_row else x[:, None]
                try:
                    for run, h, c, work, zero_masked, buf in self._fast_head:
                        run(x3, buf, h, c, None, work, zero_masked)
                        x3 = buf
                    run, h, c, work, zero_masked = last
                    run(x3, out, h, c, None, work, zero_masked)
                    return out
                except ValueError:
                    if x3 is not given:
                        raise
            if self.takes_ids:
                x = self._check_ids(x, 1)
            else:
                x = self._check_floats(x, 2)
            x = x[None] if self._one_row else x[:, None]
            self._chain.run(x, self.batch_size, 1, self._run_state, self._started, out)
            return out
        finally:
            self._give_token(True)

    def feed(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Run a chunk: x (B, T, F) floats or (B, T) token ids; returns (B, T, out), written to ``out`` if given."""
        try:
            self._take_token()
        except IndexError:
            raise self._busy() from None
        try:
            x = self._check_ids(x, 2) if self.takes_ids else self._check_floats(x, 3)
            B, T = x.shape[:2]
            shape = (B, T, self.output_size)
            out = np.empty(shape, self.dtype) if out is None else self._check_out(out, shape)
            piece = self._max_steps
            if T <= piece:
                if T:
                    self._chain.run(x, B, T, self._run_state, self._started, out)
                return out
            buf = np.empty((B, piece, self.output_size), self.dtype)
            for t0 in range(0, T, piece):
                n = min(piece, T - t0)
                y = buf[:, :n] if n == piece else np.empty((B, n, self.output_size), self.dtype)
                self._chain.run(np.ascontiguousarray(x[:, t0:t0 + n]), B, n, self._run_state, self._started, y)
                out[:, t0:t0 + n] = y
            return out
        finally:
            self._give_token(True)

    # -- state ---------------------------------------------------------------------------------
    def _check_rows(self, rows: Any) -> Any:
        if rows is None:
            return slice(None)
        idx = np.asarray(rows)
        if idx.dtype == np.bool_:
            if idx.shape != (self.batch_size,):
                raise ValueError(f"rows: a boolean mask must have shape ({self.batch_size},), got {idx.shape}")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise TypeError(f"rows: expected a row index or a sequence of them, got {rows!r}")
        idx = idx.reshape(-1)
        bad = idx[(idx < 0) | (idx >= self.batch_size)]
        if bad.size:
            raise ValueError(f"rows: row {bad[0]} is out of range [0, {self.batch_size})")
        return idx

    def reset(self, rows: Any = None) -> None:
        """Zero the state of every row, or of the given rows (an index, indices or a boolean mask)."""
        idx = self._check_rows(rows)
        with self._guard():
            for entry in self._state:
                for arr in entry:
                    arr[:, idx] = 0
            if self._started is not None:
                for s in self._started:
                    s[idx] = False

    def _guard(self) -> Any:
        try:
            self._take_token()
        except IndexError:
            raise self._busy() from None
        return _Release(self._give_token)

    @property
    def state(self) -> list[tuple[np.ndarray, ...]]:
        """A copy of the state: per recurrent layer (h, c) or (h,), each (1, B, width), as ``model.forward`` returns it."""
        with self._guard():
            return [tuple(a.copy() for a in entry) for entry in self._state]

    @state.setter
    def state(self, value: Any) -> None:
        if value is None:
            self.reset()
            return
        given = check_state(value, self.model.recurrent_layers, self.batch_size, "state", check_floats)
        new = [arr for entry in given for arr in entry]
        with self._guard():
            targets = [a for entry in self._state for a in entry]
            for dst, src in zip(targets, new):
                np.copyto(dst, src, casting="same_kind")
            if self._started is not None:
                # As model.forward(initial_state=...): nothing has been output yet.
                for s in self._started:
                    s[:] = False

    def _arrays(self) -> list[tuple[str, np.ndarray]]:
        named = []
        for k, (layer, entry) in enumerate(zip(self.model.recurrent_layers, self._state)):
            for name, arr in zip(("h", "c"), entry):
                named.append((f"{k}.{name}", arr))
            if self._started is not None:
                named.append((f"{k}.started", self._started[k]))
        return named

    def save_state(self) -> bytes:
        """The state as bytes (versioned, checksummed, tied to this model, dtype and batch size)."""
        with self._guard():
            arrays = self._arrays()
            header = json.dumps({
                "model": architecture_fingerprint(self.model),
                "weights": weights_digest(self.model),
                "dtype": str(self.dtype),
                "batch_size": self.batch_size,
                "arrays": [[name, list(arr.shape), str(arr.dtype)] for name, arr in arrays],
            }, separators=(",", ":")).encode()
            parts = [_STATE_HEAD.pack(_STATE_MAGIC, _STATE_VERSION, len(header)), header]
            parts += [arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes() for _, arr in arrays]
        blob = b"".join(parts)
        return blob + _CRC.pack(zlib.crc32(blob))

    def load_state(self, blob: Any) -> None:
        """Restore a state written by ``save_state`` of a session of the same model, dtype and batch size."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"load_state: expected bytes from save_state(), got {type(blob).__name__}")
        blob = bytes(blob)
        head = _STATE_HEAD.size
        if len(blob) < head + _CRC.size or blob[:8] != _STATE_MAGIC:
            raise _state_error("not a saved session state (no lstm_engine state header)")
        _, version, hlen = _STATE_HEAD.unpack_from(blob)
        if version != _STATE_VERSION:
            raise _state_error(f"state format version {version} is not supported (this lstm_engine reads "
                               f"version {_STATE_VERSION})")
        if zlib.crc32(blob[:-_CRC.size]) != _CRC.unpack_from(blob, len(blob) - _CRC.size)[0]:
            raise _state_error("the state is truncated or corrupted (checksum mismatch)")
        try:
            header = json.loads(blob[head:head + hlen].decode())
            fingerprint, digest = header["model"], header["weights"]
            dtype, batch, listed = header["dtype"], header["batch_size"], header["arrays"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise _state_error("the state header is corrupted") from exc
        if fingerprint != architecture_fingerprint(self.model):
            raise _state_error("the state was saved from a different model (its layers or sizes differ)")
        if digest != weights_digest(self.model):
            raise _state_error("the state was saved from a model with the same layers but different weights")
        if dtype != str(self.dtype):
            raise _state_error(f"the state is {dtype} but this session runs {self.dtype}")
        if batch != self.batch_size:
            raise _state_error(f"the state has batch size {batch} but this session has {self.batch_size}")
        with self._guard():
            arrays = self._arrays()
            expected = [[name, list(arr.shape), str(arr.dtype)] for name, arr in arrays]
            if listed != expected:
                raise _state_error("the state's arrays do not match this session's layout")
            offset = head + hlen
            size = sum(arr.nbytes for _, arr in arrays)
            if len(blob) - _CRC.size - offset != size:
                raise _state_error(f"the state holds {len(blob) - _CRC.size - offset} bytes of arrays, "
                                   f"expected {size}")
            loaded = []
            for _, arr in arrays:
                src = np.frombuffer(blob, arr.dtype.newbyteorder("<"), arr.size, offset).reshape(arr.shape)
                loaded.append(src)
                offset += arr.nbytes
            for (_, arr), src in zip(arrays, loaded):
                np.copyto(arr, src)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt_ids: Any, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: Any = None) -> Iterator:
        """Sample tokens after a prompt, yielding each id as it is produced.

        For a model from token ids to logits (Embedding -> recurrent layers -> Dense). The prompt
        (T,) ids (or (B, T) with batch_size B, then each item is a (B,) array) is fed from the current
        state. ``temperature=0`` is greedy; ``top_k`` keeps the k likeliest tokens, ``top_p`` the
        smallest set whose probability reaches p; ``seed`` makes the samples reproducible. Each
        yielded token has been fed to the session by the time it is yielded.
        """
        from .generate import generate_tokens

        return generate_tokens(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed)


class _Release:
    """Gives a session's thread token back when its with-block ends."""

    __slots__ = ("_give",)

    def __init__(self, give: Any) -> None:
        self._give = give

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self._give(True)
