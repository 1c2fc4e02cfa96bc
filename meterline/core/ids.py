"""Time-ordered unique ids (ULID layout: 48-bit ms timestamp + 80 random bits, Crockford
base32, 26 characters). Lexicographic order follows creation time, which keeps ClickHouse
ORDER BY keys and spool replays in emission order.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def new_id(now_ms: int | None = None) -> str:
    """A new ULID. Monotonic within the process: ids made in the same ms increment the
    random part instead of drawing a new one, so they still sort in creation order."""
    global _last_ms, _last_rand
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _last_rand += 1
        else:
            _last_ms = ms
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom to increment
        rand = _last_rand
    return _encode(ms, 10) + _encode(rand, 16)


def id_timestamp_ms(ulid: str) -> int:
    """The creation time (UTC ms) encoded in a ULID."""
    value = 0
    for ch in ulid[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
