"""The one error hierarchy of the coord client.

Every failure a coord call can report is a :class:`CoordError` subclass. gRPC errors are mapped in one
place (the transport module) and raised ``from`` the original transport error, so the gRPC status code and
text stay visible in the traceback and in :attr:`CoordError.code` / :attr:`CoordError.details`.

Cancellation is never turned into a CoordError: a deadline set with ``anyio.fail_after`` still raises
``TimeoutError``, and ``move_on_after`` still just moves on.
"""

from __future__ import annotations


class CoordError(Exception):
    """Base class of every error raised by coord.

    ``code`` is the gRPC status name the server answered with (``"UNAVAILABLE"``, ``"OUT_OF_RANGE"``, ...) or
    ``None`` when the error was decided by the client; ``details`` is the server's message, e.g.
    ``"etcdserver: mvcc: required revision has been compacted"``.
    """

    def __init__(self, message: str, *, code: str | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class ClientClosed(CoordError):
    """The client (or the session/stream the call belongs to) was already closed."""


class Unavailable(CoordError):
    """No endpoint could serve the call: connections failed or the cluster has no leader.

    Raised for calls that were certainly not applied (or are safe to repeat) after the retry window
    of :func:`coord.open_client` ran out. A write that may have been applied raises :class:`OutcomeUnknown`.
    """


class OutcomeUnknown(CoordError):
    """A write was sent but the connection failed before its answer: it may or may not have been applied.

    coord never retries such a write by itself (that could apply it twice). Read the state back, or make
    the write idempotent with a transaction guarded by a revision compare.
    """


class InvalidRequest(CoordError):
    """The server refused the request as malformed (gRPC INVALID_ARGUMENT), e.g. an empty key or a txn
    with duplicate keys."""


class Compacted(CoordError):
    """The requested revision was compacted away.

    ``compact_revision`` is the oldest revision still available when the server said so (watches always
    know it; a read only says "compacted" and leaves it ``None``).
    """

    def __init__(
        self, message: str, *, compact_revision: int | None = None, code: str | None = None, details: str = ""
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.compact_revision = compact_revision


class FutureRevision(CoordError):
    """The requested revision is higher than the store's current revision."""


class LeaseNotFound(CoordError):
    """The lease does not exist (never granted, revoked, or expired)."""


class PermissionDenied(CoordError):
    """The authenticated user lacks the permission for this key range or operation."""


class AuthenticationFailed(CoordError):
    """The user name or password was refused, or no valid token could be obtained."""


class NoSpace(CoordError):
    """The server's storage quota is exhausted (NOSPACE alarm) or it refused the request for its size or rate."""


class ServerError(CoordError):
    """Any other error answered by the server (the gRPC code and text are in ``code`` / ``details``)."""


class SessionExpired(CoordError):
    """The session's lease is gone (expired, revoked, or could not be kept alive in time).

    Raised when a lock or campaign is attempted on a lost session, or when the own key disappeared while
    waiting in the queue (etcd issue #11456: the lease expired while waiting).
    """


class LockLost(CoordError):
    """The lock was lost while its body ran: the session was lost or the lock key was deleted.

    The body was cancelled when the loss was detected; side effects it had already sent may still land,
    which is what the fencing token is for.
    """


class LeadershipLost(CoordError):
    """The term of office ended against the holder's will: session lost, key deleted, or a proclamation
    found that this candidate is no longer the leader."""


__all__ = [
    "AuthenticationFailed",
    "ClientClosed",
    "Compacted",
    "CoordError",
    "FutureRevision",
    "InvalidRequest",
    "LeadershipLost",
    "LeaseNotFound",
    "LockLost",
    "NoSpace",
    "OutcomeUnknown",
    "PermissionDenied",
    "ServerError",
    "SessionExpired",
    "Unavailable",
]
