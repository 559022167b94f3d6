"""Validation shared by every CRDT type: replica ids, element values, counts.

Everything a caller hands to an operation passes through here, so a bad
argument fails at once with :class:`InvalidArgument` instead of producing a
state that cannot be encoded or that merges differently on another replica.
"""

from __future__ import annotations

from ..errors import InvalidArgument

#: What an ORSet element, a register value or a CRDTMap field name may be.
Value = bytes | str | int

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

# Value kinds.  They are both the kind byte of the encoding and the first item
# of the sort key, so every replica orders mixed-kind values the same way.
KIND_INT = 0
KIND_BYTES = 1
KIND_STR = 2
_KIND_OF = {int: KIND_INT, bytes: KIND_BYTES, str: KIND_STR}


def check_replica(replica: object) -> int:
    """Return ``replica`` if it is a valid replica id (an int in 1..2**64-1).

    0 is refused so that an id left at a default value is caught rather than
    shared by two datacenters (two replicas with one id break every merge).
    """
    if type(replica) is not int or not 0 < replica <= U64_MAX:
        raise InvalidArgument(
            f"replica id must be an int in 1..2**64-1, got {replica!r}",
            key="replica",
            hint="give every replica (datacenter) its own fixed non-zero 64-bit id",
        )
    return replica


def check_value(value: object, what: str = "value") -> Value:
    """Return ``value`` if it is an encodable bytes, str or 64-bit signed int.

    Only the exact types are accepted: ``True == 1`` and a ``str`` subclass
    would compare equal here but decode as something else elsewhere.
    """
    kind = type(value)
    if kind is int:
        if not I64_MIN <= value <= I64_MAX:  # type: ignore[operator]
            raise InvalidArgument(f"{what} {value!r} does not fit a signed 64-bit int", key=what)
    elif kind is bytes:
        if len(value) > U32_MAX:  # type: ignore[arg-type]
            raise InvalidArgument(f"{what} is longer than 2**32-1 bytes", key=what)
    elif kind is str:
        try:
            size = len(value.encode("utf-8"))  # type: ignore[attr-defined]
        except UnicodeEncodeError:
            raise InvalidArgument(f"{what} {value!r} is not valid Unicode (lone surrogate)", key=what) from None
        if size > U32_MAX:
            raise InvalidArgument(f"{what} is longer than 2**32-1 UTF-8 bytes", key=what)
    else:
        raise InvalidArgument(f"{what} must be bytes, str or int, not {kind.__name__}", key=what)
    return value  # type: ignore[return-value]


def value_key(value: Value) -> tuple[int, Value]:
    """Total order over values of mixed kinds: ints, then bytes, then str.

    Within a kind the natural order applies (str by code point, which is also
    UTF-8 byte order).
    """
    return (_KIND_OF[type(value)], value)


def check_amount(n: object, what: str = "n") -> int:
    """Return ``n`` if it is an int in 0..2**64-1 (a counter step)."""
    if type(n) is not int or not 0 <= n <= U64_MAX:
        raise InvalidArgument(
            f"{what} must be an int in 0..2**64-1, got {n!r}",
            key=what,
            hint="counters take non-negative steps; use PNCounter.decrement to go down",
        )
    return n


def pointwise_max(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> dict[int, int]:
    """Per-replica maximum of two (replica, count) tables (counters, version vectors)."""
    out = dict(a)
    for replica, n in b:
        if n > out.get(replica, 0):
            out[replica] = n
    return out
