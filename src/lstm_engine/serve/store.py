"""The server's streams: who owns each, its pool stream or saved state, and its durable state.

Every stream's steps run under its own asyncio lock, in the order they arrive. With a state
directory, a request is answered only after the stream's new state is in the write-ahead log and
fsynced (wal.py: one fsync for every request answered together), so an answered step survives a
crash and an unanswered one leaves the last answered state in place. Idle streams leave the pool
for their checkpoint file (or, without a state directory, for bytes in memory) and come back on
their next request.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Callable

import numpy as np

from ..errors import LoadError
from ..generate import sample_next
from .wal import ID_PATTERN, MAX_LOG_BYTES, StateLog


class StreamError(Exception):
    """A request the store refuses: HTTP status, a short code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Entry:
    """One stream: its owner, its place in the pool (or None while evicted) and its position."""

    __slots__ = ("id", "owner", "stream", "position", "lock", "last_used", "saved", "deleted", "waiting")

    def __init__(self, id: str, owner: str, position: int) -> None:
        self.id = id
        self.owner = owner
        self.stream: Any = None
        self.position = position  # steps taken, the last answered one included
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        self.saved: bytes | None = None  # the evicted state, when there is no state directory
        self.deleted = False
        self.waiting = 0  # requests queued on the lock


class StreamStore:
    """Streams of one pool, by id, with owners, positions, eviction and (optionally) state files.

    ``state_dir`` None keeps everything in memory. ``on_step(seconds)`` is told how long each pool
    step took from submission to result (for the metrics). ``max_log_bytes``: the log segment's size
    past which its states go to checkpoints and it starts again (wal.py).
    """

    def __init__(self, model: Any, pool: Any, *, state_dir: str | None, idle_timeout: float,
                 max_streams_per_owner: int, on_step: Callable[[float], None] | None = None,
                 max_log_bytes: int = MAX_LOG_BYTES) -> None:
        self.model = model
        self.pool = pool
        self.output_size = model.output_size
        self.state_dir = state_dir
        self.idle_timeout = idle_timeout
        self.max_streams_per_owner = max_streams_per_owner
        self.on_step = on_step
        self.entries: dict[str, Entry] = {}
        self.per_owner: dict[str, int] = {}
        self.evictions = 0
        self.wal: StateLog | None = None
        if state_dir is not None:
            self._recover(state_dir, max_log_bytes)

    # -- recovery --------------------------------------------------------------------------------
    def _recover(self, directory: str, max_log_bytes: int) -> None:
        """Register every stream the state directory holds (evicted: loaded on first use).

        A state that is damaged or belongs to another model stops the start-up, naming its file:
        serving without it would lose that stream silently.
        """
        with self.pool.open() as probe:
            def check(blob: bytes, where: str) -> None:
                try:
                    probe.load_state(blob)
                except ValueError as exc:
                    raise LoadError(f"{where}: {exc} (move it away to start without this stream)") from None

            self.wal = StateLog(directory, check, max_log_bytes)
        for stream_id, (owner, position) in self.wal.streams.items():
            self.entries[stream_id] = Entry(stream_id, owner, position)
            self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        self.wal.streams = {}

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, stream_id: str, owner: str) -> Entry:
        """The owner's stream, or 404: another owner's stream is indistinguishable from none."""
        entry = self.entries.get(stream_id) if ID_PATTERN.fullmatch(stream_id) else None
        if entry is None or entry.owner != owner or entry.deleted:
            raise StreamError(404, "unknown_stream", f"no stream {stream_id!r} (it never existed, was deleted, "
                                                     "or belongs to another token)")
        return entry

    def _attach(self, entry: Entry) -> Any:
        """The entry's pool stream, brought back from its saved state if it was evicted."""
        if entry.stream is None:
            if entry.saved is not None:
                blob = entry.saved
            elif self.wal is not None:
                try:
                    blob = self.wal.last_state(entry.id)
                except (OSError, LoadError) as exc:
                    # Not the client's doing: the file went missing or bad behind the server's back.
                    raise StreamError(503, "state_unavailable", f"the stream's saved state cannot be read: {exc}") \
                        from None
            else:
                blob = None
            stream = self.pool.open()
            if blob is not None:
                try:
                    stream.load_state(blob)
                except ValueError as exc:
                    stream.close()
                    raise StreamError(503, "state_unavailable", f"the stream's saved state cannot be read: {exc}") \
                        from None
            entry.stream, entry.saved = stream, None
        return entry.stream

    async def _persist(self, entry: Entry, position: int) -> None:
        if self.wal is not None:
            await self._durable(self.wal.append(entry.id, entry.owner, position, entry.stream.save_state()))

    @staticmethod
    async def _durable(logged: asyncio.Future) -> None:
        try:
            await logged
        except OSError as exc:
            # The disk, not the client: retrying cannot help until the server is restarted on a sound disk.
            raise StreamError(503, "not_durable", f"the state directory cannot be written ({exc}); nothing is "
                                                  "answered until the server is restarted") from None

    # -- the requests ----------------------------------------------------------------------------
    async def create(self, owner: str) -> Entry:
        if self.per_owner.get(owner, 0) >= self.max_streams_per_owner:
            raise StreamError(429, "too_many_streams", f"this token has {self.max_streams_per_owner} open streams, "
                                                       "the limit; delete one first")
        stream_id = secrets.token_hex(16)
        entry = Entry(stream_id, owner, 0)
        self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        self.entries[stream_id] = entry
        try:
            async with entry.lock:
                entry.stream = self.pool.open()
                await self._persist(entry, 0)
        except BaseException:
            self._forget(entry)
            raise
        return entry

    def _forget(self, entry: Entry) -> None:
        entry.deleted = True
        if self.entries.pop(entry.id, None) is not None:
            self.per_owner[entry.owner] -= 1
        if entry.stream is not None:
            entry.stream.close()
            entry.stream = None

    async def locked(self, entry: Entry, work: Callable, *args: Any) -> Any:
        """Run ``await work(entry, stream, *args)`` under the entry's lock, to the end even if the caller goes away.

        Once the work has begun it runs to its end even if the caller is cancelled (uvicorn cancels what
        still runs at the end of a graceful shutdown): a step cannot be left half-applied or its state
        unwritten. The cancellation is raised after the work ended; while waiting for the lock it is
        raised at once (nothing has begun).
        """
        entry.waiting += 1
        try:
            await entry.lock.acquire()  # not `async with`: two coroutines fewer a request
            try:
                if entry.deleted:
                    raise StreamError(404, "unknown_stream", f"no stream {entry.id!r} (it was deleted)")
                stream = self._attach(entry)
                return await _ToTheEnd(work(entry, stream, *args))
            finally:
                entry.last_used = time.monotonic()
                entry.lock.release()
        finally:
            entry.waiting -= 1

    async def run_steps(self, entry: Entry, stream: Any, xs: Any, at: int | None) -> tuple[np.ndarray, int]:
        """Step the stream through xs (checked steps; ``at``: the position the client expects)."""
        if at is not None and at != entry.position:
            raise StreamError(409, "position_mismatch", f"at: the stream is at position {entry.position}, not {at} "
                                                        "(a step was answered that the client did not see, or "
                                                        "was never sent)")
        return await self.advance(entry, stream, xs), entry.position

    async def advance(self, entry: Entry, stream: Any, xs: Any) -> np.ndarray:
        """Run the steps xs and make the new state durable, or, on any failure, leave the last answered state."""
        # A failed step leaves its stream's state as it was (the pool scatters states back only after a
        # batch ran), so only the earlier steps of a chunk can need undoing.
        before = None if self.wal is not None or len(xs) == 1 else stream.save_state()
        try:
            rows = []
            for x in xs:
                t0 = time.perf_counter()
                rows.append(await stream.astep(x))
                if self.on_step is not None:
                    self.on_step(time.perf_counter() - t0)
            # One step, the usual request: its row of the batch's result is the answer as it is.
            out = rows[0][None] if len(rows) == 1 else np.stack(rows)
            if self.wal is not None:
                await self._persist(entry, entry.position + len(xs))
        except BaseException:
            self._roll_back(entry, before)
            raise
        entry.position += len(xs)
        return out

    async def generate(self, entry: Entry, stream: Any, prompt: np.ndarray, sampling: tuple, log_probs: bool,
                       send: Callable) -> list[int]:
        """Feed the prompt, then sample tokens one by one; ``await send(token, position)`` once each is durable."""
        n, temperature, top_k, top_p, rng = sampling
        tokens: list[int] = []
        if n == 0:
            return tokens
        scores = (await self.advance(entry, stream, prompt))[-1:]
        for _ in range(n):
            tok = int(sample_next(scores, log_probs, temperature, top_k, top_p, rng)[0])
            scores = await self.advance(entry, stream, (tok,))
            tokens.append(tok)
            await send(tok, entry.position)
        return tokens

    def _roll_back(self, entry: Entry, before: bytes | None) -> None:
        """Undo a request that failed part-way: back to the last answered state."""
        stream = entry.stream
        if stream is None or stream.closed:
            return
        if self.wal is None:
            if before is not None:
                stream.load_state(before)
        else:
            # The log (or the checkpoint) holds the last answered state: the next request reloads it.
            stream.close()
            entry.stream = None

    async def export_state(self, entry: Entry, stream: Any) -> bytes:
        return stream.save_state()

    async def import_state(self, entry: Entry, stream: Any, blob: bytes) -> int:
        before = None if self.wal is not None else stream.save_state()
        try:
            stream.load_state(blob)  # checks everything before it changes anything
        except (ValueError, TypeError) as exc:
            raise StreamError(422, "bad_state", str(exc)) from None
        try:
            await self._persist(entry, entry.position)
        except BaseException:
            self._roll_back(entry, before)
            raise
        return entry.position

    async def delete(self, entry: Entry, stream: Any) -> None:
        if self.wal is not None:
            await self._durable(self.wal.delete(entry.id))
        self._forget(entry)

    # -- housekeeping ----------------------------------------------------------------------------
    def evict_idle(self) -> int:
        """Move streams idle for longer than idle_timeout out of the pool; returns how many."""
        now = time.monotonic()
        evicted = 0
        for entry in list(self.entries.values()):
            if entry.stream is None or entry.lock.locked() or now - entry.last_used < self.idle_timeout:
                continue
            if self.wal is None:
                entry.saved = entry.stream.save_state()
            else:
                # The log already holds this state (it was logged before the last answer): it moves to its
                # checkpoint file, out of memory.
                self.wal.evict(entry.id)
            entry.stream.close()
            entry.stream = None
            evicted += 1
        self.evictions += evicted
        return evicted

    @property
    def resident(self) -> int:
        return sum(1 for e in self.entries.values() if e.stream is not None)

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()


class _ToTheEnd:
    """Await a coroutine in the calling task to its end even if that task is cancelled meanwhile; the
    cancellation is raised after it.

    asyncio.shield does this with a task of its own, which cost a request ~10 us of the event loop's
    time (a task, the shield's futures and two more turns of the loop: py-spy of serve_load.py). Here
    the coroutine is driven in place: each future it awaits is waited for through a proxy future, so
    that a cancellation of the task cancels the proxy, never the future (a pool step, a log append).
    """

    __slots__ = ("coro",)

    def __init__(self, coro: Any) -> None:
        self.coro = coro

    def __await__(self) -> Any:
        coro, cancelled = self.coro, None
        while True:
            try:
                fut = coro.send(None)
            except StopIteration as stop:
                if cancelled is not None:
                    raise cancelled
                return stop.value
            except BaseException:
                if cancelled is not None:
                    raise cancelled from None
                raise
            if fut is None:  # a bare yield (asyncio.sleep(0)): one turn of the loop
                try:
                    yield
                except asyncio.CancelledError as exc:
                    cancelled = exc
                continue
            fut._asyncio_future_blocking = False
            while not fut.done():
                proxy = fut.get_loop().create_future()
                fut.add_done_callback(lambda _, proxy=proxy: proxy.done() or proxy.set_result(None))
                proxy._asyncio_future_blocking = True
                try:
                    yield proxy
                except asyncio.CancelledError as exc:
                    cancelled = exc

