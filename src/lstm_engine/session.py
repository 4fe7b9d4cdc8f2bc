"""Sessions: stream a model step by step or chunk by chunk, with the recurrent state kept between calls.

    s = model.session(batch_size=1)
    y_t = s.step(x_t)          # (B, F) floats or (B,) token ids -> (B, out)
    y = s.feed(x)              # (B, T, F) floats or (B, T) token ids -> (B, T, out)

Feeding a sequence in chunks of any sizes, or step by step, gives what one ``model.forward`` over the
whole of it gives. A session owns its state and every work buffer, allocated once; the model's
weights are shared read-only by all its sessions.
"""
from __future__ import annotations

import json
import struct
import threading
import weakref
import zlib
from typing import Any, Iterator

import numpy as np

from ._base import as_real_array
from .graph import build_structure
from .plan import chain_step, check_state
from .stream import Streamer, check_floats


# -- saved states ------------------------------------------------------------------------------

_STATE_MAGIC = b"LESTATE\0"
_STATE_VERSION = 1
_STATE_HEAD = struct.Struct("<8sII")  # magic, format version, header length
_CRC = struct.Struct("<I")

_weights_digests: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_fingerprints: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_state_headers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_digest_lock = threading.Lock()


def architecture_fingerprint(model: Any) -> str:
    """A hash of the layer classes, their configs and weight shapes, and of a graph's nodes and constants'
    shapes: what a saved state's layout and meaning depend on. Computed once per model (the server
    writes a state after every request)."""
    with _digest_lock:
        fingerprint = _fingerprints.get(model)
    if fingerprint is None:
        fingerprint = _fingerprint(model)
        with _digest_lock:
            _fingerprints[model] = fingerprint
    return fingerprint


def _fingerprint(model: Any) -> str:
    desc: Any = [{"class": type(layer).__name__, "config": layer.config(),
                  "weights": {k: list(v.shape) for k, v in layer.weights().items()}} for layer in model.layers]
    if not model.is_chain:
        from .formats.native import describe

        tensors: dict = {}
        desc = {"layers": desc, "graph": describe(model.graph, list(model.layers), tensors),
                "constants": {k: [str(v.dtype), list(v.shape)] for k, v in tensors.items()}}
    import hashlib  # here, not at import: it loads OpenSSL's libcrypto, 3.6 MB resident in every process

    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def weights_digest(model: Any) -> str:
    """A hash of the weights' (and a graph's constants') bytes, computed once per model (a state means
    nothing under other weights)."""
    with _digest_lock:
        digest = _weights_digests.get(model)
        if digest is None:
            import hashlib  # as in _fingerprint: only a saved or restored state needs it

            h = hashlib.blake2b(digest_size=16)
            for layer in model.layers:
                for name, value in sorted(layer.weights().items()):
                    h.update(name.encode())
                    h.update(np.ascontiguousarray(value).tobytes())
            if not model.is_chain:
                from .formats.native import describe

                tensors: dict = {}
                describe(model.graph, list(model.layers), tensors)
                for name, value in tensors.items():
                    h.update(name.encode())
                    h.update(np.ascontiguousarray(value).tobytes())
            digest = _weights_digests[model] = h.hexdigest()
        return digest


def _state_error(msg: str) -> ValueError:
    return ValueError(f"load_state: {msg}")


def encode_state(model: Any, dtype: np.dtype, batch_size: int, arrays: list) -> bytes:
    """The named state arrays [(name, array)] of batch_size streams as versioned, checksummed bytes.

    The format of ``Session.save_state``; a pool stream writes the same bytes as a batch-1 session.
    """
    # The header is the same for every save of a layout, and building it (str of a dtype alone is ~20 us)
    # cost more than the arrays: the server saves a stream's state after each of its requests.
    key = (np.dtype(dtype), batch_size, tuple((name, arr.shape, arr.dtype) for name, arr in arrays))
    with _digest_lock:
        headers = _state_headers.setdefault(model, {})
        header = headers.get(key)
    if header is None:
        header = json.dumps({
            "model": architecture_fingerprint(model),
            "weights": weights_digest(model),
            "dtype": str(dtype),
            "batch_size": batch_size,
            "arrays": [[name, list(arr.shape), str(arr.dtype)] for name, arr in arrays],
        }, separators=(",", ":")).encode()
        with _digest_lock:
            headers[key] = header
    parts = [_STATE_HEAD.pack(_STATE_MAGIC, _STATE_VERSION, len(header)), header]
    parts += [arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes() for _, arr in arrays]
    blob = b"".join(parts)
    return blob + _CRC.pack(zlib.crc32(blob))


def decode_state(model: Any, dtype: np.dtype, batch_size: int, arrays: list, blob: Any,
                 holder: str = "session") -> None:
    """Check bytes from ``encode_state`` against the model, dtype, batch size and the named arrays' layout,
    then copy them into those arrays (all or, on any ValueError/TypeError, none). ``holder`` names what loads
    them in the messages ("session", "pool stream")."""
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
        saved_dtype, batch, listed = header["dtype"], header["batch_size"], header["arrays"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _state_error("the state header is corrupted") from exc
    if fingerprint != architecture_fingerprint(model):
        raise _state_error("the state was saved from a different model (its layers or sizes differ)")
    if digest != weights_digest(model):
        raise _state_error("the state was saved from a model with the same layers but different weights")
    if saved_dtype != str(dtype):
        raise _state_error(f"the state is {saved_dtype} but this {holder} runs {dtype}")
    if batch != batch_size:
        raise _state_error(f"the state has batch size {batch} but this {holder} has {batch_size}")
    expected = [[name, list(arr.shape), str(arr.dtype)] for name, arr in arrays]
    if listed != expected:
        raise _state_error(f"the state's arrays do not match this {holder}'s layout")
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


# -- sessions ------------------------------------------------------------------------------------

class Session:
    """A model's recurrent state for ``batch_size`` streams plus every buffer, kept between calls.

    Made by ``model.session(batch_size=1)``. ``step(x_t)`` runs one timestep — (B, F) floats, or (B,)
    token ids when the model starts with an Embedding — and returns (B, out); ``feed(x)`` runs a chunk
    (B, T, F) / (B, T) and returns (B, T, out). A graph model streams its inputs along their "steps"
    axis: step takes them without it (a tuple for several), feed with it, and the outputs come in the
    graph's structure (values without a time axis, such as a final state, as they are after the call).
    ``state`` is the per-recurrent-layer list of (h, c) / (h,) arrays (1, B, width) that
    ``model.forward`` uses. One session serves one thread at a time; a second thread calling in
    meanwhile gets RuntimeError. Sessions of one model run in parallel.
    """

    def __init__(self, model: Any, batch_size: int = 1, *, dtype: Any = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        dt = model.dtype if dtype is None else np.dtype(dtype)
        if dt not in model.dtypes:
            kept = ", ".join(str(d) for d in model.dtypes)
            raise TypeError(f"dtype: this model keeps weights in {kept}, not {dt}; build it with dtype= including {dt}")
        B = int(batch_size)
        self._streamer = Streamer(model, dt, B)
        self.model = model
        self.batch_size = B
        self.dtype = dt
        layers = model.recurrent_layers
        self._state = [layer.zero_state(B, dt) for layer in layers]
        self._started = [np.zeros(B, np.bool_) for _ in layers] if self._streamer.masked else None
        # The thread guard: one token in a list. list.pop and list.append are atomic under the GIL
        # (and locked in free-threaded builds), so popping it is a non-blocking test-and-set that
        # costs a tenth of a threading.Lock round trip (measured); a call that finds no token raises.
        self._token = [True]
        self._take_token, self._give_token = self._token.pop, self._token.append
        self.takes_ids = model.takes_ids
        self.input_size = model.input_size
        # A chain's output is (B, T, output_size): step and feed write it into one array, made or given.
        self._chain = model.is_chain
        self.output_size = model.output_size if self._chain else None
        self._out_shape = (B, self.output_size)
        self._out_steps = (None, None)  # the last step output and its (B, 1, out) view, which the plan writes
        self._max_steps = self._streamer.max_steps
        self._one_row = B == 1
        # A chain [Embedding ->] recurrent layers [-> Dense heads] steps in one call into C (plan.chain_step).
        self._chain_step = chain_step(self._streamer.plan, self._state, B) if self._chain else None

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

    def _check_floats(self, x: Any, ndim: int, name: str = "x", check_shape: bool = True) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            x = as_real_array(x, self.dtype, name)
        native = x.dtype.newbyteorder("=") if x.dtype.kind == "f" else x.dtype
        if native != self.dtype:
            raise TypeError(f"{name}: dtype {x.dtype}, but this session runs {self.dtype}; convert with "
                            f".astype(np.{self.dtype}) or open the session with dtype={x.dtype.name!r} if the model "
                            f"keeps it")
        if not check_shape:
            return x
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
    def step(self, x: Any, out: np.ndarray | None = None) -> Any:
        """Run one timestep: x (B, F) floats or (B,) token ids; returns (B, out), written to ``out`` if given."""
        try:
            self._take_token()
        except IndexError:
            raise self._busy() from None
        try:
            chain = self._chain_step
            if chain is not None:
                # It takes x and out only as they are valid ((B,) intp ids in range, or (B, F) of the
                # session's dtype; out None, or (B, out) of it, writeable and C-contiguous); anything else
                # is checked, converted or refused below.
                y = chain.step(x, out)
                if y is not None:
                    return y
            elif not self._chain:
                return self._run_graph(x, out, True)
            if out is None:
                out = np.empty(self._out_shape, self.dtype)
            else:
                self._check_out(out, self._out_shape)
            if self.takes_ids:
                x = self._check_ids(x, 1)
            else:
                x = self._check_floats(x, 2)
            x = x[None] if self._one_row else x[:, None]
            known, out3 = self._out_steps
            if known is not out:
                out3 = out[:, None]
                self._out_steps = (out, out3)
            self._run_chain(x, out3)
            return out
        finally:
            self._give_token(True)

    def _run_chain(self, x: np.ndarray, out: np.ndarray) -> None:
        """Run valid input (B, T, F) / (B, T) through the plan; out (B, T, out) gets the output."""
        y = self._streamer.run([x, None], self._state, self._started, out)[0]
        if y is not out:
            np.copyto(out, y.reshape(out.shape))

    def feed(self, x: Any, out: np.ndarray | None = None) -> Any:
        """Run a chunk: x (B, T, F) floats or (B, T) token ids; returns (B, T, out), written to ``out`` if given."""
        try:
            self._take_token()
        except IndexError:
            raise self._busy() from None
        try:
            if not self._chain:
                return self._run_graph(x, out, False)
            x = self._check_ids(x, 2) if self.takes_ids else self._check_floats(x, 3)
            B, T = x.shape[:2]
            shape = (B, T, self.output_size)
            out = np.empty(shape, self.dtype) if out is None else self._check_out(out, shape)
            piece = self._max_steps
            if T <= piece:
                if T:
                    self._run_chain(x, out)
                return out
            buf = np.empty((B, piece, self.output_size), self.dtype)
            for t0 in range(0, T, piece):
                n = min(piece, T - t0)
                y = buf[:, :n] if n == piece else np.empty((B, n, self.output_size), self.dtype)
                self._run_chain(np.ascontiguousarray(x[:, t0:t0 + n]), y)
                out[:, t0:t0 + n] = y
            return out
        finally:
            self._give_token(True)

    def _graph_inputs(self, x: Any, step: bool) -> tuple[list, int]:
        """A graph's inputs for the plan (the time axis in place) and the number of steps they hold."""
        graph = self.model.graph
        fed = self._streamer.inputs
        given = list(x) if isinstance(x, tuple) and len(fed) != 1 else [x]
        if len(given) != len(fed):
            raise ValueError(f"x: this model takes {len(fed)} inputs "
                             f"({', '.join(graph.inputs[i].name for i, _ in fed)}), got {len(given)}")
        inputs: list = [None] * len(graph.inputs)
        T = None
        for (i, axis), value in zip(fed, given):
            info = graph.inputs[i]
            name = info.name
            if info.dtype == "float":
                value = self._check_floats(value, len(info.shape) - step, name, check_shape=False)
            else:
                value = np.asarray(value)
                if (info.dtype == "bool") != (value.dtype == np.bool_) or value.dtype.kind not in "iub":
                    raise TypeError(f"{name}: expected {info.dtype}, got dtype {value.dtype}")
            want = [self.batch_size if d == "batch" else d for d in info.shape]
            shown = tuple(d for j, d in enumerate(want) if not (step and j == axis))
            if value.ndim != len(shown):
                raise ValueError(f"{name}: expected shape {shown}, got {value.shape}")
            if step:
                value = np.expand_dims(value, axis)
            if any(isinstance(d, int) and d != n for d, n in zip(want, value.shape)):
                raise ValueError(f"{name}: expected shape {shown}, got {np.shape(given[fed.index((i, axis))])}")
            if T is not None and value.shape[axis] != T:
                raise ValueError(f"{name}: {value.shape[axis]} steps, but the other inputs have {T}")
            T = value.shape[axis]
            inputs[i] = np.ascontiguousarray(value)
        return inputs, T

    def _run_graph(self, x: Any, out: np.ndarray | None, step: bool) -> Any:
        """step/feed for a graph model: chunks through the plan, outputs in the graph's structure."""
        inputs, T = self._graph_inputs(x, step)
        axes = self._streamer.output_axes
        pieces: list[list] = [[] for _ in axes]
        piece = self._max_steps
        for t0 in range(0, T, piece):
            n = min(piece, T - t0)
            chunk = list(inputs)
            if n != T:
                for i, axis in self._streamer.inputs:
                    chunk[i] = np.ascontiguousarray(_steps(inputs[i], axis, t0, n))
            results = self._streamer.run(chunk, self._state, self._started, None)
            for j, (res, axis) in enumerate(zip(results, axes)):
                if isinstance(axis, int) and res.shape[axis] != n:
                    raise ValueError(f"model.session(): output {self.model.graph.outputs[j]!r} has "
                                     f"{res.shape[axis]} steps for {n} steps in; the graph does not keep one "
                                     "output per step, so it cannot stream")
                # Copies: buffers and states are the session's own, and change with the next call.
                pieces[j] = pieces[j] + [np.array(res)] if isinstance(axis, int) else [np.array(res)]
        outs = []
        for parts, axis in zip(pieces, axes):
            y = np.concatenate(parts, axis=axis) if isinstance(axis, int) and len(parts) > 1 else parts[-1]
            outs.append(np.take(y, 0, axis=axis) if step and isinstance(axis, int) else y)
        y = build_structure(self.model.graph.output_structure, outs)
        if out is None:
            return y
        if not isinstance(y, np.ndarray):
            raise ValueError("out: this model returns several outputs; call without out=")
        np.copyto(self._check_out(out, y.shape), y)
        return out

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
            return encode_state(self.model, self.dtype, self.batch_size, self._arrays())

    def load_state(self, blob: Any) -> None:
        """Restore a state written by ``save_state`` of a session of the same model, dtype and batch size."""
        with self._guard():
            decode_state(self.model, self.dtype, self.batch_size, self._arrays(), blob)

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


def _steps(x: np.ndarray, axis: int, start: int, n: int) -> np.ndarray:
    """Steps start..start+n of x along its time axis."""
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, start + n)
    return x[tuple(index)]


class _Release:
    """Gives a session's thread token back when its with-block ends."""

    __slots__ = ("_give",)

    def __init__(self, give: Any) -> None:
        self._give = give

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self._give(True)
