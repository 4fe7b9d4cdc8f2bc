"""The state directory: a write-ahead log of stream states, group-committed, and per-stream checkpoints.

    DIR/wal.00000007.log   log segments: records appended in order, each checksummed
    DIR/{id}.state         checkpoints: one stream's state as of a log sequence number (temp file, fsync, rename)

Every state record holds a stream's whole state after a request (owner, position, the stream's
``save_state`` bytes), not the request's inputs: recovery then copies states instead of running the
model again, and a generate request's sampled tokens need no replay. A delete record ends a stream.
Records carry increasing sequence numbers (``lsn``), and so do checkpoints, so recovery applies each
record only over an older state, whatever order files were written in.

One writer thread appends every record queued since its last fsync with one write and one fdatasync,
then answers them all: concurrent requests share the fsync (group commit), and a request is answered
only once its record is durable. When the segment passes ``max_log_bytes`` a new one starts at once,
and a checkpoint thread writes every state the old one holds to its stream's checkpoint, then removes
it: the log stays bounded, and answers never wait for checkpoints (thousands of fsyncs for as many
streams). An evicted stream gets its checkpoint too (its state leaves memory for the disk). A durable
delete removes the stream's checkpoint only if that file holds an older state than the delete: an
eviction queued before the delete writes the newest state when it runs, which may be that of a stream
made again under the same id after the delete, and that file must stay.

Recovery (``StateLog(directory, check)``): the checkpoints, then the segments' records in order. In
the last segment the first record whose checksum fails ends the log: it is a write the crash cut
short, never answered, so it and what follows are dropped. A bad record in an earlier segment is
damage (those were fsynced whole before the next began) and stops the start-up, naming the file.
The log is then folded into checkpoints and a fresh segment begins.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import secrets
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import LoadError

log = logging.getLogger("lstm_engine.serve")

ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # 128 random bits, hex
SUFFIX = ".state"
_SEGMENT = re.compile(r"wal\.(\d{8})\.log")
_TEMP_PATTERN = re.compile(r"[0-9a-f]{32}\.state\.[0-9a-f]{8}\.tmp")  # a checkpoint before its rename

_FILE_MAGIC = b"LESERVE\0"
_FILE_VERSION = 1  # a checkpoint's metadata may lack "lsn": files of the log-less servers, lsn 0
_FILE_HEAD = struct.Struct("<8sII")  # magic, format version, metadata length
_CRC = struct.Struct("<I")

_RECORD_MAGIC = b"LEWL"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
_RECORD_BODY = struct.Struct("<BQ16sQH")  # kind, lsn, stream id, position, owner length; then owner, state
STATE, DELETE = 1, 2

MAX_LOG_BYTES = 64 << 20


def pack_checkpoint(meta: dict, blob: bytes) -> bytes:
    head = json.dumps(meta, separators=(",", ":")).encode()
    data = _FILE_HEAD.pack(_FILE_MAGIC, _FILE_VERSION, len(head)) + head + blob
    return data + _CRC.pack(zlib.crc32(data))


def unpack_checkpoint(data: bytes, path: str) -> tuple[dict, bytes]:
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
        meta.setdefault("lsn", 0)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"{path}: the state file's metadata is corrupted") from exc
    return meta, data[head + hlen:-_CRC.size]


def pack_record(kind: int, lsn: int, stream_id: str, owner: str, position: int, blob: bytes) -> bytes:
    who = owner.encode()
    payload = _RECORD_BODY.pack(kind, lsn, bytes.fromhex(stream_id), position, len(who)) + who + blob
    return _RECORD_HEAD.pack(_RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(data: bytes) -> tuple[list[tuple], int]:
    """The records of a segment's bytes, up to the first incomplete or damaged one, and where that one starts
    (``len(data)`` when every byte belongs to a good record)."""
    records, at = [], 0
    while at < len(data):
        if len(data) - at < _RECORD_HEAD.size:
            break
        magic, n, crc = _RECORD_HEAD.unpack_from(data, at)
        start = at + _RECORD_HEAD.size
        if magic != _RECORD_MAGIC or n < _RECORD_BODY.size or start + n > len(data) \
                or zlib.crc32(data[start:start + n]) != crc:
            break
        kind, lsn, raw_id, position, who = _RECORD_BODY.unpack_from(data, start)
        body = start + _RECORD_BODY.size
        if kind not in (STATE, DELETE) or body + who > start + n:
            break
        try:
            owner = data[body:body + who].decode()
        except UnicodeDecodeError:
            break
        records.append((kind, lsn, raw_id.hex(), owner, position, data[body + who:start + n]))
        at = start + n
    return records, at


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: str) -> None:
    """Renames, creations and unlinks in the directory are durable once it is fsynced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateLog:
    """A state directory: recovered when made (``streams``: {id: (owner, position)}), then appended to.

    ``check(blob, where)`` is called with every recovered state and raises LoadError for one the
    server's model cannot load. The event loop calls ``append``/``delete`` (awaitable: done when
    durable), ``evict`` and ``last_state``; a writer thread does the I/O.
    """

    def __init__(self, directory: str, check: Callable[[bytes, str], None],
                 max_log_bytes: int = MAX_LOG_BYTES) -> None:
        self.directory = directory
        self.max_log_bytes = max_log_bytes
        # The newest durable state of each stream whose checkpoint is older: id -> (lsn, owner, position, blob).
        # Written by the writer thread, read by the event loop (last_state).
        self.latest: dict[str, tuple] = {}
        self.lock = threading.Lock()
        self.error: OSError | None = None  # once the log cannot be written, nothing more is answered as durable
        self.rotations = 0
        self.rotating = False  # an old segment's checkpoints are being written: the next rotation waits
        # A checkpoint's fsync waits on the disk, not the CPU: a few at once amortise its latency.
        self.fsyncs = ThreadPoolExecutor(4, thread_name_prefix="lstm_engine-serve-fsync")
        self.streams = self._recover(check)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # the writer's: records and evictions
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # the checkpoint thread's, in order
        self.thread = threading.Thread(target=self._work, name="lstm_engine-serve-log", daemon=True)
        self.checkpointer = threading.Thread(target=self._checkpoint_work, name="lstm_engine-serve-checkpoint",
                                             daemon=True)
        self.thread.start()
        self.checkpointer.start()

    # -- recovery --------------------------------------------------------------------------------
    def _recover(self, check: Callable[[bytes, str], None]) -> dict[str, tuple[str, int]]:
        d = self.directory
        os.makedirs(d, exist_ok=True)
        states: dict[str, tuple] = {}  # id -> (lsn, owner, position, blob, where)
        gone: dict[str, int] = {}  # deleted id -> lsn of its delete record
        segments = []
        # The sequence number each checkpoint file holds: a write never puts an older state over a newer one
        # (an eviction's job may read a state logged after the snapshot of a fold queued before it ran).
        self.written: dict[str, int] = {}
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if _TEMP_PATTERN.fullmatch(name):
                os.unlink(path)  # a checkpoint never renamed: its state is in the log or a newer file
            elif _SEGMENT.fullmatch(name):
                segments.append((int(_SEGMENT.fullmatch(name).group(1)), path))
            elif name.endswith(SUFFIX) and ID_PATTERN.fullmatch(name[:-len(SUFFIX)]):
                with open(path, "rb") as f:
                    meta, blob = unpack_checkpoint(f.read(), path)
                states[name[:-len(SUFFIX)]] = (int(meta["lsn"]), meta["owner"], int(meta["position"]), blob, path)
                self.written[name[:-len(SUFFIX)]] = int(meta["lsn"])
        segments.sort()
        replayed = set()
        last_lsn = max((s[0] for s in states.values()), default=0)
        for i, (_, path) in enumerate(segments):
            with open(path, "rb") as f:
                data = f.read()
            records, end = read_records(data)
            if end < len(data):
                if i < len(segments) - 1:
                    raise LoadError(f"{path}: damaged log record at byte {end} in a segment that was complete "
                                    "(move the state directory away to start without its streams)")
                log.warning("%s: dropped %d bytes at the end of the log (a write cut short by the crash, never "
                            "answered)", path, len(data) - end)
            for kind, lsn, stream_id, owner, position, blob in records:
                last_lsn = max(last_lsn, lsn)
                have = states[stream_id][0] if stream_id in states else gone.get(stream_id, -1)
                if lsn <= have:
                    continue
                if kind == STATE:
                    states[stream_id] = (lsn, owner, position, blob, f"{path} (record {lsn})")
                    replayed.add(stream_id)
                    gone.pop(stream_id, None)  # made again after its delete: its new checkpoint stays
                else:
                    states.pop(stream_id, None)
                    gone[stream_id] = lsn
                    replayed.discard(stream_id)
        for lsn, owner, position, blob, where in states.values():
            check(blob, where)
        self.next_lsn = last_lsn + 1
        # Fold the log into checkpoints and start a fresh segment: the next recovery never reads a torn tail
        # followed by newer records, and the log starts empty.
        self._checkpoint_all({i: states[i][:4] for i in replayed})
        for stream_id, lsn in gone.items():
            self._unlink_checkpoint(stream_id, lsn)
        self.segment = segments[-1][0] + 1 if segments else 1
        self.fd = self._open_segment()
        _fsync_dir(d)  # the checkpoints and the new segment, before the old segments go
        for _, path in segments:
            os.unlink(path)
        _fsync_dir(d)
        return {i: (s[1], s[2]) for i, s in states.items()}

    # -- the event loop's side -------------------------------------------------------------------
    def append(self, stream_id: str, owner: str, position: int, blob: bytes) -> asyncio.Future:
        """Log the stream's new state; the future is done when it is durable (or fails with the OSError)."""
        return self._submit((STATE, stream_id, owner, position, blob))

    def delete(self, stream_id: str) -> asyncio.Future:
        return self._submit((DELETE, stream_id, "", 0, b""))

    def _submit(self, item: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((item, loop, fut))
        return fut

    def evict(self, stream_id: str) -> None:
        """Move the stream's newest state from memory to its checkpoint (in the background: ``last_state``
        answers from memory until the file is in place)."""
        self.queue.put(stream_id)  # through the writer: after the records queued before it

    def last_state(self, stream_id: str) -> bytes:
        """The stream's last durable state (OSError or LoadError when its checkpoint cannot be read)."""
        with self.lock:
            rec = self.latest.get(stream_id)
        if rec is not None:
            return rec[3]
        # Not in memory: the writer removes a state from `latest` only after its checkpoint is renamed in place.
        path = self._path(stream_id)
        with open(path, "rb") as f:
            return unpack_checkpoint(f.read(), path)[1]

    def close(self) -> None:
        """Answer what is queued, fold the log into checkpoints (a restart then replays nothing), stop."""
        self.queue.put(None)
        self.thread.join()
        self.jobs.put(None)
        self.checkpointer.join()
        if self.error is None:
            try:
                with self.lock:
                    pending = dict(self.latest)
                self._checkpoint_all(pending)
                _fsync_dir(self.directory)
                os.close(self.fd)
                self.fd = None
                os.unlink(self._segment_path(self.segment))
                _fsync_dir(self.directory)
            except OSError as exc:
                log.warning("state directory not folded into checkpoints at shutdown (the log keeps it): %s", exc)
        if self.fd is not None:
            os.close(self.fd)
        self.fsyncs.shutdown()

    # -- the writer thread -----------------------------------------------------------------------
    def _path(self, stream_id: str) -> str:
        return os.path.join(self.directory, stream_id + SUFFIX)

    def _segment_path(self, number: int) -> str:
        return os.path.join(self.directory, f"wal.{number:08d}.log")

    def _open_segment(self) -> int:
        fd = os.open(self._segment_path(self.segment), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self.size = 0
        return fd

    def _append(self, data: bytes) -> None:
        _write_all(self.fd, data)
        os.fdatasync(self.fd)
        self.size += len(data)

    def _work(self) -> None:
        stop = False
        while not stop:
            group = [self.queue.get()]
            while True:
                try:
                    group.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if None in group:
                stop = True
                group = [g for g in group if g is not None]
            self._commit(group)

    def _commit(self, group: list) -> None:
        waiting = [g for g in group if isinstance(g, tuple)]
        evicted = [g for g in group if isinstance(g, str)]
        records, lsns = [], []
        for (kind, stream_id, owner, position, blob), _, _ in waiting:
            lsns.append(self.next_lsn)
            records.append(pack_record(kind, self.next_lsn, stream_id, owner, position, blob))
            self.next_lsn += 1
        error = self.error
        if records and error is None:
            try:
                self._append(b"".join(records))
            except OSError as exc:
                # After a failed fsync the file's contents are unknown: answer nothing as durable from now on.
                log.error("the state log cannot be written, no step is answered from now on: %s", exc)
                self.error = error = exc
        if error is None:
            with self.lock:
                for ((kind, stream_id, owner, position, blob), _, _), lsn in zip(waiting, lsns):
                    if kind == STATE:
                        self.latest[stream_id] = (lsn, owner, position, blob)
                    else:
                        self.latest.pop(stream_id, None)
        # One wake-up per event loop and group (each call_soon_threadsafe writes to the loop's pipe).
        loops: dict = {}
        for _, loop, fut in waiting:
            loops.setdefault(loop, []).append(fut)
        for loop, futures in loops.items():
            try:
                loop.call_soon_threadsafe(_settle, futures, error)
            except RuntimeError:
                pass  # the event loop has stopped; nobody waits
        if error is not None:
            return
        for ((kind, stream_id, *_), _, _), lsn in zip(waiting, lsns):
            if kind == DELETE:  # only now: until the delete is durable, the checkpoint may still be needed
                self.jobs.put(("unlink", stream_id, lsn))
        for stream_id in evicted:
            self.jobs.put(("evict", stream_id))
        if self.size >= self.max_log_bytes and not self.rotating:
            try:
                self._rotate()
            except OSError as exc:
                log.error("the state log cannot start a new segment, no step is answered from now on: %s", exc)
                self.error = exc

    def _rotate(self) -> None:
        """Start a new segment; the checkpoint thread folds the old one into checkpoints and removes it."""
        self.rotating = True
        with self.lock:
            pending = dict(self.latest)  # every state the old segment holds that no checkpoint has yet
        old = (self._segment_path(self.segment), self.fd)
        self.segment += 1
        self.fd = self._open_segment()
        _fsync_dir(self.directory)  # the new segment's records are answered: its name must be durable first
        self.jobs.put(("fold", pending, old))

    # -- the checkpoint thread -------------------------------------------------------------------
    def _checkpoint_work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if job[0] == "unlink":
                    self._unlink_checkpoint(job[1], job[2])
                elif job[0] == "evict":
                    # No directory fsync: until the segment is folded the log holds this state too.
                    with self.lock:
                        rec = self.latest.get(job[1])
                    if rec is not None:
                        self._write_checkpoint(job[1], rec)
                        self._forget({job[1]: rec})
                else:
                    self._fold(*job[1:])
            except OSError as exc:
                log.error("the state directory cannot be written, no step is answered from now on: %s", exc)
                self.error = exc
                return

    def _fold(self, pending: dict, old: tuple) -> None:
        self._checkpoint_all(pending)
        _fsync_dir(self.directory)  # the checkpoints, before the segment that holds their states goes
        path, fd = old
        os.close(fd)
        os.unlink(path)
        _fsync_dir(self.directory)
        self._forget(pending)
        self.rotations += 1
        self.rotating = False

    def _forget(self, written: dict) -> None:
        """Drop states now in their checkpoints from memory, unless a newer one was logged meanwhile."""
        with self.lock:
            for stream_id, rec in written.items():
                if self.latest.get(stream_id) is rec:
                    del self.latest[stream_id]

    def _write_checkpoint(self, stream_id: str, rec: tuple) -> None:
        lsn, owner, position, blob = rec
        if self.written.get(stream_id, -1) >= lsn:
            return
        path = self._path(stream_id)
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, pack_checkpoint({"owner": owner, "position": position, "lsn": lsn}, blob))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.written[stream_id] = lsn

    def _checkpoint_all(self, pending: dict) -> None:
        for f in [self.fsyncs.submit(self._write_checkpoint, i, rec) for i, rec in pending.items()]:
            f.result()

    def _unlink_checkpoint(self, stream_id: str, lsn: int) -> None:
        """Remove the checkpoint of a stream deleted at ``lsn``, unless it holds a newer state (the same id made
        again after the delete, written by an eviction queued before it)."""
        if self.written.get(stream_id, -1) > lsn:
            return
        self.written.pop(stream_id, None)
        try:
            os.unlink(self._path(stream_id))
        except FileNotFoundError:
            pass


def _settle(futures: list, error: OSError | None) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(OSError(error.errno, error.strerror))
