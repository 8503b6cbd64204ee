"""Which endpoint the client uses next: a pure state machine (no I/O, no clock; times and randomness are
passed in). The transport owns the channels; this only decides.

An endpoint that failed (connection refused, a broken stream, or reported silent by a keep-alive or a watch
probe) backs off for a short, jittered, doubling pause (50 ms up to 2 s); a success resets it. Among the
endpoints not backing off, the choice prefers one that has not failed since its last success, then the one
that failed *longest ago*, then the next in line. Failure counts only set the backoff: one incident is often
reported twice (by the keep-alive stream and by the watch probe), and when members fail one after another (a
killed leader, then a frozen member) the client must not bounce back to the member that just went silent
while another one, which failed earlier and has since recovered, is waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0


class EndpointRotation:
    """Failure bookkeeping for ``n`` endpoints; ``current`` is the index calls go to."""

    def __init__(self, n: int, *, jitter: Callable[[], float]) -> None:
        if n <= 0:
            raise ValueError("at least one endpoint is needed")
        self.n = n
        self.current = 0
        self.failures = [0] * n
        self.retry_at = [-math.inf] * n
        self.last_failed = [-math.inf] * n
        self._jitter = jitter  # uniform in [0, 1)

    def failed(self, i: int, now: float) -> None:
        """Endpoint ``i`` failed at ``now``: it backs off, and calls move to the next endpoint."""
        self.failures[i] += 1
        backoff = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (self.failures[i] - 1))
        self.retry_at[i] = now + backoff * (0.5 + self._jitter() / 2)
        self.last_failed[i] = now
        if self.current == i and self.n > 1:
            self.current = (i + 1) % self.n

    def ok(self, i: int) -> None:
        """Endpoint ``i`` answered."""
        self.failures[i] = 0
        self.retry_at[i] = -math.inf

    def healthy(self) -> bool:
        """True when the current endpoint has not failed since its last success (no choice to make)."""
        return self.failures[self.current] == 0

    def choose(self, now: float) -> tuple[int, float]:
        """The endpoint to use next and how long to wait before using it (0.0: now); makes it current."""
        eligible = [i for i in range(self.n) if self.retry_at[i] <= now]
        if not eligible:
            soonest = min(range(self.n), key=lambda i: self.retry_at[i])
            self.current = soonest
            return soonest, self.retry_at[soonest] - now
        if self.current in eligible and self.failures[self.current] == 0:
            return self.current, 0.0
        best = min(eligible, key=lambda i: (self.failures[i] > 0, self.last_failed[i], (i - self.current) % self.n))
        self.current = best
        return best, 0.0
