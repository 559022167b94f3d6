"""Throughput of the CRDT types (merge, encode, decode, one operation) and ORSet size vs history.

    PYTHONPATH=. python -m pytest bench/test_bench_crdt.py --benchmark-only \\
        --benchmark-columns=min,median,ops

CI runs it with ``--benchmark-disable`` (each body once, as a smoke test).
The states are sized like one user's data: a badge counter written from 5
datacenters, 100 pinned conversations or tags, an 8-field settings document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from syncstore.crdt import (
    CRDT,
    CRDTMap,
    GCounter,
    LWWRegister,
    MaxRegister,
    ORSet,
    PNCounter,
    Stamp,
)

REPLICAS = (11, 22, 33, 44, 55)


def _counters(kind: type[GCounter | PNCounter]) -> tuple[CRDT, CRDT]:
    a = b = kind()
    for i, r in enumerate(REPLICAS):
        a = a.increment(r, 1_000 + i)
        b = b.increment(r, 1_000 + 2 * i)
    if kind is PNCounter:
        a, b = a.decrement(11, 7), b.decrement(22, 9)
    return a, b


def _orsets() -> tuple[ORSet, ORSet]:
    base = ORSet()
    for i in range(100):
        base = base.add(REPLICAS[i % 3], f"conv-{i:04d}")
    a, b = base, base
    for i in range(5):  # diverge: each side adds and removes a few
        a = a.add(11, f"new-a-{i}").remove(f"conv-{i:04d}")
        b = b.add(22, f"new-b-{i}").remove(f"conv-{50 + i:04d}")
    return a, b


def _maps() -> tuple[CRDTMap, CRDTMap]:
    def doc(r: int, t: int) -> CRDTMap:
        return (
            CRDTMap()
            .update(r, "badge", PNCounter, lambda c: c.increment(r, 3))
            .update(r, "sent", GCounter, lambda c: c.increment(r, 40))
            .update(r, "muted", LWWRegister, lambda x: x.assign(0, Stamp(t, 0, r)))
            .update(r, "draft", LWWRegister, lambda x: x.assign("see you at 8", Stamp(t, 1, r)))
            .update(r, "read", MaxRegister, lambda x: x.assign(10_000 + t))
            .update(r, "pins", ORSet, lambda s: s.add(r, b"conv-1").add(r, b"conv-2"))
            .update(r, "tags", ORSet, lambda s: s.add(r, "work"))
            .update(r, "theme", LWWRegister, lambda x: x.assign("dark", Stamp(t, 2, r)))
        )

    base = doc(11, 1_000)
    return base.merge(doc(22, 2_000)), base.update(33, "badge", PNCounter, lambda c: c.decrement(33))


PAIRS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "GCounter": lambda: _counters(GCounter),
    "PNCounter": lambda: _counters(PNCounter),
    "LWWRegister": lambda: (
        LWWRegister().assign("draft one", Stamp(1_700_000_000_000, 0, 11)),
        LWWRegister().assign("draft two", Stamp(1_700_000_000_000, 0, 22)),
    ),
    "MaxRegister": lambda: (MaxRegister().assign(41_000), MaxRegister().assign(42_000)),
    "ORSet": _orsets,
    "CRDTMap": _maps,
}

OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "GCounter": lambda x: x.increment(11),
    "PNCounter": lambda x: x.decrement(11),
    "LWWRegister": lambda x: x.assign("draft three", Stamp(1_700_000_000_001, 0, 11)),
    "MaxRegister": lambda x: x.assign(43_000),
    "ORSet": lambda x: x.add(11, "conv-new"),
    "CRDTMap": lambda x: x.update(11, "badge", PNCounter, lambda c: c.increment(11)),
}

by_type = pytest.mark.parametrize("name", PAIRS)


@by_type
def test_merge(benchmark: Any, name: str) -> None:
    a, b = PAIRS[name]()
    assert benchmark(a.merge, b) == b.merge(a)


@by_type
def test_encode(benchmark: Any, name: str) -> None:
    a, _ = PAIRS[name]()
    data = benchmark(a.encode)
    benchmark.extra_info["encoded_bytes"] = len(data)


@by_type
def test_decode(benchmark: Any, name: str) -> None:
    a, _ = PAIRS[name]()
    assert benchmark(type(a).decode, a.encode()) == a


@by_type
def test_operation(benchmark: Any, name: str) -> None:
    a, _ = PAIRS[name]()
    assert benchmark(OPERATIONS[name], a) != a


def churned(cycles: int) -> ORSet:
    """3 live elements, then ``cycles`` add/remove cycles of 4 others by 3 replicas."""
    s = ORSet().add(11, "live-1").add(22, "live-2").add(33, "live-3")
    for i in range(cycles):
        s = s.add(REPLICAS[i % 3], i % 4).remove(i % 4)
    return s


@pytest.mark.parametrize("history", [10, 100, 1_000, 10_000, 100_000])
def test_orset_size_vs_history(benchmark: Any, history: int) -> None:
    s = churned(history)
    data = benchmark(s.encode)
    benchmark.extra_info["encoded_bytes"] = len(data)
    assert len(data) == len(churned(10).encode())  # history leaves no trace
