"""Key placement on parameter-server shards.

The rules are part of the API, so that clients in any language agree:

- shard(key) = CRC-32 (IEEE 802.3, as zlib.crc32) of the key's UTF-8 bytes,
  modulo the shard count.
- A large key may be split by rows across all n shards: part i holds rows
  [floor(i*R/n), floor((i+1)*R/n)) of the R rows, is named `<key>:part<i>of<n>`,
  and lives on shard i (not on its hash). Each part is an ordinary key with
  its own optimizer state and version; the key's version is the lowest.
"""

from __future__ import annotations

import re
import zlib

_PART = re.compile(r"(.+):part(\d+)of(\d+)")


def shard_of(key: str, num_shards: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % num_shards


def part_name(key: str, index: int, parts: int) -> str:
    return f"{key}:part{index}of{parts}"


def parse_part(name: str) -> tuple[str, int, int] | None:
    """(key, index, parts) if `name` is a part of a split key."""
    match = _PART.fullmatch(name)
    return (match[1], int(match[2]), int(match[3])) if match else None


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    return [(i * rows // parts, (i + 1) * rows // parts) for i in range(parts)]
