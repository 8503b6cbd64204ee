"""``coord-server``: etcd's flags (and ``ETCD_*`` environment variables) for a single member."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from ._version import API_VERSION, SERVER_VERSION
from .backend import BackendError
from .config import (
    DEFAULT_CLUSTER_TOKEN,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_QUOTA_WARN_BYTES,
    Config,
    ConfigError,
    parse_urls,
)
from .wal import WalError

log = logging.getLogger("coord_server")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR,
           "panic": logging.CRITICAL, "fatal": logging.CRITICAL}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coord-server",
        description="A single-member server that speaks the etcd v3 API (gRPC and HTTP on the client URL). "
                    "Every flag can also be set as ETCD_<FLAG> in the environment, e.g. ETCD_DATA_DIR.")
    a = p.add_argument
    a("--name", default="default", help="human-readable name for this member (default: default)")
    a("--data-dir", default=None, help="path to the data directory (default: ${name}.etcd)")
    a("--listen-client-urls", default="http://localhost:2379", help="URLs to serve clients on")
    a("--advertise-client-urls", default="http://localhost:2379", help="client URLs to advertise")
    a("--listen-peer-urls", default="http://localhost:2380", help="accepted for compatibility (no peers)")
    a("--initial-advertise-peer-urls", default="http://localhost:2380",
      help="this member's peer URLs; with the cluster token they determine the member ID")
    a("--initial-cluster", default=None, help="initial cluster configuration (one member)")
    a("--initial-cluster-token", default=DEFAULT_CLUSTER_TOKEN, help="initial cluster token")
    a("--initial-cluster-state", default="new", choices=["new", "existing"], help="accepted for compatibility")
    a("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
      help="maximum client request size in bytes the server will accept")
    a("--max-txn-ops", type=int, default=128, help="maximum number of operations permitted in a transaction")
    a("--quota-backend-bytes", type=int, default=0, help="raise alarms when backend size exceeds this (0 = 2 GiB)")
    a("--log-level", default="info", choices=sorted(_LEVELS), help="log level")
    a("--election-timeout", type=int, default=1000, help="election timeout in ms (sets the minimum lease TTL)")
    a("--heartbeat-interval", type=int, default=100, help="heartbeat interval in ms (accepted)")
    a("--experimental-watch-progress-notify-interval", default="10m",
      help="interval of watch progress notifications, e.g. 1s, 500ms, 10m")
    a("--version", action="store_true", help="print the version and exit")
    return p


def _env_defaults(parser: argparse.ArgumentParser) -> None:
    """ETCD_FOO_BAR sets --foo-bar unless the flag is given (etcd's rule)."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        env = "ETCD_" + action.dest.upper()
        if env in os.environ:
            raw = os.environ[env]
            action.default = action.type(raw) if callable(action.type) else raw


def parse_duration(text: str) -> float:
    """Go-style durations: 100ms, 1s, 10m, 1h, 1m30s."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, num = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not num:
            raise ConfigError(f"invalid duration {text!r}")
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num:
        raise ConfigError(f"invalid duration {text!r} (missing unit)")
    return total


def config_from_args(argv: Sequence[str] | None = None) -> Config | None:
    parser = _parser()
    _env_defaults(parser)
    ns = parser.parse_args(argv)
    if ns.version:
        print(f"coord-server Version: {SERVER_VERSION}\nAPI Version: {API_VERSION}")
        return None
    interval = parse_duration(ns.experimental_watch_progress_notify_interval)
    if interval < 0.1:
        raise ConfigError("--experimental-watch-progress-notify-interval must be at least 100ms")
    if ns.max_request_bytes <= 0 or ns.max_txn_ops <= 0:
        raise ConfigError("--max-request-bytes and --max-txn-ops must be positive")
    return Config(
        name=ns.name,
        data_dir=Path(ns.data_dir) if ns.data_dir else None,
        listen_client_urls=parse_urls(ns.listen_client_urls, "listen-client-urls"),
        advertise_client_urls=parse_urls(ns.advertise_client_urls, "advertise-client-urls"),
        listen_peer_urls=parse_urls(ns.listen_peer_urls, "listen-peer-urls"),
        initial_advertise_peer_urls=parse_urls(ns.initial_advertise_peer_urls, "initial-advertise-peer-urls"),
        initial_cluster=ns.initial_cluster,
        initial_cluster_token=ns.initial_cluster_token,
        initial_cluster_state=ns.initial_cluster_state,
        max_request_bytes=ns.max_request_bytes,
        max_txn_ops=ns.max_txn_ops,
        quota_backend_bytes=ns.quota_backend_bytes,
        log_level=ns.log_level,
        election_timeout_ms=ns.election_timeout,
        heartbeat_interval_ms=ns.heartbeat_interval,
        watch_progress_notify_interval=interval,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"coord-server: {exc}", file=sys.stderr)
        return 2
    if config is None:
        return 0
    logging.basicConfig(level=_LEVELS[config.log_level], stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.quota_backend_bytes > MAX_QUOTA_WARN_BYTES:
        log.warning("--quota-backend-bytes %d exceeds the suggested maximum %d",
                    config.quota_backend_bytes, MAX_QUOTA_WARN_BYTES)
    from .app import serve

    try:
        config.ids()
        return anyio.run(serve, config, backend="asyncio", backend_options={"use_uvloop": True})
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (BackendError, WalError) as exc:
        log.critical("%s", exc)
        return 1
    except OSError as exc:
        log.critical("cannot serve: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
