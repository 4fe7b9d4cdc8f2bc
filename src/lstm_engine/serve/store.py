"""The server's streams: who owns each, its pool stream or saved state, and its durable state file.

Every stream's steps run under its own asyncio lock, in the order they arrive. With a state
directory, a request is answered only after the stream's new state is on disk (temp file, fsync,
rename, fsync of the directory), so an answered step survives a crash and an unanswered one leaves
the last answered state in place. Idle streams leave the pool for their file (or, without a state
directory, for bytes in memory) and come back on their next request.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import secrets
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ..errors import LoadError
from ..generate import sample_next

ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # 128 random bits, hex
_FILE_MAGIC = b"LESERVE\0"
_FILE_VERSION = 1
_FILE_HEAD = struct.Struct("<8sII")  # magic, format version, metadata length
_CRC = struct.Struct("<I")
_SUFFIX = ".state"
_TEMP_PATTERN = re.compile(r"[0-9a-f]{32}\.state\.[0-9a-f]{8}\.tmp")  # what _Writer writes before renaming


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


def _pack(meta: dict, blob: bytes) -> bytes:
    head = json.dumps(meta, separators=(",", ":")).encode()
    data = _FILE_HEAD.pack(_FILE_MAGIC, _FILE_VERSION, len(head)) + head + blob
    return data + _CRC.pack(zlib.crc32(data))


def _unpack(data: bytes, path: str) -> tuple[dict, bytes]:
    head = _FILE_HEAD.size
    if len(data) < head + _CRC.size or data[:8] != _FILE_MAGIC:
        raise LoadError(f"{path}: not an lstm-engine serve state file")
    _, version, hlen = _FILE_HEAD.unpack_from(data)
    if version != _FILE_VERSION:
        raise LoadError(f"{path}: state file version {version}, this lstm_engine reads {_FILE_VERSION}")
    if zlib.crc32(data[:-_CRC.size]) != _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
        raise LoadError(f"{path}: the state file is truncated or corrupted (checksum mismatch)")
    try:
        meta = json.loads(data[head:head + hlen])
        meta["owner"], meta["position"]  # noqa: B018 - both must be there
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{path}: the state file's metadata is corrupted") from exc
    return meta, data[head + hlen:-_CRC.size]


class _Writer:
    """Writes state files atomically in a thread, many at a time with one directory fsync per group."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        # fsync waits on the disk, not the CPU: a few at once amortise its latency.
        self.fsyncs = ThreadPoolExecutor(4, thread_name_prefix="lstm_engine-serve-fsync")
        self.thread = threading.Thread(target=self._work, name="lstm_engine-serve-writer", daemon=True)
        self.thread.start()

    def submit(self, name: str, data: bytes | None) -> asyncio.Future:
        """Write data to name (None: delete it); the future is done when it is durable."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((name, data, loop, fut))
        return fut

    def _write_one(self, name: str, data: bytes | None) -> None:
        path = os.path.join(self.directory, name)
        if data is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _work(self) -> None:
        while True:
            group = [self.queue.get()]
            if group[0] is None:
                return
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this group
                    break
                group.append(item)
            futures = [self.fsyncs.submit(self._write_one, name, data) for name, data, _, _ in group]
            errors = []
            for f in futures:
                try:
                    f.result()
                    errors.append(None)
                except OSError as exc:
                    errors.append(exc)
            try:
                # The renames are durable once the directory is.
                fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                errors = [e or exc for e in errors]
            # One wake-up per event loop and group (each call_soon_threadsafe writes to the loop's pipe).
            loops: dict = {}
            for (_, _, loop, fut), error in zip(group, errors):
                loops.setdefault(loop, []).append((fut, error))
            for loop, settled in loops.items():
                try:
                    loop.call_soon_threadsafe(_settle, settled)
                except RuntimeError:
                    pass  # the event loop has stopped; nobody waits

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.fsyncs.shutdown()


def _settle(settled: list) -> None:
    for fut, error in settled:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class StreamStore:
    """Streams of one pool, by id, with owners, positions, eviction and (optionally) state files.

    ``state_dir`` None keeps everything in memory. ``on_step(seconds)`` is told how long each pool
    step took from submission to result (for the metrics).
    """

    def __init__(self, model: Any, pool: Any, *, state_dir: str | None, idle_timeout: float,
                 max_streams_per_owner: int, on_step: Callable[[float], None] | None = None) -> None:
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
        self.writer: _Writer | None = None
        if state_dir is not None:
            self._recover(state_dir)
            self.writer = _Writer(state_dir)

    # -- recovery --------------------------------------------------------------------------------
    def _recover(self, directory: str) -> None:
        """Register every stream found in the state directory (evicted: loaded on first use).

        Leftover temp files are writes that were never answered; they are removed. A file that is
        damaged or holds another model's state stops the start-up, naming it: serving without it
        would lose that stream silently.
        """
        os.makedirs(directory, exist_ok=True)
        with self.pool.open() as probe:
            for name in sorted(os.listdir(directory)):
                self._register(directory, name, probe)

    def _register(self, directory: str, name: str, probe: Any) -> None:
        path = os.path.join(directory, name)
        if _TEMP_PATTERN.fullmatch(name):
            os.unlink(path)
            return
        if not name.endswith(_SUFFIX) or not ID_PATTERN.fullmatch(name[:-len(_SUFFIX)]):
            return
        with open(path, "rb") as f:
            meta, blob = _unpack(f.read(), path)
        try:
            probe.load_state(blob)
        except ValueError as exc:
            raise LoadError(f"{path}: {exc} (move it away to start without this stream)") from None
        entry = Entry(name[:-len(_SUFFIX)], meta["owner"], int(meta["position"]))
        self.entries[entry.id] = entry
        self.per_owner[entry.owner] = self.per_owner.get(entry.owner, 0) + 1

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
            elif self.state_dir is not None:
                try:
                    with open(self._path(entry.id), "rb") as f:
                        blob = _unpack(f.read(), self._path(entry.id))[1]
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
        entry.last_used = time.monotonic()
        return entry.stream

    def _path(self, stream_id: str) -> str:
        return os.path.join(self.state_dir, stream_id + _SUFFIX)

    async def _persist(self, entry: Entry, position: int) -> None:
        if self.writer is not None:
            data = _pack({"owner": entry.owner, "position": position}, entry.stream.save_state())
            await self.writer.submit(entry.id + _SUFFIX, data)

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

        The work is shielded from cancellation: a client that hangs up mid-request cannot leave a
        step half-applied or its state unwritten.
        """
        entry.waiting += 1
        try:
            return await asyncio.shield(asyncio.ensure_future(self._locked(entry, work, args)))
        finally:
            entry.waiting -= 1

    async def _locked(self, entry: Entry, work: Callable, args: tuple) -> Any:
        async with entry.lock:
            if entry.deleted:
                raise StreamError(404, "unknown_stream", f"no stream {entry.id!r} (it was deleted)")
            stream = self._attach(entry)
            try:
                return await work(entry, stream, *args)
            finally:
                entry.last_used = time.monotonic()

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
        before = None if self.writer is not None or len(xs) == 1 else stream.save_state()
        out = np.empty((len(xs), self.output_size), self.pool.dtype)
        try:
            for t, x in enumerate(xs):
                t0 = time.perf_counter()
                out[t] = await stream.astep(x)
                if self.on_step is not None:
                    self.on_step(time.perf_counter() - t0)
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
        if self.writer is None:
            if before is not None:
                stream.load_state(before)
        else:
            # The file holds the last answered state: the next request reloads it.
            stream.close()
            entry.stream = None

    async def export_state(self, entry: Entry, stream: Any) -> bytes:
        return stream.save_state()

    async def import_state(self, entry: Entry, stream: Any, blob: bytes) -> int:
        before = None if self.writer is not None else stream.save_state()
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
        if self.writer is not None:
            await self.writer.submit(entry.id + _SUFFIX, None)
        self._forget(entry)

    # -- housekeeping ----------------------------------------------------------------------------
    def evict_idle(self) -> int:
        """Move streams idle for longer than idle_timeout out of the pool; returns how many."""
        now = time.monotonic()
        evicted = 0
        for entry in list(self.entries.values()):
            if entry.stream is None or entry.lock.locked() or now - entry.last_used < self.idle_timeout:
                continue
            if self.writer is None:
                entry.saved = entry.stream.save_state()
            # With a state directory the file already holds this state: it was written after the last step.
            entry.stream.close()
            entry.stream = None
            evicted += 1
        self.evictions += evicted
        return evicted

    @property
    def resident(self) -> int:
        return sum(1 for e in self.entries.values() if e.stream is not None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
