"""Key placement on parameter-server shards.

The rule is part of the API, so that clients in any language agree:
shard(key) = CRC-32 (IEEE 802.3, as zlib.crc32) of the key's UTF-8 bytes, modulo the shard count.
"""

from __future__ import annotations

import zlib


def shard_of(key: str, num_shards: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % num_shards
