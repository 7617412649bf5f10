"""A local write-ahead journal for DataObjects and audit rows.

Records are appended to the process's open segment file before the response
leaves, one ``os.write`` per request: that survives ``kill -9`` of the process
(the bytes are in the page cache), not a crash of the machine. The writer
(proxy.writer) seals segments and ships them to the database.

Each segment is owned through ``flock``: the open one by the process writing
it, a sealed one by the process shipping it. A lock held by a dead process is
released by the kernel, so a segment orphaned by a crash is picked up by the
next process that scans the directory, and never by two at once.
"""

from __future__ import annotations

import base64
import fcntl
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

OPEN_SUFFIX = ".open"
SEALED_SUFFIX = ".sealed"


@dataclass(frozen=True, slots=True)
class DataObjectRecord:
    # Text or UUID, as the audit row's ids: a miss makes its id as text (``new_id``).
    data_object_id: uuid.UUID | str
    data_source_id: uuid.UUID
    key: str
    value: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class RunDataRequestRecord:
    # Ids may be given as text: a hit's row is built from strings it already holds,
    # and parsing them into UUIDs only to print them again is a hot-path cost.
    run_data_request_id: uuid.UUID | str
    run_id: uuid.UUID
    data_object_id: uuid.UUID | str | None
    data_source_id: uuid.UUID
    data_origin: str | None
    start_time: float | None
    end_time: float | None
    error: dict[str, Any] | None
    created_at: float
    # An upstream call's price (decimal text, as the source declares it) and currency.
    cost_amount: str | None = None
    cost_currency: str | None = None
    # What a replayed request looked up by; None for every other request.
    replay: str | None = None


Record = DataObjectRecord | RunDataRequestRecord

# Ids need uniqueness, not secrecy: a per-process generator seeded from the OS
# (and reseeded in a forked child, which would otherwise repeat its parent's ids)
# makes one in ~1 µs where uuid4() costs a syscall and a UUID object.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
_VERSION_4 = (0x4 << 76) | (0x2 << 62)
_VARIANT_MASK = ~((0xF << 76) | (0x3 << 62))


def new_id() -> str:
    """A random (version 4) UUID as text."""
    h = "%032x" % (_ids.getrandbits(128) & _VARIANT_MASK | _VERSION_4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def encode(record: Record) -> bytes:
    """One journal line; orjson never emits a raw newline.

    Ids go through ``str``: drivers hand back UUID subclasses orjson refuses.
    """
    if isinstance(record, DataObjectRecord):
        fields: dict[str, Any] = {
            "t": "o",
            "id": str(record.data_object_id),
            "s": str(record.data_source_id),
            "k": record.key,
            "v": base64.b64encode(record.value).decode(),
            "c": record.created_at,
        }
    else:
        fields = {
            "t": "r",
            "id": str(record.run_data_request_id),
            "run": str(record.run_id),
            "o": None if record.data_object_id is None else str(record.data_object_id),
            "s": str(record.data_source_id),
            "g": record.data_origin,
            "st": record.start_time,
            "et": record.end_time,
            # As JSON text: the database reads it as JSON, with nothing to unescape.
            "e": None if record.error is None else orjson.dumps(record.error).decode(),
            "c": record.created_at,
        }
        # Absent rather than null when unset: most rows are hits, and a hit's line is the hot path's.
        if record.cost_amount is not None:
            fields["ca"], fields["cc"] = record.cost_amount, record.cost_currency
        if record.replay is not None:
            fields["rp"] = record.replay
    return orjson.dumps(fields) + b"\n"


def decode(line: bytes) -> Record:
    f = orjson.loads(line)
    if f["t"] == "o":
        return DataObjectRecord(
            uuid.UUID(f["id"]), uuid.UUID(f["s"]), f["k"], base64.b64decode(f["v"]), f["c"]
        )
    return RunDataRequestRecord(
        uuid.UUID(f["id"]),
        uuid.UUID(f["run"]),
        None if f["o"] is None else uuid.UUID(f["o"]),
        uuid.UUID(f["s"]),
        f["g"],
        f["st"],
        f["et"],
        orjson.loads(f["e"]) if isinstance(f["e"], str) else f["e"],
        f["c"],
        f.get("ca"),
        f.get("cc"),
        f.get("rp"),
    )


def complete(data: bytes) -> bytes:
    """A segment's bytes up to its last newline.

    A last line without its newline is a write torn by a crash: its response
    never left (the append precedes the answer), so it is dropped.
    """
    return data[: data.rfind(b"\n") + 1]


def complete_lines(data: bytes) -> list[bytes]:
    """The journal lines of a segment's complete bytes, each one record."""
    return [line for line in complete(data).split(b"\n") if line]


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._path: Path | None = None
        self._written = 0
        self.appended_bytes = 0
        """Every byte this process ever journaled: lets the backlog be known between scans."""

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self._new_path()
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._written = 0

    def append(self, *records: Record) -> None:
        """Journal records with a single write, so one request's rows land together."""
        if self._fd is None:
            raise RuntimeError("outbox is not open")
        data = b"".join(encode(r) for r in records)
        if self._written == 0:
            self._restamp()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._written += len(data)
        self.appended_bytes += len(data)

    def _new_path(self) -> Path:
        """Named after the time it is made: segments sort by age."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{OPEN_SUFFIX}"
        return self.directory / name

    def _restamp(self) -> None:
        """Rename the open segment, still empty, after now: the time of its first record.

        An empty segment may wait idle for hours; renamed as its first record comes,
        a segment's name says how old its oldest record is (``oldest_record_time``).
        Once per segment, not per record. Another process that listed the old name
        finds it gone, as after a shipment.
        """
        assert self._path is not None
        path = self._new_path()
        os.rename(self._path, path)
        self._path = path

    def seal(self) -> None:
        """Close the open segment for shipping and start a fresh one (if it holds anything)."""
        if self._fd is None or self._path is None or self._written == 0:
            return
        os.rename(self._path, self._path.with_suffix(SEALED_SUFFIX))
        os.close(self._fd)
        self.open()

    def close(self) -> None:
        """Seal what was written and release the segment; an empty one is removed."""
        if self._fd is None or self._path is None:
            return
        if self._written:
            os.rename(self._path, self._path.with_suffix(SEALED_SUFFIX))
        else:
            self._path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = self._path = None

    def pending_bytes(self) -> int:
        """Bytes journaled and not yet shipped, across every process sharing the directory."""
        total = 0
        for path in self._segments():
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # shipped between the listing and the stat
                continue
        return total

    def oldest_record_time(self) -> float | None:
        """When the oldest record not yet shipped was journaled (epoch seconds), across
        every process sharing the directory; None if there is none."""
        for path in self._segments():  # oldest first
            try:
                if path.stat().st_size == 0:  # an open segment nothing was written to yet
                    continue
            except FileNotFoundError:  # shipped meanwhile
                continue
            return int(path.name.split("-", 1)[0]) / 1e9
        return None

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob("*-*-*.*"))

    @contextmanager
    def claim(self) -> Iterator[list[Path]]:
        """Lock every segment no live process holds; sealed from here on.

        Yields the claimed paths; the caller ships them and calls ``remove``.
        Open segments of dead processes are sealed on the way.
        """
        claimed: list[tuple[int, Path]] = []
        try:
            for path in self._segments():
                if path == self._path:
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # shipped by another process meanwhile
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if not path.exists():  # removed between our open and our lock
                    os.close(fd)
                    continue
                if path.suffix == OPEN_SUFFIX:
                    sealed = path.with_suffix(SEALED_SUFFIX)
                    os.rename(path, sealed)
                    path = sealed
                claimed.append((fd, path))
            yield [path for _, path in claimed]
        finally:
            for fd, _ in claimed:
                os.close(fd)

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)
