"""The write-ahead log in front of the LMDB backend: one synced append per write batch.

Why it exists: a synced LMDB commit flushes data pages, then the meta page (two
syncs, ≈300 µs here); an append to a preallocated log is one ``fdatasync``
(≈130 µs). The writer acknowledges a batch once its log record is synced and
commits to LMDB lazily (every 100 ms or so); at start-up the records above
LMDB's applied index are replayed. This is etcd's split (WAL + batched bbolt
commits), with etcd's crash rules:

- **Format.** Segments ``<seq:016x>-<first index:016x>.wal`` of ``SEGMENT_SIZE``
  bytes, preallocated and zero-filled past the last record. A record is a
  16-byte header ``index u64 | length u32 | crc32c u32`` then the payload,
  padded with zeros to 8 bytes. The CRC covers the index, the length and the
  payload; indexes increase by exactly one.
- **Torn tail.** A bad record in the *last* segment whose span contains an
  all-zero 512-byte sector (or runs past the end of the file) is a write that
  was cut short by a crash; it was never acknowledged (acks follow the sync).
  The segment is copied to ``.broken``, the record and everything after it are
  zeroed, and the start goes on. Repair happens at most once per start.
- **Corruption.** Any other bad record (a CRC mismatch with no zero sector, a
  gap in indexes, damage in an older segment) stops the start-up with
  :class:`WalCorrupt`: silently dropping acknowledged data is not an option.

Blocking file I/O: the writer calls :meth:`Wal.append` on the loop only for a
lone write under light load, otherwise in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import crc32c

from ._fs import fsync_dir

log = logging.getLogger("coord_server.wal")

SEGMENT_SIZE = 64 * 1024 * 1024
SECTOR = 512
_HEADER = struct.Struct("<QII")  # index, payload length, crc32c
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")


class WalError(Exception):
    """The log cannot be written: the server must stop."""


class WalCorrupt(WalError):
    """The log is damaged in a way that is not a torn final write: refuse to start."""


def _pad(n: int) -> int:
    return (n + 7) & ~7


def _crc(index: int, length: int, payload: bytes) -> int:
    return crc32c.crc32c(payload, crc32c.crc32c(struct.pack("<QI", index, length)))


def encode_record(index: int, payload: bytes) -> bytes:
    body = _HEADER.pack(index, len(payload), _crc(index, len(payload), payload)) + payload
    return body + b"\0" * (_pad(len(body)) - len(body))


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    payload: bytes


@dataclass(slots=True)
class _Segment:
    path: Path
    seq: int
    first_index: int



def _is_torn_tail(data: bytes, off: int) -> bool:
    """Is the bad record at ``off`` a write cut short by a crash (etcd's isTornEntry, tightened)?

    Appends are sequential into a zero-filled segment, so a torn final write leaves the
    record's first sectors written and everything from some sector boundary inside it to
    the end of the file zero. A bad record with non-zero bytes after its end, or with no
    all-zero sector inside it, is corruption.
    """
    if off + _HEADER.size > len(data):
        return True
    _, length, _ = _HEADER.unpack_from(data, off)
    rec_end = off + _HEADER.size + int(length)
    if rec_end > len(data):
        return True
    last_nonzero = len(data.rstrip(b"\0"))
    zero_from = -(-last_nonzero // SECTOR) * SECTOR
    return zero_from < rec_end


def _scan(data: bytes, expect_index: int | None) -> tuple[list[Entry], int, str | None]:
    """Decode records from the start of a segment.

    Returns (entries, offset of the first byte after the last good record, problem).
    ``problem`` is None at a clean end (zero header or end of file), else a description
    of the bad record found at the returned offset.
    """
    entries: list[Entry] = []
    off = 0
    while off + _HEADER.size <= len(data):
        index, length, crc = _HEADER.unpack_from(data, off)
        if index == 0 and length == 0 and crc == 0:
            return entries, off, None
        end = off + _HEADER.size + length
        if end > len(data):
            return entries, off, f"record at offset {off} runs past the end of the segment"
        payload = data[off + _HEADER.size : end]
        if _crc(index, length, payload) != crc:
            return entries, off, f"CRC mismatch in record at offset {off}"
        if expect_index is not None and index != expect_index:
            return entries, off, f"record at offset {off} has index {index}, expected {expect_index}"
        entries.append(Entry(index, payload))
        expect_index = index + 1
        off = _pad(end)
    return entries, off, None


class Wal:
    """An open log directory, ready for appends after :meth:`open` recovered it."""

    def __init__(self, directory: Path, *, segment_size: int = SEGMENT_SIZE) -> None:
        self.dir = directory
        self.segment_size = segment_size
        self._fd = -1
        self._segment: _Segment | None = None
        self._offset = 0
        self.last_index = 0
        self.repaired: Path | None = None
        self._segments: list[_Segment] = []
        # release() runs in a worker thread beside appends that may add a segment.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ recovery

    def open(self, applied_index: int) -> list[Entry]:
        """Recover the log; return every entry above ``applied_index``, oldest first.

        Repairs a torn tail once; raises :class:`WalCorrupt` for anything else.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):
            stale.unlink()
        segs = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                segs.append(_Segment(p, int(m.group(1), 16), int(m.group(2), 16)))
        segs.sort(key=lambda s: s.seq)
        out: list[Entry] = []
        expect: int | None = None
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            data = seg.path.read_bytes()
            if expect is not None and seg.first_index != expect:
                raise WalCorrupt(f"{seg.path.name}: starts at index {seg.first_index}, expected {expect}")
            entries, end, problem = _scan(data, seg.first_index if expect is None else expect)
            if entries and entries[0].index != seg.first_index:
                raise WalCorrupt(f"{seg.path.name}: first record has index {entries[0].index}")
            if problem is not None:
                if not last or not _is_torn_tail(data, end):
                    raise WalCorrupt(f"{seg.path.name}: {problem}")
                self._repair(seg, end, problem)
            elif last and any(data[end:]):
                # Bytes after a clean end: a torn header. Zero them so later appends start clean.
                self._repair(seg, end, "garbage after the last record")
            if entries:
                expect = entries[-1].index + 1
                self.last_index = entries[-1].index
            else:
                expect = seg.first_index
                self.last_index = seg.first_index - 1
            out.extend(e for e in entries if e.index > applied_index)
            if last:
                self._segment = seg
                self._offset = end
        self._segments = segs
        if self._segment is None:
            self.last_index = applied_index
            self._create_segment(1, applied_index + 1)
        else:
            self._fd = os.open(self._segment.path, os.O_RDWR)
        if out and out[0].index != applied_index + 1:
            raise WalCorrupt(f"log starts at index {out[0].index} but the backend applied only {applied_index}")
        if not out and self.last_index < applied_index:
            # The backend is ahead of the log (the log's tail was released): continue after it.
            self.last_index = applied_index
        return out

    def _repair(self, seg: _Segment, offset: int, problem: str) -> None:
        if self.repaired is not None:
            raise WalCorrupt(f"{seg.path.name}: {problem} (a second repair in one start)")
        broken = seg.path.with_name(seg.path.name + ".broken")
        shutil.copyfile(seg.path, broken)
        with open(seg.path, "r+b") as f:
            f.seek(offset)
            size = os.fstat(f.fileno()).st_size
            f.write(b"\0" * (max(size, self.segment_size) - offset))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.dir)
        self.repaired = broken
        log.warning("repaired torn write in %s at offset %d (%s); original kept as %s",
                    seg.path.name, offset, problem, broken.name)

    # ------------------------------------------------------------------ appends

    def _create_segment(self, seq: int, first_index: int) -> None:
        name = f"{seq:016x}-{first_index:016x}.wal"
        tmp = self.dir / (name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.segment_size)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        path = self.dir / name
        os.replace(tmp, path)
        fsync_dir(self.dir)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        seg = _Segment(path, seq, first_index)
        with self._lock:
            self._segments.append(seg)
        self._segment = seg
        self._offset = 0

    def append(self, payload: bytes) -> int:
        """Write one record and ``fdatasync`` it; returns its index.

        Raises :class:`WalError` on any I/O failure (the caller must stop).
        """
        index = self.last_index + 1
        rec = encode_record(index, payload)
        try:
            assert self._segment is not None
            if self._offset + len(rec) + _HEADER.size > self.segment_size:
                if len(rec) + _HEADER.size > self.segment_size:
                    raise WalError(f"record of {len(rec)} bytes exceeds the segment size")
                self._create_segment(self._segment.seq + 1, index)
            os.pwrite(self._fd, rec, self._offset)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise WalError(f"log write failed: {exc}") from exc
        self._offset += len(rec)
        self.last_index = index
        return index

    def release(self, applied_index: int) -> None:
        """Delete segments whose every record is at or below ``applied_index`` (never the live one)."""
        with self._lock:
            segs = self._segments
            keep_from = 0
            for i in range(len(segs) - 1):
                if segs[i + 1].first_index <= applied_index + 1:
                    keep_from = i + 1
            doomed = segs[:keep_from]
            del segs[:keep_from]
        for seg in doomed:
            seg.path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.dir)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
