"""The write-ahead journal: plain file I/O in a temporary directory, and a real dead owner."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.outbox import (
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    DataObjectRecord,
    Outbox,
    Record,
    RunDataRequestRecord,
    complete_lines,
    decode,
    encode,
    new_id,
)
from tests.harness import wait_for

AWKWARD_BYTES = b'{"a": "line one\nline two"}\r\n\x00\xff\xfe\x80 not utf-8 \n\n'


def read_segment(path: Path) -> list[Record]:
    """A segment's records, read with the pieces the writer uses."""
    return [decode(line) for line in complete_lines(path.read_bytes())]


def data_object(value: bytes = AWKWARD_BYTES) -> DataObjectRecord:
    return DataObjectRecord(
        data_object_id=uuid.uuid4(),
        data_source_id=uuid.uuid4(),
        key="0123456789abcdef0123456789abcdef",
        value=value,
        created_at=1_700_000_000.123456,
    )


def audit_row(error: dict[str, object] | None = None) -> RunDataRequestRecord:
    failed = error is not None
    return RunDataRequestRecord(
        run_data_request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        data_object_id=None if failed else uuid.uuid4(),
        data_source_id=uuid.uuid4(),
        data_origin=None if failed else "REQUEST",
        start_time=None if failed else 1_700_000_000.5,
        end_time=None if failed else 1_700_000_000.75,
        error=error,
        created_at=1_700_000_001.25,
    )


ERROR = {
    "code": "HTTP_ERROR",
    "message": "upstream answered 503 — ünïcode\nand a newline",
    "upstream_status": 503,
    "details": {"nested": [1, 2.5, None, True]},
}


def segments(directory: Path, suffix: str = "") -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffix))


def test_encode_decode_round_trip() -> None:
    paid = replace(audit_row(), cost_amount="0.35", cost_currency="USD")
    replayed = replace(audit_row(), replay="AS_OF")
    for record in (data_object(), audit_row(), audit_row(ERROR), paid, replayed):
        line = encode(record)
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        assert decode(line) == record


def test_append_seal_claim_read_round_trip(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    first: list[Record] = [data_object(), audit_row()]
    second: list[Record] = [audit_row(ERROR), data_object(b""), data_object(bytes(range(256)))]
    outbox.append(*first)
    outbox.append(*second)
    assert segments(tmp_path, SEALED_SUFFIX) == []

    outbox.seal()

    sealed = segments(tmp_path, SEALED_SUFFIX)
    assert len(sealed) == 1
    assert len(segments(tmp_path, OPEN_SUFFIX)) == 1  # a fresh segment for what comes next
    with outbox.claim() as claimed:
        assert claimed == sealed
        assert read_segment(claimed[0]) == first + second
        for path in claimed:
            outbox.remove(path)
    assert segments(tmp_path, SEALED_SUFFIX) == []
    outbox.close()


def test_seal_with_nothing_written_does_nothing(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    before = segments(tmp_path)

    outbox.seal()

    assert segments(tmp_path) == before
    assert [p.suffix for p in before] == [OPEN_SUFFIX]
    with outbox.claim() as claimed:
        assert claimed == []
    outbox.close()


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    outbox.close()
    with pytest.raises(RuntimeError):
        outbox.append(audit_row())


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    whole: list[Record] = [data_object(), audit_row(ERROR)]
    torn = encode(audit_row())
    path = tmp_path / f"00000000000000000001-1-abcdef01{SEALED_SUFFIX}"
    path.write_bytes(b"".join(encode(r) for r in whole) + torn[: len(torn) // 2])

    assert read_segment(path) == whole


def test_close_removes_an_empty_segment(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    assert len(segments(tmp_path, OPEN_SUFFIX)) == 1

    outbox.close()

    assert segments(tmp_path) == []


def test_close_seals_a_non_empty_segment(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    records: list[Record] = [data_object(), audit_row()]
    outbox.append(*records)

    outbox.close()

    sealed = segments(tmp_path)
    assert [p.suffix for p in sealed] == [SEALED_SUFFIX]
    assert read_segment(sealed[0]) == records
    with Outbox(tmp_path).claim() as claimed:
        assert claimed == sealed


def test_claim_skips_segments_held_in_this_process(tmp_path: Path) -> None:
    """flock is per open file: another Outbox, even in this process, cannot take them."""
    writer, shipper = Outbox(tmp_path), Outbox(tmp_path)
    writer.open()
    writer.append(audit_row())
    with shipper.claim() as claimed:
        assert claimed == []  # the writer's open segment is locked
    writer.seal()
    with shipper.claim() as claimed:
        assert len(claimed) == 1
        with Outbox(tmp_path).claim() as again:
            assert again == []  # a claimed segment is never claimed twice
    writer.close()


OWNER = """
import pathlib, signal, sys, uuid
from proxy.outbox import Outbox, RunDataRequestRecord
directory = pathlib.Path(sys.argv[1])
outbox = Outbox(directory)
outbox.open()
for i in range(int(sys.argv[2])):
    outbox.append(RunDataRequestRecord(
        uuid.UUID(int=i), uuid.UUID(int=1000 + i), None, uuid.UUID(int=7),
        "REQUEST", float(i), float(i) + 0.5, None, 1_700_000_000.0 + i,
    ))
(directory.parent / "ready").touch()
signal.pause()
"""


def test_claim_skips_a_live_owner_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    count = 25
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(directory), str(count)],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        wait_for(lambda: (tmp_path / "ready").exists() or owner.poll() is not None, timeout=20)
        assert owner.poll() is None, "the owner process died before it was killed"
        [open_segment] = segments(directory)
        assert open_segment.suffix == OPEN_SUFFIX

        outbox = Outbox(directory)
        with outbox.claim() as claimed:
            assert claimed == []  # a live process holds it
        assert segments(directory) == [open_segment]

        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=20)

        with outbox.claim() as claimed:
            assert claimed == [open_segment.with_suffix(SEALED_SUFFIX)]
            records = read_segment(claimed[0])
        assert records == [
            RunDataRequestRecord(
                uuid.UUID(int=i),
                uuid.UUID(int=1000 + i),
                None,
                uuid.UUID(int=7),
                "REQUEST",
                float(i),
                float(i) + 0.5,
                None,
                1_700_000_000.0 + i,
            )
            for i in range(count)
        ]
        assert segments(directory) == [open_segment.with_suffix(SEALED_SUFFIX)]
    finally:
        owner.kill()
        owner.wait(timeout=20)


def test_pending_bytes_counts_every_segment(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.open()
    record = data_object()
    outbox.append(record)
    outbox.seal()
    outbox.append(record, record)
    assert outbox.pending_bytes() == 3 * len(encode(record))
    outbox.close()
    assert len(segments(tmp_path, SEALED_SUFFIX)) == 2
    assert outbox.pending_bytes() == 3 * len(encode(record))


def test_new_id_is_a_random_version_4_uuid() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:500]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
