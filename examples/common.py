"""Shared plumbing of the example programs: connection flags, event-loop choice, signals, logfmt events, the
campaign loop of an elected replica, and child processes.

Kept small on purpose: each example's interesting part is in its own package.
"""

from __future__ import annotations

import abc
import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

import coord

DEFAULT_ENDPOINTS = "127.0.0.1:2379"


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """``--endpoints`` (default: $COORD_ENDPOINTS, $ETCDCTL_ENDPOINTS, 127.0.0.1:2379) and ``--user``."""
    default = os.environ.get("COORD_ENDPOINTS") or os.environ.get("ETCDCTL_ENDPOINTS") or DEFAULT_ENDPOINTS
    parser.add_argument(
        "--endpoints",
        default=default,
        help="comma-separated host:port of coord-server or etcd members "
        "(default: $COORD_ENDPOINTS, $ETCDCTL_ENDPOINTS or %(default)s)",
    )
    parser.add_argument("--user", default=os.environ.get("ETCDCTL_USER"),
                        help="USER:PASSWORD when the server has auth enabled (default: $ETCDCTL_USER)")


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``coord.open_client`` from the connection flags."""
    kw: dict[str, Any] = {"endpoints": args.endpoints}
    if args.user:
        user, _, password = args.user.partition(":")
        kw.update(user=user, password=password)
    return kw


def add_backend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["trio", "asyncio", "uvloop"], default="trio",
                        help="event loop to run on (default: %(default)s); coord works the same on each")


def add_fleet_args(parser: argparse.ArgumentParser, fleet: str) -> None:
    """The flags every command of a replicated example takes: connection, ``--prefix`` (default: ``fleet``),
    ``--backend``."""
    add_connection_args(parser)
    parser.add_argument("--prefix", default=fleet, help=f"key prefix of this {fleet} fleet (default: %(default)s)")
    add_backend_arg(parser)


def run(main: Callable[..., Awaitable[int]], *args: Any, backend: str = "trio") -> int:
    """Run ``main(*args)`` on the chosen event loop and return its exit code."""
    if backend == "trio":
        return anyio.run(main, *args, backend="trio")
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    return anyio.run(main, *args, backend="asyncio", backend_options=options)


def run_cli(main: Callable[..., Awaitable[int]], *args: Any, backend: str, prog: str, error_status: int = 1) -> int:
    """:func:`run`, for a program's ``main``: a :class:`coord.CoordError` that escapes is reported on stderr as
    ``<prog>: <type>: <message>`` and gives ``error_status``; Ctrl-C gives 130. Other exceptions propagate."""
    try:
        return run(main, *args, backend=backend)
    except coord.CoordError as exc:
        warn(f"{prog}: {type(exc).__name__}: {exc}")
        return error_status
    except KeyboardInterrupt:
        return 130


async def on_signals(
    callback: Callable[[signal.Signals], None],
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> None:
    """Call ``callback(sig)`` for every signal received; runs until cancelled (start it in a task group)."""
    with anyio.open_signal_receiver(*signals) as received:
        async for sig in received:
            callback(signal.Signals(sig))


# -- an elected replica ------------------------------------------------------------------------------------


def default_id() -> str:
    """A replica's default name: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class FleetKeys:
    """The keys of a fleet of replicas under one prefix (no trailing slash)."""

    prefix: str

    @property
    def election(self) -> str:
        """The election, in etcd's layout: ``etcdctl elect -l <prefix>/leader`` shows the leader."""
        return f"{self.prefix}/leader"


class Deposed(Exception):
    """A fenced step failed: this replica no longer leads."""


class Campaigner(abc.ABC):
    """Campaigns in an election, runs :meth:`lead` while elected, and campaigns again after losing office, until
    stopped. Subclasses implement :meth:`lead` and name their logfmt events.

    :meth:`stop` (first SIGTERM/SIGINT): a waiting replica leaves the queue at once; an elected one is left to
    :meth:`lead`, which watches :attr:`stopping` and returns, and then resigns. A second :meth:`stop` cancels
    everything. Losing office (:class:`coord.LeadershipLost`, or :class:`Deposed` from :meth:`lead`) and any
    other :class:`coord.CoordError` (unreachable store, expired session: after a 1 s pause) end the term, not
    the loop. Events, each with ``<role>=<name>``: ``<waiting_event>``, ``<elected_event> token=``,
    ``resigned token=``, ``deposed reason=``, ``error error=``, ``stopped``; :meth:`summary` adds fields to
    ``resigned`` and ``stopped``.
    """

    role = "replica"  # the logfmt field that names the replica
    waiting_event = "campaign"
    elected_event = "leader"

    def __init__(self, client: coord.Client, *, election: str, ttl: int, name: str, value: str) -> None:
        self.client = client
        self.name = name
        self.stopping = anyio.Event()
        self._election = client.election(election, ttl=ttl)
        self._value = value
        self._waiting: anyio.CancelScope | None = None
        self._hard = anyio.CancelScope()

    @abc.abstractmethod
    async def lead(self, term: coord.Term) -> None:
        """The elected replica's work; return to resign (it must return soon after :attr:`stopping` is set)."""

    def summary(self) -> dict[str, object]:
        """Extra fields of the ``resigned`` and ``stopped`` events."""
        return {}

    def stop(self) -> None:
        if self.stopping.is_set():
            self._hard.cancel()
        self.stopping.set()
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self) -> None:
        """Campaign and lead until stopped (see the class docstring); raises nothing of coord's."""
        me = {self.role: self.name}
        with self._hard:
            while not self.stopping.is_set():
                emit(self.waiting_event, **me)
                try:
                    with anyio.CancelScope() as self._waiting:
                        async with self._election.campaign(self._value) as term:
                            self._waiting = None  # from now on stop() is left to lead()
                            emit(self.elected_event, **me, token=term.revision)
                            await self.lead(term)
                        emit("resigned", **me, token=term.revision, **self.summary())
                except* (coord.LeadershipLost, Deposed) as group:
                    emit("deposed", **me, reason="; ".join(map(str, group.exceptions)))
                except* coord.CoordError as group:  # unreachable store, expired session: campaign again
                    emit("error", **me, error="; ".join(map(repr, group.exceptions)))
                    await anyio.sleep(1.0)
                finally:
                    self._waiting = None
        emit("stopped", **me, **self.summary())


async def serve_replica(args: argparse.Namespace, make: Callable[[coord.Client], Campaigner]) -> int:
    """Connect with the connection flags and run ``make(client)`` until it has stopped; every SIGTERM, SIGINT
    or SIGHUP calls its :meth:`~Campaigner.stop`. Returns 0; raises :class:`coord.CoordError` if the client
    cannot be opened."""
    async with coord.open_client(**client_kwargs(args)) as client:
        replica = make(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signals, lambda sig: replica.stop())
            await replica.run()
            tg.cancel_scope.cancel()
    return 0


# -- child processes -----------------------------------------------------------------------------------------


def exit_status(returncode: int) -> int:
    """A Popen-style return code as a shell would report it (128+N for a process killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _quote(value: object) -> str:
    s = str(value)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def emit(event: str, **fields: object) -> None:
    """Print one logfmt line on stdout (``ts=<unix time> event=<event> k=v ...``) and flush it.

    The examples report what they do this way: readable by people, and parseable by log pipelines (and by
    the tests, which compare these timestamps with their own clock on the same machine).
    """
    parts = [f"ts={time.time():.6f}", f"event={event}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    print(" ".join(parts), flush=True)


def warn(message: str) -> None:
    """A human message on stderr."""
    print(message, file=sys.stderr, flush=True)


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one line printed by :func:`emit` (for tests and log tooling)."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        j = line.find("=", i)
        if j < 0:
            break
        key = line[i:j]
        i = j + 1
        if i < n and line[i] == '"':
            i += 1
            buf = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    nxt = line[i + 1]
                    buf.append("\n" if nxt == "n" else nxt)
                    i += 2
                else:
                    buf.append(line[i])
                    i += 1
            i += 1
            out[key] = "".join(buf)
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            out[key] = line[i:j]
            i = j
    return out
