"""syncstore: an embedded WAL + LMDB storage engine for instant-messaging offline sync.

    import syncstore
    from syncstore import Message

    with syncstore.open(path) as store:
        d = store.deliver(Message(sender=7, conv=42, client_seq=1, body=b"hi"), to=[7, 9])
        page = store.sync(9, since=0, limit=100)
"""

from . import crdt
from .errors import (
    CorruptionError,
    DurabilityError,
    IdempotencyConflict,
    InvalidArgument,
    ReadOnlyStore,
    StoreClosed,
    StoreFull,
    StoreLocked,
    SyncStoreError,
    UsedAfterFork,
)
from .model import Delivery, Message, Messages, Page, StoredMessage
from .store import DURABILITY_MODES, Store, open

__all__ = [
    "crdt",
    "open",
    "Store",
    "Message",
    "Delivery",
    "Page",
    "StoredMessage",
    "Messages",
    "DURABILITY_MODES",
    "SyncStoreError",
    "InvalidArgument",
    "StoreLocked",
    "StoreClosed",
    "ReadOnlyStore",
    "CorruptionError",
    "DurabilityError",
    "StoreFull",
    "UsedAfterFork",
    "IdempotencyConflict",
]

__version__ = "0.1.0"
