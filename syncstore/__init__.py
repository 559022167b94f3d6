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
    LogGap,
    LayoutError,
    PermissionDenied,
    ReadersFull,
    ReadOnlyStore,
    StoreClosed,
    StoreFull,
    StoreLocked,
    SnapshotRequired,
    StoreNotFound,
    StoreNotReady,
    SyncStoreError,
    UsedAfterFork,
)
from .changelog import Consumer, ConsumerStatus
from ._events import decode_event
from .model import Change, Delivered, Delivery, Expired, SnapshotChunk, HistoryPage, Message, MessageRecord, Messages, Page, StoredMessage
from ._layout import renew_epoch
from .snapshot import SnapshotInfo, restore, snapshot_chain
from .store import DURABILITY_MODES, Store, open

__all__ = [
    "crdt",
    "open",
    "renew_epoch",
    "Store",
    "Message",
    "Delivery",
    "Page",
    "StoredMessage",
    "MessageRecord",
    "HistoryPage",
    "Messages",
    "Change",
    "SnapshotChunk",
    "decode_event",
    "Delivered",
    "Expired",
    "Consumer",
    "ConsumerStatus",
    "DURABILITY_MODES",
    "SnapshotInfo",
    "snapshot_chain",
    "restore",
    "SyncStoreError",
    "InvalidArgument",
    "StoreNotFound",
    "LayoutError",
    "PermissionDenied",
    "StoreLocked",
    "StoreClosed",
    "ReadOnlyStore",
    "CorruptionError",
    "DurabilityError",
    "StoreFull",
    "ReadersFull",
    "UsedAfterFork",
    "IdempotencyConflict",
    "SnapshotRequired",
    "LogGap",
    "StoreNotReady",
]

__version__ = "0.1.0"
