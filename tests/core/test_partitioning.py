"""Customer -> partition must agree with Kafka's default partitioner (murmur2)."""

from __future__ import annotations

import collections

import pytest

from meterline.core.partitioning import murmur2, partition_for


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # org.apache.kafka.common.utils.UtilsTest#testMurmur2
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (bytes([ord("a"), ord("b"), ord("c")]), 479470107),
        (b"", 275646681),
    ],
)
def test_murmur2_matches_kafka_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_murmur2_is_signed_int32_for_every_tail_length() -> None:
    for n in range(0, 40):
        h = murmur2(bytes(range(n)))
        assert -(2**31) <= h < 2**31


def test_partition_uses_utf8_bytes_and_to_positive() -> None:
    customer = "kunde-ä"
    h = murmur2(customer.encode("utf-8"))
    assert partition_for(customer, 12) == (h & 0x7FFFFFFF) % 12
    # "21" hashes negative: toPositive masks the sign bit, it does not take abs().
    assert partition_for("21", 7) == (-973932308 & 0x7FFFFFFF) % 7
    assert abs(-973932308) % 7 != (-973932308 & 0x7FFFFFFF) % 7


@pytest.mark.parametrize("partitions", [1, 2, 3, 12, 64])
def test_partition_in_range_and_stable(partitions: int) -> None:
    for i in range(500):
        customer = f"cust-{i}"
        p = partition_for(customer, partitions)
        assert 0 <= p < partitions
        assert p == partition_for(customer, partitions)


@pytest.mark.parametrize("partitions", [4, 12, 32])
def test_distribution_is_sane(partitions: int) -> None:
    n = 20_000
    counts = collections.Counter(partition_for(f"customer-{i}", partitions) for i in range(n))
    assert set(counts) == set(range(partitions))
    mean = n / partitions
    # Random assignment gives a standard deviation of ~sqrt(mean); 6 sigma is generous.
    tolerance = 6 * mean**0.5
    assert max(counts.values()) < mean + tolerance, counts
    assert min(counts.values()) > mean - tolerance, counts
