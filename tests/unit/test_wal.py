"""The write-ahead log: round trips, torn-tail repair (R3/R4) and refusal on corruption (R5)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from coord_server.wal import SECTOR, Wal, WalCorrupt, encode_record

SEG = 64 * 1024  # small segments so rotation is exercised


def payload(i: int, size: int | None = None) -> bytes:
    rnd = random.Random(i)
    n = size if size is not None else rnd.randrange(1, 2000)
    return bytes(rnd.randrange(1, 256) for _ in range(n))  # no zero bytes: zeros mean "never written"


def write_log(d: Path, n: int, *, size: int | None = None) -> list[bytes]:
    w = Wal(d, segment_size=SEG)
    assert w.open(0) == []
    out = []
    for i in range(1, n + 1):
        p = payload(i, size)
        assert w.append(p) == i
        out.append(p)
    w.close()
    return out


def reopen(d: Path, applied: int = 0) -> tuple[Wal, list[bytes]]:
    w = Wal(d, segment_size=SEG)
    entries = w.open(applied)
    assert [e.index for e in entries] == list(range(applied + 1, applied + 1 + len(entries)))
    return w, [e.payload for e in entries]


def segments(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".wal"))


def last_record_span(d: Path, payloads: list[bytes]) -> tuple[Path, int, int]:
    """(segment, start offset, length) of the last record, found by re-encoding."""
    seg = segments(d)[-1]
    data = seg.read_bytes()
    rec = encode_record(len(payloads), payloads[-1])
    start = data.rindex(rec[:16])
    return seg, start, len(rec)


def test_round_trip_rotation_and_release(tmp_path: Path) -> None:
    written = write_log(tmp_path, 200)
    assert len(segments(tmp_path)) > 3, "records should span several segments"
    w, got = reopen(tmp_path)
    assert got == written
    assert w.append(b"more") == 201
    w.release(150)
    w.close()
    first_indexes = [int(p.name.split("-")[1].split(".")[0], 16) for p in segments(tmp_path)]
    assert min(first_indexes) <= 151, "records above the applied index must be kept"
    w, got = reopen(tmp_path, applied=150)
    assert got == [*written[150:], b"more"]
    w.close()


def test_open_above_applied_index_returns_only_the_rest(tmp_path: Path) -> None:
    written = write_log(tmp_path, 10)
    w, got = reopen(tmp_path, applied=7)
    assert got == written[7:]
    assert w.append(b"x") == 11
    w.close()


@pytest.mark.parametrize("keep", [16, 17, 100, SECTOR, SECTOR + 1, 1500])
def test_torn_last_record_is_dropped_and_kept_as_broken(tmp_path: Path, keep: int) -> None:
    written = write_log(tmp_path, 20, size=3000)
    seg, start, length = last_record_span(tmp_path, written)
    with open(seg, "r+b") as f:  # the crash persisted only the first `keep` bytes of the record
        f.seek(start + keep)
        f.write(b"\0" * (length - keep))
    w, got = reopen(tmp_path)
    assert got == written[:-1], "only the torn record is lost; it was never acknowledged"
    assert w.repaired is not None and w.repaired.exists()
    assert w.append(b"after repair") == 20
    w.close()
    w, got = reopen(tmp_path)
    assert got == [*written[:-1], b"after repair"]
    assert w.repaired is None, "a repaired log opens cleanly"
    w.close()


def test_every_truncation_of_the_last_record_recovers(tmp_path: Path) -> None:
    """R4: the file cut at every byte k (1..L-1) of the last record, and the record zeroed from every
    sector boundary inside it (sectors are the unit a power loss drops): the prefix is always
    recovered with exactly one repair."""
    base = tmp_path / "base"
    written = write_log(base, 5, size=1400)
    seg, start, length = last_record_span(base, written)
    original = seg.read_bytes()
    cuts = [("truncate", k) for k in range(1, length)]
    cuts += [("zero", b - start) for b in range(start - start % SECTOR + SECTOR, start + length, SECTOR)]
    for how, k in cuts:
        d = tmp_path / "case"
        d.mkdir()
        data = original[: start + k] if how == "truncate" else (
            original[: start + k] + bytes(len(original) - start - k))
        (d / seg.name).write_bytes(data)
        w = Wal(d, segment_size=SEG)
        got = [e.payload for e in w.open(0)]
        assert got == written[:-1], f"{how} at {k}: got {len(got)} records"
        assert w.repaired is not None
        assert w.append(b"next") == 5
        w.close()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_bit_flip_in_an_older_record_refuses_to_start(tmp_path: Path) -> None:
    written = write_log(tmp_path, 30, size=400)
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    rec = encode_record(len(written) - 5, written[-6])
    pos = bytes(data).index(rec[:16]) + 16 + 50
    data[pos] ^= 0x10
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorrupt, match="CRC mismatch"):
        Wal(tmp_path, segment_size=SEG).open(0)


def test_bit_flip_in_the_last_record_without_zero_sector_refuses(tmp_path: Path) -> None:
    written = write_log(tmp_path, 10, size=300)
    seg, start, _ = last_record_span(tmp_path, written)
    data = bytearray(seg.read_bytes())
    data[start + 20] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorrupt):
        Wal(tmp_path, segment_size=SEG).open(0)


def test_damage_in_a_non_final_segment_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, 200)
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(WalCorrupt):
        Wal(tmp_path, segment_size=SEG).open(0)


def test_random_bit_flips_never_start_silently_with_divergent_state(tmp_path: Path) -> None:
    """R5: 100 single-bit flips anywhere in the written area: refuse, or recover an exact prefix via a
    logged repair of the final record; never return altered data."""
    base = tmp_path / "base"
    written = write_log(base, 40, size=900)
    segs = segments(base)
    originals = {p.name: p.read_bytes() for p in segs}
    rnd = random.Random(1234)
    refused = repaired = 0
    for trial in range(100):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        victim = rnd.choice(segs).name
        for name, data in originals.items():
            buf = bytearray(data)
            if name == victim:
                used = len(data.rstrip(b"\0"))
                pos = rnd.randrange(used)
                buf[pos] ^= 1 << rnd.randrange(8)
            (d / name).write_bytes(bytes(buf))
        w = Wal(d, segment_size=SEG)
        try:
            got = [e.payload for e in w.open(0)]
        except WalCorrupt:
            refused += 1
        else:
            assert got == written[: len(got)], "recovered data must be an exact prefix"
            assert len(got) == len(written) or w.repaired is not None
            repaired += len(got) < len(written)
            w.close()
    print(f"bit flips: refused={refused} repaired-tail={repaired} of 100")
    assert refused >= 90


def test_garbage_after_the_last_record_is_zeroed(tmp_path: Path) -> None:
    written = write_log(tmp_path, 3, size=100)
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    end = len(bytes(data).rstrip(b"\0"))
    pad = (end + 7) & ~7
    data[pad + 4096 : pad + 4100] = b"junk"  # a later sector persisted before the header's sector
    seg.write_bytes(bytes(data))
    w, got = reopen(tmp_path)
    assert got == written and w.repaired is not None
    w.close()
    assert not any(seg.read_bytes()[pad:])


def test_log_behind_backend_gap_is_refused(tmp_path: Path) -> None:
    write_log(tmp_path, 5)
    first = segments(tmp_path)[0]
    os.rename(first, first.with_name(f"{0:016x}-{3:016x}.wal"))
    with pytest.raises(WalCorrupt):
        Wal(tmp_path, segment_size=SEG).open(0)
