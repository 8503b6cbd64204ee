"""The fenced sink: its rule (:class:`FencedStore`), its HTTP server and a client.

The rule, applied atomically per request:

1. A write whose token is lower than the highest token seen so far is **stale**: refused (HTTP 409). The
   writer was deposed, or paused while someone newer took over.
2. Otherwise the token becomes the highest seen; if the key already has a value the write is a
   **duplicate** (HTTP 200, the first value is kept): a re-run of the same tick or item is harmless.
3. Otherwise the value is **applied** (HTTP 201).

HTTP: ``PUT /effects/<key>`` with header ``Fencing-Token: <int>`` (and optionally ``Writer: <name>``), body
= the value. ``GET /effects/<key>`` reads a value, ``GET /stats`` returns everything as JSON.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Outcome = Literal["applied", "duplicate", "stale"]


@dataclass(frozen=True)
class WriteResult:
    outcome: Outcome
    max_token: int


@dataclass
class FencedStore:
    """The sink's state and rule (thread-safe). ``log`` keeps every decision in order."""

    max_token: int = 0
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, key: str, value: str, token: int, writer: str = "") -> WriteResult:
        with self._lock:
            entry = {"key": key, "token": token, "writer": writer, "at": time.time()}
            if token < self.max_token:
                outcome: Outcome = "stale"
            else:
                self.max_token = token
                if key in self.values:
                    outcome = "duplicate"
                else:
                    outcome = "applied"
                    self.values[key] = {"value": value, **entry}
            self.log.append({"outcome": outcome, **entry})
            return WriteResult(outcome, self.max_token)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = {o: sum(1 for e in self.log if e["outcome"] == o) for o in ("applied", "duplicate", "stale")}
            return {"max_token": self.max_token, "counts": counts, "values": dict(self.values), "log": list(self.log)}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: dict[str, Any] | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length).decode(errors="replace")
        if not self.path.startswith("/effects/"):
            self._reply(HTTPStatus.NOT_FOUND, {"error": "PUT /effects/<key>"})
            return
        try:
            token = int(self.headers["Fencing-Token"])
        except (TypeError, ValueError):
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "a Fencing-Token header with an integer is required"})
            return
        key = urllib.parse.unquote(self.path[len("/effects/"):])
        res = self.server.store.write(key, value, token, self.headers.get("Writer", ""))
        status = {"applied": HTTPStatus.CREATED, "duplicate": HTTPStatus.OK, "stale": HTTPStatus.CONFLICT}
        self._reply(status[res.outcome], {"result": res.outcome, "token": token, "max_token": res.max_token})

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._reply(HTTPStatus.OK, self.server.store.snapshot())
        elif self.path.startswith("/effects/"):
            found = self.server.store.snapshot()["values"].get(urllib.parse.unquote(self.path[len("/effects/"):]))
            if found is None:
                self._reply(HTTPStatus.NOT_FOUND, {"error": "no such key"})
            else:
                self._reply(HTTPStatus.OK, found)
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "GET /stats or /effects/<key>"})

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.store = FencedStore()
        self.verbose = verbose


def serve(host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> _Server:
    """A server bound to (host, port) (0 = any free port); call ``serve_forever()`` on it."""
    return _Server((host, port), verbose)


def write(url: str, key: str, value: str, token: int, *, writer: str = "", timeout: float = 5.0) -> WriteResult:
    """PUT one value; returns the sink's verdict. Raises OSError (urllib.error.URLError) if unreachable."""
    req = urllib.request.Request(
        url.rstrip("/") + "/effects/" + urllib.parse.quote(key, safe=""),
        data=value.encode(),
        method="PUT",
        headers={"Fencing-Token": str(token), "Writer": writer},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code != HTTPStatus.CONFLICT:
                raise
            body = json.loads(exc.read())
    return WriteResult(body["result"], int(body["max_token"]))


def stats(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/stats", timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result
