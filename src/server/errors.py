"""The one error type services raise, and the exact etcd 3.4 errors it carries.

A service never knows which transport answers the call: it raises :class:`EtcdError`
with a gRPC status code and etcd's message, and each adapter (gRPC, JSON gateway)
encodes it. Messages are etcd's wire contract, copied verbatim.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """gRPC status codes (numbers are the wire values)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class EtcdError(Exception):
    """An error answered to the client with ``code`` and ``message``."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"EtcdError({self.code.name}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EtcdError) and (self.code, self.message) == (other.code, other.message)

    def __hash__(self) -> int:
        return hash((self.code, self.message))


def _e(code: Code, message: str) -> EtcdError:
    return EtcdError(code, message)


# KV
EMPTY_KEY = _e(Code.INVALID_ARGUMENT, "etcdserver: key is not provided")
KEY_NOT_FOUND = _e(Code.INVALID_ARGUMENT, "etcdserver: key not found")
VALUE_PROVIDED = _e(Code.INVALID_ARGUMENT, "etcdserver: value is provided")
LEASE_PROVIDED = _e(Code.INVALID_ARGUMENT, "etcdserver: lease is provided")
TOO_MANY_OPS = _e(Code.INVALID_ARGUMENT, "etcdserver: too many operations in txn request")
DUPLICATE_KEY = _e(Code.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request")
INVALID_SORT_OPTION = _e(Code.INVALID_ARGUMENT, "etcdserver: invalid sort option")
REQUEST_TOO_LARGE = _e(Code.INVALID_ARGUMENT, "etcdserver: request is too large")
COMPACTED = _e(Code.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted")
FUTURE_REV = _e(Code.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision")
NO_SPACE = _e(Code.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")

# Lease
LEASE_NOT_FOUND = _e(Code.NOT_FOUND, "etcdserver: requested lease not found")
LEASE_EXIST = _e(Code.FAILED_PRECONDITION, "etcdserver: lease already exists")
LEASE_TTL_TOO_LARGE = _e(Code.OUT_OF_RANGE, "etcdserver: too large lease TTL")

# Cluster / maintenance
MEMBER_NOT_FOUND = _e(Code.NOT_FOUND, "etcdserver: member not found")
BAD_LEADER_TRANSFEREE = _e(Code.FAILED_PRECONDITION, "etcdserver: bad leader transferee")
NOT_CAPABLE = _e(Code.UNAVAILABLE, "etcdserver: not capable")
STOPPED = _e(Code.UNAVAILABLE, "etcdserver: server stopped")
CORRUPT = _e(Code.DATA_LOSS, "etcdserver: corrupt cluster")
TOO_MANY_REQUESTS = _e(Code.RESOURCE_EXHAUSTED, "etcdserver: too many requests")


def message_too_large(size: int, limit: int) -> EtcdError:
    """grpc-go's own receive-limit error, which etcd clients see before etcd does."""
    return EtcdError(Code.RESOURCE_EXHAUSTED, f"grpc: received message larger than max ({size} vs. {limit})")
