import asyncio
import os

from nanodist.services.parameter_server import wal


def write_records(directory: str, payloads: list[bytes], rotate_after: int | None = None) -> None:
    async def main() -> None:
        log = wal.WriteAheadLog(directory, 0)
        for i, payload in enumerate(payloads):
            await log.append(wal.PUSH, payload)
            if rotate_after is not None and i + 1 == rotate_after:
                log.rotate()
        await log.close()

    asyncio.run(main())


def test_records_come_back_in_order_across_segments(tmp_path):
    payloads = [bytes([i]) * (i + 1) for i in range(10)]
    write_records(str(tmp_path), payloads, rotate_after=4)
    assert wal.segments(str(tmp_path)) == [0, 4]
    assert [r.payload for r in wal.read(str(tmp_path), 0)] == payloads
    assert [r.lsn for r in wal.read(str(tmp_path), 6)] == [6, 7, 8, 9]


def test_a_torn_tail_ends_the_log_and_is_truncated(tmp_path):
    write_records(str(tmp_path), [b"one", b"two", b"three"])
    path = tmp_path / "wal-0000000000000000.log"
    intact = path.stat().st_size
    with open(path, "ab") as f:
        f.write(wal.HEADER.pack(wal.PUSH, 1000, 0) + b"partial")  # a crash mid-write
    assert [r.payload for r in wal.read(str(tmp_path), 0)] == [b"one", b"two", b"three"]
    assert path.stat().st_size == intact


def test_a_corrupt_record_is_not_replayed(tmp_path):
    write_records(str(tmp_path), [b"one", b"two"])
    path = tmp_path / "wal-0000000000000000.log"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [r.payload for r in wal.read(str(tmp_path), 0)] == [b"one"]


def test_prune_keeps_the_segments_a_checkpoint_still_needs(tmp_path):
    write_records(str(tmp_path), [b"a", b"b", b"c"], rotate_after=2)

    async def prune() -> None:
        log = wal.WriteAheadLog(str(tmp_path), 3)
        log.prune(2)
        await log.close()

    asyncio.run(prune())
    assert sorted(os.listdir(tmp_path)) == ["wal-0000000000000002.log", "wal-0000000000000003.log"]
