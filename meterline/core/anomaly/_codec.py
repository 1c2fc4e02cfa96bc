"""Fixed-size arrays of detector state as short, portable text (little-endian base64).

The season factors are float32 in memory *and* on disk: the arithmetic rounds each stored
factor to float32 as it learns, so saving and restoring changes nothing and a restored
detector continues bit for bit.
"""

from __future__ import annotations

import base64
import sys
from array import array

from meterline.core.anomaly.errors import AnomalyError


def pack(values: array) -> str:
    if sys.byteorder == "big":  # saved state is little-endian everywhere
        values = array(values.typecode, values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def unpack(typecode: str, text: str, length: int) -> array:
    values = array(typecode)
    try:
        values.frombytes(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, AttributeError) as exc:
        raise AnomalyError(f"bad saved array: {exc}") from None
    if sys.byteorder == "big":
        values.byteswap()
    if len(values) != length:
        raise AnomalyError(f"saved array has {len(values)} values, expected {length}")
    return values
