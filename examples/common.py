"""Shared plumbing of the example programs: connection flags, event-loop choice, signals, logfmt events.

Kept small on purpose: each example's interesting part is in its own package.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

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


def run(main: Callable[..., Awaitable[int]], *args: Any, backend: str = "trio") -> int:
    """Run ``main(*args)`` on the chosen event loop and return its exit code."""
    if backend == "trio":
        return anyio.run(main, *args, backend="trio")
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    return anyio.run(main, *args, backend="asyncio", backend_options=options)


async def on_signals(
    callback: Callable[[signal.Signals], None],
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> None:
    """Call ``callback(sig)`` for every signal received; runs until cancelled (start it in a task group)."""
    with anyio.open_signal_receiver(*signals) as received:
        async for sig in received:
            callback(signal.Signals(sig))


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
