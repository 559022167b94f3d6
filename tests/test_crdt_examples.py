"""Example tests of syncstore.crdt: argument checks, semantics, HLC, codec edges, size."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from crc32c import crc32c

from syncstore.crdt import (
    CRDT,
    HLC,
    CRDTMap,
    GCounter,
    LWWRegister,
    MaxRegister,
    ORSet,
    PNCounter,
    Stamp,
    decode,
)
from syncstore.crdt._causal import DotContext
from syncstore.errors import CorruptionError, InvalidArgument

U64_MAX = 2**64 - 1
BAD_REPLICAS = [0, -1, 2**64, True, "1", 1.0, None]
BAD_VALUES = [1.5, True, None, bytearray(b"x"), 2**63, -(2**63) - 1, "\ud800", ("a",)]


def frame(tag: int, body: bytes) -> bytes:
    """A well-formed frame (valid length and CRC) around ``body``."""
    head = b"CR" + struct.pack(">BBI", 1, tag, len(body)) + body
    return head + struct.pack(">I", crc32c(head))


# --- argument checks --------------------------------------------------------------

REPLICA_OPS = {
    "GCounter.increment": lambda r: GCounter().increment(r),
    "PNCounter.increment": lambda r: PNCounter().increment(r),
    "PNCounter.decrement_delta": lambda r: PNCounter().decrement_delta(r),
    "ORSet.add": lambda r: ORSet().add(r, "x"),
    "CRDTMap.update": lambda r: CRDTMap().update(r, "f", MaxRegister, lambda m: m.assign(1)),
    "Stamp": lambda r: Stamp(1, 0, r),
    "HLC": lambda r: HLC(r),
}


@pytest.mark.parametrize("op", REPLICA_OPS.values(), ids=REPLICA_OPS.keys())
@pytest.mark.parametrize("replica", BAD_REPLICAS, ids=repr)
def test_operations_reject_invalid_replica_ids(op: Any, replica: Any) -> None:
    with pytest.raises(InvalidArgument, match="replica id"):
        op(replica)


@pytest.mark.parametrize("replica", [1, 2**63, U64_MAX])
def test_operations_accept_any_nonzero_64_bit_replica_id(replica: int) -> None:
    ops = REPLICA_OPS
    assert ops["GCounter.increment"](replica) == GCounter(((replica, 1),))
    assert ops["PNCounter.increment"](replica).value == 1
    assert ops["PNCounter.decrement_delta"](replica) == PNCounter(minus=GCounter(((replica, 1),)))
    added = ops["ORSet.add"](replica)
    assert added.entries == (("x", (((replica, 1), None),)),) and added.context == DotContext(vv=((replica, 1),))
    updated = ops["CRDTMap.update"](replica)
    assert updated.value == {"f": 1} and updated.context == DotContext(vv=((replica, 1),))
    assert ops["Stamp"](replica) == Stamp(1, 0, replica)
    assert ops["HLC"](replica).now().replica == replica
    for value in (added, updated, ops["GCounter.increment"](replica)):
        assert decode(value.encode()) == value  # the extreme ids survive the encoding


VALUE_OPS = {
    "ORSet.add": lambda v: ORSet().add(1, v),
    "ORSet.remove": lambda v: ORSet().remove(v),
    "LWWRegister.assign": lambda v: LWWRegister().assign(v, Stamp(1, 0, 1)),
    "MaxRegister.assign": lambda v: MaxRegister().assign(v),
}


@pytest.mark.parametrize("op", VALUE_OPS.values(), ids=VALUE_OPS.keys())
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_operations_reject_values_that_are_not_bytes_str_or_int64(op: Any, value: Any) -> None:
    with pytest.raises(InvalidArgument):
        op(value)


def test_values_of_every_kind_and_extreme_size_are_accepted() -> None:
    values = [-(2**63), 2**63 - 1, b"", b"\x00" * 1000, "", "\U0001f600"]
    s = ORSet()
    for v in values:
        s = s.add(1, v)
    assert s.value == frozenset(values)
    assert ORSet.decode(s.encode()) == s


ALL_TYPES = [GCounter, PNCounter, LWWRegister, MaxRegister, ORSet, CRDTMap]


@pytest.mark.parametrize("kind", ALL_TYPES, ids=lambda k: k.__name__)
def test_merging_different_types_is_refused(kind: type[CRDT]) -> None:
    """Every type refuses every other, also ORSet and CRDTMap, which share their merge code."""
    receivers = [kind(), *EXAMPLES_BY_TYPE[kind]]
    others = [other() for other in ALL_TYPES if other is not kind] + [
        x for other in ALL_TYPES if other is not kind for x in EXAMPLES_BY_TYPE[other]
    ] + [None, frozenset(), {"f": 1}]
    for receiver in receivers:
        for other in others:
            with pytest.raises(InvalidArgument, match="cannot merge"):
                receiver.merge(other)


# --- counters -------------------------------------------------------------------


def test_gcounter_counts_per_replica_and_sums() -> None:
    a = GCounter().increment(1, 3).increment(1)
    b = GCounter().increment(2, 5)
    assert a.value == 4
    assert a.merge(b).value == b.merge(a).value == 9
    assert a.merge(b).merge(a.increment(1, 2)).value == 11  # a's newer count supersedes its old one


def test_gcounter_overflow_raises_instead_of_wrapping() -> None:
    full = GCounter().increment(7, U64_MAX)
    assert full.value == U64_MAX
    with pytest.raises(InvalidArgument, match="overflow") as caught:
        full.increment(7)
    assert caught.value.key == 7
    assert "2**64-1" in caught.value.hint
    with pytest.raises(InvalidArgument, match="overflow"):
        GCounter().increment(7, 2).increment_delta(7, U64_MAX - 1)
    # Other replicas' counts are independent, and the sum is an exact int.
    assert full.merge(GCounter().increment(8, U64_MAX)).value == 2 * U64_MAX


@pytest.mark.parametrize("n", [-1, 2**64, True, 1.0, "1"])
def test_counter_steps_must_be_ints_in_u64_range(n: Any) -> None:
    with pytest.raises(InvalidArgument):
        GCounter().increment(1, n)
    with pytest.raises(InvalidArgument):
        PNCounter().decrement(1, n)


def test_increment_by_zero_changes_nothing() -> None:
    assert GCounter().increment(1, 0) == GCounter()
    assert GCounter().increment_delta(1, 0) == GCounter()


def test_pncounter_goes_both_ways_and_bounds_each_direction() -> None:
    c = PNCounter().increment(1, 5).decrement(2, 8).decrement(1)
    assert c.value == -4
    with pytest.raises(InvalidArgument, match="overflow"):
        c.decrement(2, U64_MAX)
    assert c.decrement_delta(2, 1) == PNCounter(minus=GCounter(((2, 9),)))


# --- registers ------------------------------------------------------------------


def test_lww_ties_between_replicas_resolve_to_the_higher_replica_id_everywhere() -> None:
    low = LWWRegister().assign("from 3", Stamp(100, 2, 3))
    high = LWWRegister().assign("from 9", Stamp(100, 2, 9))
    assert low.merge(high).value == high.merge(low).value == "from 9"


def test_lww_same_stamp_twice_resolves_by_value_deterministically() -> None:
    a = LWWRegister().assign(b"b", Stamp(5, 0, 1))
    b = LWWRegister().assign(b"a", Stamp(5, 0, 1))
    assert a.merge(b) == b.merge(a) == a


def test_lww_later_stamp_wins_and_a_stale_write_loses() -> None:
    clock = HLC(1, lambda: 1_000)
    first, second = clock.now(), clock.now()
    r = LWWRegister().assign("old", first).assign("new", second)
    assert r.value == "new"
    assert r.assign("stale", first).value == "new"
    assert LWWRegister().value is None


def test_lww_assign_needs_a_stamp() -> None:
    with pytest.raises(InvalidArgument, match="Stamp"):
        LWWRegister().assign("x", (1, 0, 1))  # type: ignore[arg-type]


def test_max_register_moves_only_forward() -> None:
    m = MaxRegister().assign(10)
    assert m.assign(5).value == 10
    assert m.assign(11).value == 11
    assert MaxRegister().value is None
    assert m.assign_delta(5) == MaxRegister(5)  # the delta of a no-op is harmless
    assert m.merge(m.assign_delta(5)) == m


def test_max_register_orders_mixed_kinds_int_bytes_str() -> None:
    ascending = [10**18, b"zz", "a"]
    for i, a in enumerate(ascending):
        for j, b in enumerate(ascending):
            assert MaxRegister(a).merge(MaxRegister(b)).value == ascending[max(i, j)]


# --- ORSet ----------------------------------------------------------------------


def test_orset_concurrent_add_and_remove_add_wins() -> None:
    base = ORSet().add(1, "pinned")
    readded = base.add(2, "pinned")
    removed = base.remove("pinned")
    assert "pinned" in readded.merge(removed)
    assert "pinned" in removed.merge(readded)


def test_orset_remove_wins_over_the_adds_it_observed() -> None:
    a = ORSet().add(1, "t")
    b = ORSet().add(2, "t")
    removed = a.merge(b).remove("t")
    assert removed.value == frozenset()
    assert removed.merge(a) == removed
    assert b.merge(removed).value == frozenset()


def test_orset_remove_of_an_absent_element_is_a_no_op() -> None:
    s = ORSet().add(1, "a")
    assert s.remove("b") == s
    assert s.remove_delta("b") == ORSet()


def test_orset_remove_delta_arriving_before_its_add_still_removes_it() -> None:
    origin = ORSet().add(1, "x")
    add = ORSet().add_delta(1, "x")
    remove = origin.remove_delta("x")
    late = ORSet().merge(remove)  # the remove overtook the add
    assert late.context.cloud == () and late.context.vv == ((1, 1),)
    assert late.merge(add).value == frozenset()
    # Out-of-order deltas from one replica park in the cloud until the gap fills.
    second = origin.add_delta(1, "y")
    parked = ORSet().merge(second)
    assert parked.context.cloud == ((1, 2),)
    assert parked.merge(add).context == DotContext(vv=((1, 2),))


def test_orset_merge_keeps_dots_both_sides_hold() -> None:
    a = ORSet().add(1, "x")
    b = a.merge(ORSet().add(2, "x"))  # a concurrent add of the same element: two dots
    c = a.add(3, "y")  # a's entry unchanged, a new one
    assert b.entries == (("x", (((1, 1), None), ((2, 1), None))),)
    assert a.merge(b) == b == b.merge(a)
    assert a.merge(c) == c == c.merge(a)
    assert b.merge(c) == c.merge(b)
    assert b.merge(c).entries == (("x", (((1, 1), None), ((2, 1), None))), ("y", (((3, 1), None),)))
    for s in (a, b, c, b.merge(c)):
        assert s.merge(s) == s and s.merge(s) is not None


def test_orset_own_dot_known_only_from_the_cloud_is_not_reused() -> None:
    """A replica whose own latest dot sits only in the dot cloud (its earlier deltas were
    not received) must add with a dot beyond it: reusing dot 1 would make the element
    collide with the replica's earlier add of another element."""
    s, deltas = ORSet(), []
    for element in "abcd":
        deltas.append(s.add_delta(1, element))
        s = s.merge(deltas[-1])
    partial = ORSet().merge(deltas[3])  # only the last delta arrived: dot (1, 4) in the cloud
    assert partial.context == DotContext(vv=(), cloud=((1, 4),))
    assert partial.add_delta(1, "e").entries == (("e", (((1, 5), None),)),)
    assert partial.add_delta(2, "e").entries == (("e", (((2, 1), None),)),)  # others start at 1
    added = partial.add(1, "e")
    merged = added.merge(s)
    assert merged.value == frozenset("abcde")
    assert merged == s.merge(added)
    assert merged.context == DotContext(vv=((1, 5),))


def test_orset_states_with_cloud_dots_and_multi_dot_entries_round_trip() -> None:
    """Canonical forms at the edges of the decoder's checks must decode."""
    s, deltas = ORSet(), []
    for element in "abcde":
        deltas.append(s.add_delta(1, element))
        s = s.merge(deltas[-1])
    cases = {
        "cloud dot 2, no vv entry": (ORSet().merge(deltas[1]), DotContext(cloud=((1, 2),))),
        "vv 1, cloud dot 3": (ORSet().merge(deltas[0]).merge(deltas[2]), DotContext(vv=((1, 1),), cloud=((1, 3),))),
        "two cloud dots of one replica": (ORSet().merge(deltas[2]).merge(deltas[4]), DotContext(cloud=((1, 3), (1, 5)))),
    }
    for name, (state, context) in cases.items():
        assert state.context == context, name
        assert ORSet.decode(state.encode()) == state, name
    three = ORSet().add(3, "x").merge(ORSet().add(1, "x")).merge(ORSet().add(2, "x"))
    assert [dot for dot, _ in three.entries[0][1]] == [(1, 1), (2, 1), (3, 1)]
    assert ORSet.decode(three.encode()) == three
    doc = CRDTMap().update(1, "f", GCounter, lambda c: c.increment(1)).merge(
        CRDTMap().update(2, "f", GCounter, lambda c: c.increment(2, 5))
    )
    assert [dot for dot, _ in doc.entries[0][1]] == [(1, 1), (2, 1)] and doc.value == {"f": 6}
    assert CRDTMap.decode(doc.encode()) == doc
    # Two entries of the smallest size (25 bytes each): the count fits exactly.
    smallest = ORSet().add(1, b"").add(1, "")
    assert len(smallest.encode()) == 12 + 4 + 16 + 4 + 4 + 2 * 25
    assert ORSet.decode(smallest.encode()) == smallest


def _pairs(*pairs: tuple[int, int]) -> bytes:
    return struct.pack(">I", len(pairs)) + b"".join(struct.pack(">QQ", *p) for p in pairs)


def _int_key(n: int) -> bytes:
    return b"\x00" + struct.pack(">q", n)


def _orset_body(vv: list, cloud: list, entries: list) -> bytes:
    """An ORSet body: context, then (key bytes, [dots]) entries, written as given."""
    out = _pairs(*vv) + _pairs(*cloud) + struct.pack(">I", len(entries))
    for key, dots in entries:
        out += key + _pairs(*dots)
    return out


def test_orset_body_helper_writes_the_canonical_form() -> None:
    # The refused bodies below differ from a canonical one only in what they name.
    canonical = _orset_body([(1, 2), (2, 1)], [], [(_int_key(1), [(1, 1), (2, 1)]), (_int_key(2), [(1, 2)])])
    expected = ORSet().add(1, 1).add(1, 2).merge(ORSet().add(2, 1))
    assert canonical == expected.encode()[8:-4]
    assert decode(frame(5, canonical)) == expected


@pytest.mark.parametrize(
    ("body", "message", "offset"),
    [
        # Entries: swapped, repeated (with different dots), one dot under two keys.
        (_orset_body([(1, 2)], [], [(_int_key(2), [(1, 1)]), (_int_key(1), [(1, 2)])]), "entry 1 is out of order or repeated", 65),
        (_orset_body([(1, 2)], [], [(_int_key(1), [(1, 1)]), (_int_key(1), [(1, 2)])]), "entry 1 is out of order or repeated", 65),
        (_orset_body([(1, 1)], [], [(_int_key(1), [(1, 1)]), (_int_key(2), [(1, 1)])]), r"dot \(1, 1\) is out of order, repeated", 78),
        # Dots of one entry: swapped, repeated, and a third dot below the second.
        (_orset_body([(1, 1), (2, 1)], [], [(_int_key(1), [(2, 1), (1, 1)])]), r"dot \(1, 1\) is out of order", 81),
        (_orset_body([(1, 1)], [], [(_int_key(1), [(1, 1), (1, 1)])]), r"dot \(1, 1\) is out of order, repeated", 65),
        (_orset_body([(1, 1), (2, 1), (3, 1)], [], [(_int_key(1), [(1, 1), (3, 1), (2, 1)])]), r"dot \(2, 1\) is out of order", 113),
        # Version vector: a replica repeated, replicas swapped.
        (_orset_body([(1, 1), (1, 2)], [], []), r"pair \(1, 2\) is out of order or repeated", 28),
        (_orset_body([(2, 1), (1, 1)], [], []), r"pair \(1, 1\) is out of order or repeated", 28),
        # Cloud: dots swapped or repeated; a dot that belongs in the version vector
        # (reported at the start of the cloud).
        (_orset_body([], [(1, 5), (1, 3)], []), r"pair \(1, 3\) is out of order or repeated", 32),
        (_orset_body([], [(1, 3), (1, 3)], []), r"pair \(1, 3\) is out of order or repeated", 32),
        (_orset_body([(1, 2)], [(1, 3)], []), r"cloud dot \(1, 3\) belongs in the version vector", 28),
        (_orset_body([], [(1, 1)], []), r"cloud dot \(1, 1\) belongs in the version vector", 12),
        # An entry count that cannot fit the bytes left (entries take >= 25 bytes each).
        (_orset_body([], [], []).replace(struct.pack(">I", 0) * 3, struct.pack(">III", 0, 0, 2)) + bytes(49), "count 2 does not fit the 49 bytes left", 16),
    ],
    ids=[
        "entries-swapped", "entry-repeated", "dot-under-two-keys", "dots-swapped", "dot-repeated-in-entry",
        "third-dot-below-second", "vv-replica-repeated", "vv-swapped", "cloud-swapped", "cloud-repeated",
        "cloud-dot-next-to-vv", "cloud-dot-1", "entry-count-too-big",
    ],
)
def test_orset_decoder_refuses_non_canonical_bodies(body: bytes, message: str, offset: int) -> None:
    with pytest.raises(CorruptionError, match=message) as caught:
        ORSet.decode(frame(5, body))
    assert caught.value.offset == offset


def _map_body(vv: list, fields: list) -> bytes:
    """A CRDTMap body whose fields ``(name, dot)`` each hold GCounter {1: 1} under one dot."""
    body = _pairs(*vv) + _pairs() + struct.pack(">I", len(fields))
    for name, dot in fields:
        body += b"\x02" + struct.pack(">I", len(name)) + name.encode() + _pairs(dot) + b"\x01" + _pairs((1, 1))
    return body


def test_map_decoder_refuses_one_dot_under_two_fields() -> None:
    ok = CRDTMap.decode(frame(6, _map_body([(1, 2)], [("a", (1, 1)), ("b", (1, 2))])))
    assert ok.value == {"a": 1, "b": 1}
    with pytest.raises(CorruptionError, match=r"dot \(1, 1\) is out of order, repeated") as caught:
        CRDTMap.decode(frame(6, _map_body([(1, 1)], [("a", (1, 1)), ("b", (1, 1))])))
    # head, context, entry count, field "a" (name, dot count, dot, payload), then "b" and its dot count
    assert caught.value.offset == 8 + 24 + 4 + (6 + 4 + 16 + 1 + 20) + 6 + 4


def test_orset_membership_of_other_types_is_false() -> None:
    s = ORSet().add(1, 1)
    assert 1 in s and 1.0 not in s and True not in s and b"1" not in s


# --- CRDTMap --------------------------------------------------------------------


def _settings(replica: int) -> CRDTMap:
    return (
        CRDTMap()
        .update(replica, "badge", PNCounter, lambda c: c.increment(replica, 3))
        .update(replica, "muted", LWWRegister, lambda r: r.assign(True + 0, Stamp(10, 0, replica)))
        .update(replica, "pins", ORSet, lambda s: s.add(replica, b"conv-1"))
    )


def test_map_update_get_value_and_remove() -> None:
    m = _settings(1)
    assert m.value == {"badge": 3, "muted": 1, "pins": frozenset({b"conv-1"})}
    assert m.get("badge") == PNCounter().increment(1, 3)
    assert m.get("missing") is None
    assert m.remove("badge").value.keys() == {"muted", "pins"}
    assert m.remove("missing") == m


def test_map_fields_merge_field_by_field() -> None:
    a = _settings(1)
    b = a.update(2, "badge", PNCounter, lambda c: c.decrement(2))
    c = a.update(3, "pins", ORSet, lambda s: s.add(3, b"conv-2"))
    merged = b.merge(c)
    assert merged == c.merge(b)
    # Every field, including "muted", which both sides hold unchanged from a.
    assert merged.value == {"badge": 2, "muted": 1, "pins": frozenset({b"conv-1", b"conv-2"})}
    assert merged.merge(a) == merged and a.merge(merged) == merged  # a's updates are all in it
    assert merged.merge(merged) == merged


def test_map_update_concurrent_with_remove_wins_with_the_whole_value() -> None:
    base = _settings(1)
    removed = base.remove("badge")
    updated = base.update(2, "badge", PNCounter, lambda c: c.increment(2))
    assert removed.merge(updated).value["badge"] == 4
    assert updated.merge(removed).value["badge"] == 4


def test_map_remove_wins_over_the_updates_it_observed() -> None:
    a = _settings(1)
    b = a.update(2, "badge", PNCounter, lambda c: c.increment(2))
    removed = a.merge(b).remove("badge")
    assert "badge" not in removed.merge(a).merge(b).value


def test_map_refuses_a_kind_change_and_bad_update_functions() -> None:
    m = _settings(1)
    with pytest.raises(InvalidArgument, match="is a PNCounter"):
        m.update(1, "badge", GCounter, lambda c: c)
    with pytest.raises(InvalidArgument, match="fn returned"):
        m.update(1, "new", GCounter, lambda c: 5)  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidArgument, match="kind"):
        m.update(1, "new", dict, lambda c: c)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="field name"):
        m.update(1, b"bytes-name", GCounter, lambda c: c)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="field name"):
        m.remove(7)  # type: ignore[arg-type]


def test_map_fields_created_concurrently_with_different_kinds_resolve_identically() -> None:
    a = CRDTMap().update(1, "f", GCounter, lambda c: c.increment(1))
    b = CRDTMap().update(2, "f", MaxRegister, lambda m: m.assign(7))
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).get("f") == MaxRegister(7)  # the higher type tag


def test_map_nests_and_its_encoding_depth_is_bounded() -> None:
    inner = CRDTMap().update(1, "x", GCounter, lambda c: c.increment(1))
    doc = inner
    for _ in range(15):  # 16 levels of maps in all: the limit
        doc = CRDTMap().update(1, "sub", CRDTMap, lambda _m, d=doc: d)
    assert CRDTMap.decode(doc.encode()) == doc
    too_deep = CRDTMap().update(1, "sub", CRDTMap, lambda _m: doc)
    with pytest.raises(InvalidArgument, match="nesting"):
        too_deep.encode()


# --- HLC ------------------------------------------------------------------------


def test_hlc_follows_the_wall_clock_and_survives_steps_back() -> None:
    wall = [5_000]
    clock = HLC(1, lambda: wall[0])
    a = clock.now()
    assert (a.physical, a.logical) == (5_000, 0)
    wall[0] = 4_000  # NTP stepped the clock back a second
    b, c = clock.now(), clock.now()
    assert a < b < c and (b.physical, b.logical, c.logical) == (5_000, 1, 2)
    wall[0] = 6_000
    assert clock.now() == Stamp(6_000, 0, 1)


def test_hlc_update_moves_past_a_remote_stamp_within_the_drift_bound() -> None:
    clock = HLC(1, lambda: 1_000, max_drift_ms=500)
    remote = Stamp(1_400, 7, 2)
    got = clock.update(remote)
    assert got == Stamp(1_400, 8, 1)
    assert clock.now() == Stamp(1_400, 9, 1)


def test_hlc_update_refuses_a_stamp_too_far_ahead_and_changes_nothing() -> None:
    clock = HLC(1, lambda: 1_000, max_drift_ms=500)
    before = clock.now()
    with pytest.raises(InvalidArgument, match="ahead") as caught:
        clock.update(Stamp(1_501, 0, 2))
    assert "NTP" in caught.value.hint
    assert clock.now() == Stamp(before.physical, before.logical + 1, 1)


def test_hlc_default_drift_bound_is_a_minute() -> None:
    clock = HLC(1, lambda: 0)
    assert clock.update(Stamp(60_000, 0, 2)) == Stamp(60_000, 1, 1)
    with pytest.raises(InvalidArgument):
        clock.update(Stamp(60_001, 0, 2))
    assert clock.now() == Stamp(60_000, 2, 1)  # the refused stamp changed nothing


def test_hlc_logical_counter_carries_into_the_next_millisecond() -> None:
    clock = HLC(1, lambda: 10, last=Stamp(10, 2**32 - 1, 1))
    assert clock.now() == Stamp(11, 0, 1)


def test_hlc_resumes_after_a_restart_with_the_clock_behind() -> None:
    clock = HLC(1, lambda: 10, last=Stamp(99, 3, 1))
    assert clock.now() == Stamp(99, 4, 1)


def test_hlc_with_the_real_clock_is_near_unix_time() -> None:
    import time

    stamp = HLC(1).now()
    assert abs(stamp.physical - time.time() * 1000) < 60_000  # same epoch and unit, no timing assertion


@pytest.mark.parametrize("bad", [-1, 1.5, None, 2**64])
def test_hlc_refuses_a_broken_clock(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="clock"):
        HLC(1, lambda: bad).now()


@pytest.mark.parametrize("kwargs", [{"max_drift_ms": -1}, {"max_drift_ms": 1.0}, {"last": (1, 2, 3)}])
def test_hlc_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        HLC(1, **kwargs)


@pytest.mark.parametrize("args", [(-1, 0, 1), (0, -1, 1), (0, 2**32, 1), (2**64, 0, 1), (1.0, 0, 1)])
def test_stamps_refuse_out_of_range_parts(args: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidArgument):
        Stamp(*args)


def test_stamps_are_totally_ordered_by_physical_logical_replica() -> None:
    stamps = [Stamp(2, 0, 1), Stamp(1, 5, 9), Stamp(1, 5, 2), Stamp(1, 0, 3)]
    assert sorted(stamps) == [Stamp(1, 0, 3), Stamp(1, 5, 2), Stamp(1, 5, 9), Stamp(2, 0, 1)]


# --- codec edges ----------------------------------------------------------------


EXAMPLES: list[CRDT] = [
    GCounter().increment(1, 2),
    PNCounter().decrement(U64_MAX, 3),
    LWWRegister().assign("draft", Stamp(1, 2, 3)),
    MaxRegister().assign(42),
    ORSet().add(1, b"a").add(2, "b"),
    _settings(5),
]


EXAMPLES_BY_TYPE: dict[type, list[CRDT]] = {kind: [x for x in EXAMPLES if type(x) is kind] for kind in ALL_TYPES}


@pytest.mark.parametrize("x", EXAMPLES, ids=lambda x: type(x).__name__)
def test_every_truncation_and_extension_is_detected(x: CRDT) -> None:
    data = x.encode()
    for n in range(len(data)):
        with pytest.raises(CorruptionError):
            decode(data[:n])
    with pytest.raises(CorruptionError):
        decode(data + b"\x00")


@pytest.mark.parametrize("x", EXAMPLES, ids=lambda x: type(x).__name__)
def test_decoding_as_the_wrong_type_is_corruption(x: CRDT) -> None:
    other = GCounter if type(x) is not GCounter else ORSet
    with pytest.raises(CorruptionError, match=f"holds a {type(x).__name__}") as caught:
        other.decode(x.encode())
    assert caught.value.offset == 3


def test_header_errors_name_their_offset() -> None:
    good = GCounter().increment(1).encode()
    cases = {
        0: b"XX" + good[2:],
        2: good[:2] + b"\x02" + good[3:],
    }
    for offset, data in cases.items():
        with pytest.raises(CorruptionError) as caught:
            decode(data)
        assert caught.value.offset == offset
    with pytest.raises(CorruptionError, match="unknown CRDT type tag") as caught:
        decode(frame(99, b""))
    assert caught.value.offset == 3
    with pytest.raises(CorruptionError, match="CRC") as caught:
        decode(good[:-1] + bytes([good[-1] ^ 1]))
    assert caught.value.offset == len(good) - 4


@pytest.mark.parametrize("data", [None, "CR", 12, [1, 2]])
def test_decoding_a_non_bytes_argument_is_invalid(data: Any) -> None:
    with pytest.raises(InvalidArgument):
        decode(data)


@pytest.mark.parametrize("tag", [1, 5, 6])
def test_a_huge_count_is_refused_before_anything_is_allocated(tag: int) -> None:
    body = b"\xff\xff\xff\xff" + b"\x00" * 16
    with pytest.raises(CorruptionError, match="does not fit"):
        decode(frame(tag, body))


def test_a_huge_value_length_is_refused() -> None:
    body = b"\x01" + b"\xff\xff\xff\xff"  # MaxRegister, present, bytes of 4 GiB
    with pytest.raises(CorruptionError, match="does not fit"):
        decode(frame(4, b"\x01" + body))


def test_a_deeply_nested_map_bomb_is_corruption_not_recursion_error() -> None:
    # Each level: context {1: 1}, one field "" with dot (1, 1) holding a map tag.
    ctx = struct.pack(">I", 1) + struct.pack(">QQ", 1, 1) + struct.pack(">I", 0)
    head = ctx + struct.pack(">I", 1) + b"\x02" + struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">QQ", 1, 1)
    body = (head + b"\x06") * 5000 + b"\x00" * 12
    with pytest.raises(CorruptionError, match="nesting"):
        decode(frame(6, body))


@pytest.mark.parametrize(
    ("tag", "body", "message"),
    [
        (1, struct.pack(">IQQ", 1, 0, 5), "zero replica"),
        (1, struct.pack(">IQQ", 1, 5, 0), "zero replica id or count"),
        (1, struct.pack(">IQQQQ", 2, 5, 1, 5, 2), "out of order"),
        (1, struct.pack(">IQQQQ", 2, 6, 1, 5, 2), "out of order"),
        (4, b"\x02", "presence"),
        (4, b"\x01\x07", "unknown value kind"),
        (4, b"\x01\x02" + struct.pack(">I", 1) + b"\xff", "UTF-8"),
        (3, b"\x01" + struct.pack(">QIQ", 1, 0, 0) + b"\x00" + b"\x00" * 8, "replica id 0"),
        (5, struct.pack(">IIQQ", 0, 1, 1, 1), "belongs in the version vector"),
        (5, struct.pack(">II", 0, 0) + struct.pack(">I", 1) + b"\x00" + b"\x00" * 8 + struct.pack(">IQQ", 1, 1, 1), "not in the context"),
        (5, struct.pack(">IQQI", 1, 1, 1, 0) + struct.pack(">I", 1) + b"\x00" + b"\x00" * 8 + struct.pack(">I", 0) + b"\x00" * 16, "no dots"),
        (6, struct.pack(">IQQI", 1, 1, 1, 0) + struct.pack(">I", 1) + b"\x00" + b"\x00" * 8 + struct.pack(">IQQ", 1, 1, 1) + b"\x04\x00", "not a str"),
    ],
)
def test_non_canonical_or_invalid_bodies_are_corruption(tag: int, body: bytes, message: str) -> None:
    with pytest.raises(CorruptionError, match=message) as caught:
        decode(frame(tag, body))
    assert caught.value.offset is not None


def test_trailing_bytes_in_a_body_are_corruption() -> None:
    body = GCounter().increment(1).encode()[8:-4]
    with pytest.raises(CorruptionError, match="trailing"):
        decode(frame(1, body + b"\x00"))


# --- size -----------------------------------------------------------------------


def test_orset_size_is_bounded_by_live_elements_and_replicas_not_history() -> None:
    replicas = (1, 2, 3)
    live = ORSet()
    for i, r in enumerate(replicas):
        live = live.add(r, f"pinned-{i}")
    churned = [live, live]  # the origin, and a replica that only receives deltas
    after_first_cycle = None
    for i in range(100_000):
        r, element = replicas[i % 3], i % 4
        add = churned[0].add_delta(r, element)
        churned[0] = churned[0].merge(add)
        remove = churned[0].remove_delta(element)
        churned[0] = churned[0].merge(remove)
        churned[1] = churned[1].merge(add).merge(remove)
        if i % 100 == 0:  # pinning an already pinned conversation again
            repin = churned[0].add_delta(r, "pinned-0")
            churned = [state.merge(repin) for state in churned]
        if i == 3:
            after_first_cycle = len(churned[0].encode())
        if i % 1000 == 0:  # fail fast, rather than crawl, should history pile up
            assert all(len(dots) <= 3 for _, dots in churned[0].entries) and len(churned[0].entries) <= 4
    assert churned[0] == churned[1]
    assert churned[0].value == live.value
    size = len(churned[0].encode())
    # Fixed-width counters: exactly the size after one cycle of each element.
    assert size == after_first_cycle
    # Frame, context of 3 replicas, entry count, 3 live str elements with one dot each.
    assert size == 12 + (4 + 3 * 16 + 4) + 4 + 3 * ((1 + 4 + len("pinned-0")) + 4 + 16)
    assert churned[0].context.vv == ((1, 33_334 + 334 + 1), (2, 33_333 + 333 + 1), (3, 33_333 + 333 + 1))


def test_map_update_takes_the_replica_positionally_or_by_keyword():
    positional = CRDTMap().update(7, "unread", PNCounter, lambda c: c.increment(7, 3))
    keyword = CRDTMap().update("unread", PNCounter, lambda c: c.increment(7, 3), replica=7)
    assert positional == keyword and positional.value == {"unread": 3}
    assert CRDTMap().update_delta("unread", PNCounter, lambda c: c.increment(7), replica=7) == CRDTMap().update_delta(
        7, "unread", PNCounter, lambda c: c.increment(7)
    )
    with pytest.raises(InvalidArgument, match="replica"):
        CRDTMap().update("unread", PNCounter, lambda c: c.increment(7))  # no replica: no dot
