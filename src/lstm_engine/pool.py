"""Many independent streams, one batch: concurrent steps of a model's streams run as one kernel call.

    with model.pool(max_batch=64) as pool:
        stream = pool.open()              # from any thread or asyncio task
        y = stream.step(x_t)              # (F,) floats or one token id -> (out,)
        y = await stream.astep(x_t)       # the same from asyncio
        stream.close()                    # frees its state slot

A worker thread takes every step waiting at that moment (up to ``max_batch``), gathers those
streams' states into one batch, runs the layers once and scatters the states back. Each stream
keeps its own state slot, whoever it was batched with.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np

from . import _kernels
from ._base import as_real_array
from .plan import chain_step, check_state
from .session import decode_state, encode_state
from .stream import Streamer, check_floats


class _Core:
    """The pool's shared part, which the worker thread holds (the StreamPool facade may be dropped)."""

    def __init__(self, model: Any, max_batch: int, dtype: np.dtype, max_delay: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.dtype = dtype
        self.streamer = streamer = Streamer(model, dtype, max_batch, "model.pool()")
        self.takes_ids = model.takes_ids
        self.output_size = model.output_size
        self.vocab = streamer.vocab()
        if len(streamer.inputs) != 1 or streamer.inputs[0][1] != 1 or streamer.output_axes != [1] \
                or (not self.takes_ids and model.input_size is None):
            raise ValueError("model.pool(): a pool streams models of one input (batch, steps, features) or token "
                             "ids (batch, steps) and one output (batch, steps, ...); use model.session() for others")
        self.widths = [[w for _, w in layer.state_shapes] for layer in model.recurrent_layers]
        # Plain locks rather than Conditions: a Condition allocates a lock per wait, and these are
        # taken twice per step. `mutex` guards pending, closed, the streams' busy flags and the
        # bell's state. The worker waits on `bell` (locked while not rung); submit() rings it once
        # `want` steps are pending (want = 0: the worker is not waiting), close() rings it always.
        self.mutex = threading.Lock()
        self.bell = threading.Lock()
        self.bell.acquire()
        self.want = 0
        self.rung = False
        self.pending: list[Stream] = []
        self.closed = False
        # Slot arrays (capacity, width), one per state tensor; the worker and the streams' state
        # accessors touch them only under state_lock.
        self.state_lock = threading.Lock()
        self.capacity = 0
        self.slots: list[list[np.ndarray]] = [[np.empty((0, w), dtype) for w in ws] for ws in self.widths]
        self.started = [np.empty(0, np.bool_) for _ in self.widths] if streamer.masked else None
        self.free: list[int] = []
        self.dropped: list[int] = []  # slots of streams garbage-collected without close()
        self.open_streams = 0
        # Gather buffers: the batch's states, contiguous, max_batch rows.
        self.gathered = [[np.empty((max_batch, w), dtype) for w in ws] for ws in self.widths]
        self.gathered_started = [np.empty(max_batch, np.bool_) for _ in self.widths] if self.started else None
        if self.takes_ids:
            self.inputs = np.empty((max_batch, 1), np.intp)
        else:
            self.inputs = np.empty((max_batch, 1, model.input_size), dtype)
        self._batch_views: dict[int, tuple] = {}
        # A chain [Embedding ->] recurrent layers [-> Dense heads] runs each batch in one call into C, as a
        # session's step does (plan.chain_step), bound once to the gather buffers: through the plan, a
        # batch cost ~30 us more of this thread's Python, which the streams wait for.
        self.chain = None
        if model.is_chain and self.started is None:
            bound = [tuple(g.reshape(1, max_batch, g.shape[1]) for g in gathered) for gathered in self.gathered]
            self.chain = chain_step(streamer.plan, bound, max_batch)
        self.batches = 0
        self.steps = 0
        self.thread = threading.Thread(target=self._work, name="lstm_engine-pool", daemon=True)
        self.thread.start()

    # -- slots ---------------------------------------------------------------------------------
    def acquire_slot(self) -> int:
        with self.state_lock:
            while self.dropped:
                self.free.append(self.dropped.pop())
                self.open_streams -= 1
            if not self.free:
                old = self.capacity
                new = max(self.max_batch, 2 * old)
                for k, ws in enumerate(self.widths):
                    for j, w in enumerate(ws):
                        grown = np.zeros((new, w), self.dtype)
                        grown[:old] = self.slots[k][j]
                        self.slots[k][j] = grown
                    if self.started is not None:
                        grown_s = np.zeros(new, np.bool_)
                        grown_s[:old] = self.started[k]
                        self.started[k] = grown_s
                self.capacity = new
                # Low slots first, so that busy slots stay close together in memory.
                self.free = list(range(new - 1, old - 1, -1))
            slot = self.free.pop()
            self._zero(slot)
            self.open_streams += 1
            return slot

    def release_slot(self, slot: int) -> None:
        with self.state_lock:
            self.free.append(slot)
            self.open_streams -= 1

    def _zero(self, slot: int) -> None:
        for arrays in self.slots:
            for arr in arrays:
                arr[slot] = 0
        if self.started is not None:
            for s in self.started:
                s[slot] = False

    # -- the worker ----------------------------------------------------------------------------
    def submit(self, stream: "Stream", x: Any, notify: Any) -> None:
        """Queue a stream's step (its checks and the queueing under one lock)."""
        with self.mutex:
            if stream._closed:
                raise RuntimeError("the stream is closed")
            if stream._busy:
                raise RuntimeError("the stream is already stepping in another thread or task; a stream "
                                   "serves one at a time: open one stream per sequence")
            if self.closed:
                raise RuntimeError("the pool is closed")
            stream._busy = True
            stream._x, stream._notify = x, notify
            self.pending.append(stream)
            if self.want and len(self.pending) >= self.want:
                self._ring()

    def _ring(self) -> None:
        """Wake the worker (under mutex); a bell already rung stays rung."""
        self.want = 0
        if not self.rung:
            self.rung = True
            self.bell.release()

    def _wait(self, timeout: float) -> None:
        """Wait for the bell (timeout < 0: without limit), outside mutex."""
        if self.bell.acquire(timeout=timeout):
            with self.mutex:
                self.rung = False

    def _next_batch(self) -> list | None:
        """Take the next batch, or return None after waiting (the caller asks again).

        Streams whose steps just returned usually step again at once. Rather than run the first of
        them alone and the rest as a second batch, the worker waits while their steps keep arriving:
        up to max_delay in all, ending early when every step expected has arrived or when no new step
        came for a quarter of max_delay. The steps expected are those that were waiting when the last
        batch finished plus that batch's own streams, so a lone stream, or one among idle ones, never
        waits.
        """
        with self.mutex:
            n = len(self.pending)
            target = min(self.max_batch, max(1, self._expect))
            if self.closed or (n and (n >= target or n <= self._gathered or self._delay >= self.max_delay)):
                batch = self.pending[: self.max_batch]
                del self.pending[: self.max_batch]
                self._gathered, self._delay = 0, 0.0
                return batch
            if n:
                self._gathered = n
                wait = self.max_delay / 4
                self.want = target
            else:
                wait = -1
                self.want = 1
        t0 = time.perf_counter()
        self._wait(wait)
        if n:
            self._delay += time.perf_counter() - t0
        return None

    def _views(self, n: int) -> tuple:
        v = self._batch_views.get(n)
        if v is None:
            states = []
            for gathered in self.gathered:
                arrs = [g[:n].reshape(1, n, g.shape[1]) for g in gathered]
                states.append((arrs[0], arrs[-1]))
            started = None if self.gathered_started is None else [g[:n] for g in self.gathered_started]
            v = self._batch_views[n] = (states, started, self.inputs[:n], self.inputs[:n, 0])
        return v

    def _work(self) -> None:
        self._gathered, self._delay, self._expect = 0, 0.0, 1
        while True:
            batch = self._next_batch()
            if batch is None:
                continue
            if self.closed:
                with self.mutex:
                    batch += self.pending
                    self.pending = []
                _deliver(batch, None, RuntimeError("the pool was closed before this step ran"))
                return
            error = None
            try:
                result = self._run(batch)
            except BaseException as exc:  # a bug must fail the waiting steps, not hang them
                result, error = None, exc
            with self.mutex:
                self._expect = len(self.pending) + len(batch)
            _deliver(batch, result, error)
            # Hold no stream while idle: a dropped stream must be collectable.
            batch = result = error = None

    def _run(self, batch: list) -> np.ndarray:
        n = len(batch)
        states, started, inputs, rows = self._views(n)
        xs = [s._x for s in batch]
        if self.takes_ids:
            rows[:] = xs
        elif not _kernels.stack_rows(xs, rows):
            np.stack(xs, out=rows)
        out = None if self.output_size is None else np.empty((n, self.output_size), self.dtype)
        with self.state_lock:
            idx = np.array([s._slot for s in batch], np.intp)
            for k, arrays in enumerate(self.slots):
                for arr, g in zip(arrays, self.gathered[k]):
                    _kernels.take_rows(arr, idx, g)
                if started is not None:
                    np.take(self.started[k], idx, out=started[k])
            chain = self.chain
            if chain is None or out is None or chain.step(rows, out, n) is None:
                out3 = None if out is None else out[:, None]
                y = self.streamer.run([inputs] + [None] * (self.streamer.n_inputs - 1), states, started, out3)[0]
                if out is None:
                    out = np.array(y[:, 0])
                elif y is not out3:
                    np.copyto(out3, y)
            for k, arrays in enumerate(self.slots):
                for arr, g in zip(arrays, self.gathered[k]):
                    _kernels.put_rows(g, idx, arr)
                if started is not None:
                    self.started[k][idx] = started[k]
        self.batches += 1
        self.steps += n
        return out

    def close(self) -> None:
        with self.mutex:
            self.closed = True
            self._ring()
        if threading.current_thread() is not self.thread:
            self.thread.join()


class StreamPool:
    """Independent streams of one model whose concurrent steps run as one batched kernel call.

    Made by ``model.pool(max_batch=64)``. ``open()`` gives a Stream (from any thread); streams
    step from threads (``step``) or asyncio tasks (``astep``), join and leave at any time; steps
    waiting together are run as one batch of at most ``max_batch`` rows. ``max_delay`` (seconds)
    bounds how long the worker waits for the next steps of streams it has just answered, so that
    busy streams keep running as one batch; a lone stream never waits. ``close()`` (or leaving a
    ``with`` block) stops the worker thread; steps still waiting then raise RuntimeError.
    """

    def __init__(self, model: Any, max_batch: int = 64, *, max_delay: float = 0.001, dtype: Any = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        if isinstance(max_delay, bool) or not isinstance(max_delay, (int, float)) or not 0 <= max_delay <= 1:
            raise ValueError(f"max_delay: expected seconds in [0, 1], got {max_delay!r}")
        dt = model.dtype if dtype is None else np.dtype(dtype)
        if dt not in model.dtypes:
            kept = ", ".join(str(d) for d in model.dtypes)
            raise TypeError(f"dtype: this model keeps weights in {kept}, not {dt}")
        self.model = model
        self.max_batch = int(max_batch)
        self.dtype = dt
        self._core = _Core(model, self.max_batch, dt, float(max_delay))
        # Dropping the pool stops its worker even without close().
        self._finalizer = weakref.finalize(self, _Core.close, self._core)

    def open(self) -> "Stream":
        """A new stream with a zero state in its own slot."""
        if self._core.closed:
            raise RuntimeError("the pool is closed")
        return Stream(self)

    def close(self) -> None:
        """Stop the worker thread; later steps raise RuntimeError. Safe to call twice."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def num_streams(self) -> int:
        """Streams open now."""
        return self._core.open_streams - len(self._core.dropped)

    @property
    def stats(self) -> dict:
        """Batches run and steps taken so far (steps / batches = the mean batch size)."""
        core = self._core
        return {"batches": core.batches, "steps": core.steps}

    def __enter__(self) -> "StreamPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.num_streams} streams"
        return f"StreamPool(max_batch={self.max_batch}, dtype={self.dtype}, {state})"


class Stream:
    """One sequence in a StreamPool, with its own state slot. One thread or task at a time."""

    def __init__(self, pool: StreamPool) -> None:
        self.pool = pool  # keeps the pool (and its worker) alive while the stream is
        self._core = pool._core
        self._slot = self._core.acquire_slot()
        self._closed = False
        self._busy = False
        self._x: Any = None
        self._result: np.ndarray | None = None
        self._error: BaseException | None = None
        # Held between steps; the worker releases it when this stream's step is done.
        self._done = threading.Lock()
        self._done.acquire()
        self._release = self._done.release
        self._notify: Any = None
        core = self._core
        self._shape = None if core.takes_ids else (core.model.input_size,)
        self._vocab = core.vocab

    def __repr__(self) -> str:
        return f"Stream(slot={self._slot}{', closed' if self._closed else ''})"

    # -- checks --------------------------------------------------------------------------------
    def _check(self, x: Any) -> Any:
        core = self._core
        if core.takes_ids:
            if isinstance(x, np.ndarray) and x.size == 1 and x.ndim <= 1:
                x = x.reshape(())[()]
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                raise TypeError(f"x: expected one token id (an integer), got {type(x).__name__}")
            if not 0 <= x < self._vocab:
                raise ValueError(f"x: token id {x} is out of range [0, {self._vocab})")
            return int(x)
        if type(x) is not np.ndarray or x.dtype is not core.dtype or x.shape != self._shape:
            if not isinstance(x, np.ndarray):
                x = as_real_array(x, core.dtype)
            native = x.dtype.newbyteorder("=") if x.dtype.kind == "f" else x.dtype
            if native != core.dtype:
                raise TypeError(f"x: dtype {x.dtype}, but this pool runs {core.dtype}")
            if x.shape != self._shape:
                raise ValueError(f"x: expected one step of shape {self._shape}, got {x.shape}")
        return x

    # -- stepping ------------------------------------------------------------------------------
    def step(self, x: Any) -> np.ndarray:
        """Run one timestep: x (F,) floats or one token id; returns (out,). Blocks until its batch has run.

        x is read when the batch runs, not copied before: leave it unchanged until step returns.
        """
        self._core.submit(self, self._check(x), self._release)
        self._done.acquire()
        return self._take()

    async def astep(self, x: Any) -> np.ndarray:
        """``step`` for asyncio: awaits the batch instead of blocking the event loop.

        A step cancelled while waiting still runs (it may already be in a batch): the stream's
        state advances, only the result is dropped.
        """
        import asyncio  # here, not at the top: importing asyncio would cost every user ~30 ms

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._core.submit(self, self._check(x), (loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._discard()  # the step finished just as the task was cancelled
            # Otherwise the worker's answer finds fut cancelled and frees the stream then.
            raise
        return self._take()

    def _discard(self) -> None:
        self._result = self._error = self._x = self._notify = None
        self._busy = False

    def _take(self) -> np.ndarray:
        result, error = self._result, self._error
        self._result = self._error = self._x = self._notify = None
        self._busy = False
        if error is not None:
            raise error
        return result

    # -- state ---------------------------------------------------------------------------------
    def _idle(self) -> None:
        if self._closed:
            raise RuntimeError("the stream is closed")
        if self._busy:
            raise RuntimeError("the stream is stepping in another thread or task")

    def reset(self) -> None:
        """Zero this stream's state, as for a new sequence."""
        self._idle()
        with self._core.state_lock:
            self._core._zero(self._slot)

    @property
    def state(self) -> list[tuple[np.ndarray, ...]]:
        """A copy of this stream's state, per recurrent layer (h, c) or (h,), each (1, 1, width)."""
        self._idle()
        core = self._core
        with core.state_lock:
            return [tuple(arr[self._slot].reshape(1, 1, -1).copy() for arr in arrays) for arrays in core.slots]

    @state.setter
    def state(self, value: Any) -> None:
        self._idle()
        core = self._core
        given = check_state(value, core.model.recurrent_layers, 1, "state", check_floats)
        rows = [arr.reshape(-1) for entry in given for arr in entry]
        with core.state_lock:
            targets = [arr for arrays in core.slots for arr in arrays]
            for dst, src in zip(targets, rows):
                dst[self._slot] = src
            if core.started is not None:
                for s in core.started:
                    s[self._slot] = False

    def _arrays(self) -> list[tuple[str, np.ndarray]]:
        """Views of this stream's slot, named and shaped as a batch-1 session's state arrays."""
        core, slot = self._core, self._slot
        named = []
        for k, arrays in enumerate(core.slots):
            for name, arr in zip(("h", "c"), arrays):
                named.append((f"{k}.{name}", arr[slot:slot + 1].reshape(1, 1, -1)))
            if core.started is not None:
                named.append((f"{k}.started", core.started[k][slot:slot + 1]))
        return named

    def save_state(self) -> bytes:
        """The whole state as bytes, the masked layers' "output yet?" flags included: the bytes a batch-1
        ``Session.save_state`` writes, so either can load them."""
        self._idle()
        core = self._core
        with core.state_lock:
            return encode_state(core.model, core.dtype, 1, self._arrays())

    def load_state(self, blob: Any) -> None:
        """Restore bytes from ``save_state`` (or a batch-1 session's) of the same model and dtype; the stream
        then continues exactly where they were taken."""
        self._idle()
        core = self._core
        with core.state_lock:
            decode_state(core.model, core.dtype, 1, self._arrays(), blob, "pool stream")

    def close(self) -> None:
        """Leave the pool, freeing the state slot for another stream. Safe to call twice."""
        with self._core.mutex:
            if self._closed:
                return
            if self._busy:
                raise RuntimeError("the stream is stepping in another thread or task; close it after")
            self._closed = True
        self._core.release_slot(self._slot)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A stream dropped without close() gives its slot back.
        # No lock here: __del__ may run in any thread, even one holding the pool's locks; list.append
        # is atomic, and the next acquire_slot takes the slot back.
        if not getattr(self, "_closed", True) and not self._busy:
            self._closed = True
            self._core.dropped.append(self._slot)


def _deliver(batch: list, result: np.ndarray | None, error: BaseException | None) -> None:
    """Hand each stream its row of the result (or the error) and wake its caller.

    A thread waits on its stream's lock; an asyncio task on a future, resolved in its event loop
    with one call_soon_threadsafe per loop and batch (each call writes to the loop's wake-up pipe).
    """
    loops: dict = {}
    for i, stream in enumerate(batch):
        stream._result, stream._error = (None if error is not None else result[i]), error
        notify = stream._notify
        if type(notify) is tuple:
            loops.setdefault(notify[0], []).append((notify[1], stream))
        else:
            notify()
    for loop, waiting in loops.items():
        try:
            loop.call_soon_threadsafe(_resolve, waiting)
        except RuntimeError:
            # The event loop is gone; nobody waits for these steps any more.
            for _, stream in waiting:
                stream._discard()


def _resolve(waiting: list) -> None:
    for fut, stream in waiting:
        if fut.done():
            stream._discard()  # its task was cancelled while the step ran
        else:
            fut.set_result(None)
