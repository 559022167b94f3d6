"""Conflict-free replicated data types for cross-datacenter sync.

Two datacenters that accepted writes independently end in the same state
whatever order, duplication or delay their updates arrive in.

Types (all immutable values; operations return new values)::

    GCounter, PNCounter  per-replica counts: badge and unread counters
    LWWRegister          last writer wins by HLC stamp: mute flags, drafts
    MaxRegister          only moves forward: read markers
    ORSet                add-wins observed-remove set: pinned conversations, tags
    CRDTMap              named fields of the types above: a per-user settings document
    HLC, Stamp           hybrid logical clock stamping LWWRegister writes

Laws.  For every type and all states ``a``, ``b``, ``c`` reachable on
replicas of one system, ``merge`` is

* commutative:  ``a.merge(b) == b.merge(a)``
* associative:  ``a.merge(b.merge(c)) == a.merge(b).merge(c)``
* idempotent:   ``a.merge(a) == a``

so replicas converge once each has merged, in any order and any number of
times, every update.  Each operation ``x.op(args)`` is defined as
``x.merge(x.op_delta(args))``: the delta is a small state (the changed
entry alone) that has the operation's effect on any replica it reaches.

Preconditions.  Every replica has its own non-zero 64-bit id, which no other
replica, and no earlier incarnation of the replica without its state, ever
uses: dots and counter entries are keyed by it.

Causal-context rules (ORSet and CRDTMap).  Every add or field update takes a
fresh dot ``(replica, n)``; the state's causal context (a version vector plus
the dots beyond it received out of order) records every dot seen.  On merge
an entry's dot survives if both sides hold it, or if the side lacking it has
never seen it.  So a remove wins over exactly the adds it observed, an add
concurrent with a remove wins, a removed element never comes back unless
re-added, and removal leaves no tombstone: the state is bounded by the live
entries and the replicas.

Encoding.  ``x.encode()`` / ``Type.decode(data)`` / :func:`decode` use a
framed, versioned, CRC-32C-checked binary format (``docs/crdt.md``); bad
bytes raise ``CorruptionError`` (``InvalidArgument`` for non-bytes input).
"""

from ._base import CRDT
from ._counters import GCounter, PNCounter
from ._hlc import HLC, Stamp
from ._map import CRDTMap
from ._orset import ORSet
from ._registers import LWWRegister, MaxRegister
from ._wire import decode

__all__ = [
    "CRDT",
    "HLC",
    "CRDTMap",
    "GCounter",
    "LWWRegister",
    "MaxRegister",
    "ORSet",
    "PNCounter",
    "Stamp",
    "decode",
]
