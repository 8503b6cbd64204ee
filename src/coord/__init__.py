"""coord: a Trio-first client for etcd v3 coordination (locks, elections, sessions, watches).

Works on Trio, asyncio and uvloop (through anyio), against coord-server and real etcd clusters::

    async with coord.open_client("127.0.0.1:2379") as client:
        await client.put("greeting", "hello")
        async with client.lock("jobs/cleanup") as lock:
            ...  # lock.fencing_token guards the resource

See docs/client.md.
"""

from ._client import Background, Client, Status, open_client
from ._errors import (
    AuthenticationFailed,
    ClientClosed,
    Compacted,
    CoordError,
    FutureRevision,
    InvalidRequest,
    LeadershipLost,
    LeaseNotFound,
    LockLost,
    NoSpace,
    OutcomeUnknown,
    PermissionDenied,
    ServerError,
    SessionExpired,
    Unavailable,
)
from ._lease_clock import LeaseClock, SessionState
from ._lock import Election, LeaderObserver, Lock, Term
from ._session import Session
from ._txn import Compare, CompareTarget, Delete, Get, Op, Put, Txn, TxnResult
from ._types import (
    DeleteResult,
    Event,
    EventType,
    Key,
    KeyValue,
    LeaseGrant,
    LeaseInfo,
    PutResult,
    RangeResult,
    SortOrder,
    SortTarget,
    WatchBatch,
    WatchFilter,
    prefix_end,
)
from ._watch import Watch

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "Background",
    "Client",
    "ClientClosed",
    "Compacted",
    "Compare",
    "CompareTarget",
    "CoordError",
    "Delete",
    "DeleteResult",
    "Election",
    "Event",
    "EventType",
    "FutureRevision",
    "Get",
    "InvalidRequest",
    "Key",
    "KeyValue",
    "LeaderObserver",
    "LeadershipLost",
    "LeaseClock",
    "LeaseGrant",
    "LeaseInfo",
    "LeaseNotFound",
    "Lock",
    "LockLost",
    "NoSpace",
    "Op",
    "OutcomeUnknown",
    "PermissionDenied",
    "Put",
    "PutResult",
    "RangeResult",
    "ServerError",
    "Session",
    "SessionExpired",
    "SessionState",
    "SortOrder",
    "SortTarget",
    "Status",
    "Term",
    "Txn",
    "TxnResult",
    "Unavailable",
    "Watch",
    "WatchBatch",
    "WatchFilter",
    "open_client",
    "prefix_end",
]
