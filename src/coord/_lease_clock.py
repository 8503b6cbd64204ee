"""The session's lease clock: a pure state machine (no I/O, no event loop; times are passed in).

The client never believes in a lease longer than the server may: its local deadline is the *send*
time of the last keep-alive whose reply carried TTL > 0, plus that TTL. The server reset the lease no
earlier than it received that request, which is after we sent it, so the server's own deadline is at
or after ours (whatever the network delay). Using the reply's arrival time instead would let a slow
reply stretch our belief past the server's expiry.

States: HELD (keep-alives answered) → SUSPENDED (keep-alives failing or overdue, local deadline not
passed; may return to HELD) → LOST (deadline passed, or the server answered TTL <= 0: terminal).

Keep-alives go out every TTL/3; one is *overdue* when unanswered for half an interval (TTL/6). A reply
normally takes milliseconds, so an overdue one means a frozen or partitioned member (or a member waiting
for a new raft leader), and the session moves to another one. Waiting a whole interval instead would leave
only a third of the TTL to find a member that answers, less than an etcd leader election can take.
"""

from __future__ import annotations

import enum
from collections import deque


class SessionState(enum.Enum):
    HELD = "held"
    SUSPENDED = "suspended"
    LOST = "lost"


class LeaseClock:
    """Tracks one lease. ``granted_at`` is the send time of the LeaseGrant request, ``ttl`` the granted TTL."""

    def __init__(self, granted_at: float, ttl: float, *, interval: float | None = None) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = float(ttl)
        self.deadline = granted_at + self.ttl
        self.interval = interval if interval is not None else max(self.ttl / 3.0, 0.05)
        self.patience = self.interval / 2
        self.last_sent = granted_at
        self._pending: deque[float] = deque()
        self._broken = False
        self._lost = False
        self.lost_reason = ""

    # -- events ----------------------------------------------------------------------------------
    def sent(self, now: float) -> None:
        """A keep-alive request was written at ``now``."""
        self._pending.append(now)
        self.last_sent = now

    def replied(self, ttl: int, now: float) -> SessionState:
        """A keep-alive reply arrived (replies come in request order on one stream)."""
        sent_at = self._pending.popleft() if self._pending else None
        if ttl <= 0:
            self._lose("the server reports the lease gone (keep-alive TTL 0)")
        elif sent_at is not None and not self._lost:
            self.deadline = max(self.deadline, sent_at + ttl)
            self.ttl = float(ttl)
            self._broken = False
        return self.state(now)

    def stream_broken(self) -> None:
        """The keep-alive stream failed: requests in flight will never be answered."""
        self._pending.clear()
        self._broken = True

    def revoked(self) -> None:
        self._lose("the lease was revoked")

    def _lose(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            self.lost_reason = reason

    # -- queries ---------------------------------------------------------------------------------
    def state(self, now: float) -> SessionState:
        if not self._lost and now >= self.deadline:
            self._lose(f"no keep-alive confirmed within the lease TTL ({self.ttl:g}s)")
        if self._lost:
            return SessionState.LOST
        if self._broken or self.overdue(now):
            return SessionState.SUSPENDED
        return SessionState.HELD

    def overdue(self, now: float) -> bool:
        """True when the oldest unanswered keep-alive was sent more than ``patience`` (half an interval) ago."""
        return bool(self._pending) and now - self._pending[0] > self.patience

    def next_send(self) -> float:
        """When the next keep-alive should be written."""
        return self.last_sent + self.interval

    def next_check(self) -> float:
        """When the keep-alive loop must look again: the next send, or the moment the oldest unanswered
        keep-alive becomes overdue, whichever comes first."""
        if self._pending:
            return min(self.next_send(), self._pending[0] + self.patience)
        return self.next_send()

    def remaining(self, now: float) -> float:
        """Seconds left before the local deadline (0 when LOST)."""
        return 0.0 if self._lost else max(0.0, self.deadline - now)
