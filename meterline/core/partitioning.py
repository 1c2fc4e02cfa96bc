"""Customer -> Kafka partition, identical to Kafka's default key partitioner.

All of a customer's events must land on one partition so that dedupe and window state for
that customer live in one worker. We pick the partition ourselves (batches carry many
customers, so the record key cannot do it) using Kafka's own murmur2 hash, so a Java or Go
producer keyed by customer id agrees with us.
"""

from __future__ import annotations

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed int32."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    end = length - (length % 4)
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length % 4
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(customer: str, partitions: int) -> int:
    """Partition of a customer's events among `partitions` (Kafka: toPositive(murmur2) % n)."""
    return (murmur2(customer.encode("utf-8")) & 0x7FFFFFFF) % partitions
