"""Server settings with etcd's flag names and defaults, and etcd's member/cluster ID derivation."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_MAX_REQUEST_BYTES = 1_572_864  # 1.5 MiB
GRPC_OVERHEAD_BYTES = 512 * 1024
DEFAULT_QUOTA_BYTES = 2 * 1024**3
MAX_QUOTA_WARN_BYTES = 8 * 1024**3
DEFAULT_CLUSTER_TOKEN = "etcd-cluster"


class ConfigError(ValueError):
    """A flag value etcd would refuse too."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_urls(value: str, flag: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ConfigError(f"--{flag} must not be empty")
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme not in ("http", "https", "unix", "unixs"):
            raise ConfigError(f'--{flag}: URL scheme must be http, https, unix, or unixs: {u}')
        if parts.scheme != "http":
            raise ConfigError(f"--{flag}: only http:// URLs are supported by coord-server (got {u})")
        if parts.port is None:
            raise ConfigError(f"--{flag}: missing port in {u}")
        if parts.path not in ("", "/"):
            raise ConfigError(f'--{flag}: URL must not contain a path: {u}')
    return urls


def listen_address(url: str) -> HostPort:
    parts = urlsplit(url)
    host = parts.hostname or "0.0.0.0"
    if host == "localhost":
        host = "127.0.0.1"
    assert parts.port is not None
    return HostPort(host, parts.port)


def parse_initial_cluster(value: str) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise ConfigError(f"--initial-cluster: bad entry {item!r} (want name=url)")
        members.setdefault(name, []).append(url)
    return members


def member_id(peer_urls: list[str], token: str) -> int:
    """etcd's NewMember ID: SHA-1 of the sorted peer URLs and the cluster token, first 8 bytes."""
    digest = hashlib.sha1(("".join(sorted(peer_urls)) + token).encode()).digest()
    return int(struct.unpack(">Q", digest[:8])[0])


def cluster_id(member_ids: list[int]) -> int:
    """etcd's cluster ID: SHA-1 of the sorted member IDs as big-endian u64, first 8 bytes."""
    raw = b"".join(struct.pack(">Q", m) for m in sorted(member_ids))
    return int(struct.unpack(">Q", hashlib.sha1(raw).digest()[:8])[0])


@dataclass(slots=True)
class Config:
    """What ``coord-server`` was asked to do. Field names follow etcd's flags."""

    name: str = "default"
    data_dir: Path | None = None
    listen_client_urls: list[str] = field(default_factory=lambda: ["http://localhost:2379"])
    advertise_client_urls: list[str] = field(default_factory=lambda: ["http://localhost:2379"])
    listen_peer_urls: list[str] = field(default_factory=lambda: ["http://localhost:2380"])
    initial_advertise_peer_urls: list[str] = field(default_factory=lambda: ["http://localhost:2380"])
    initial_cluster: str | None = None
    initial_cluster_token: str = DEFAULT_CLUSTER_TOKEN
    initial_cluster_state: str = "new"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_txn_ops: int = 128
    quota_backend_bytes: int = 0
    log_level: str = "info"
    election_timeout_ms: int = 1000
    heartbeat_interval_ms: int = 100
    watch_progress_notify_interval: float = 600.0

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else Path(f"{self.name}.etcd")

    def quota(self) -> int:
        return self.quota_backend_bytes if self.quota_backend_bytes > 0 else DEFAULT_QUOTA_BYTES

    def max_recv_bytes(self) -> int:
        return self.max_request_bytes + GRPC_OVERHEAD_BYTES

    def cluster(self) -> dict[str, list[str]]:
        spec = self.initial_cluster
        if spec is None:
            spec = ",".join(f"{self.name}={u}" for u in self.initial_advertise_peer_urls)
        members = parse_initial_cluster(spec)
        if self.name not in members:
            raise ConfigError(
                f"couldn't find local name {self.name!r} in the initial cluster configuration")
        if sorted(members[self.name]) != sorted(self.initial_advertise_peer_urls):
            raise ConfigError(
                f"--initial-cluster has {self.name}={','.join(members[self.name])} but missing from "
                f"--initial-advertise-peer-urls={','.join(self.initial_advertise_peer_urls)}")
        if len(members) != 1:
            raise ConfigError("coord-server is a single-member server: --initial-cluster must name one member "
                              "(point the coord client at an etcd cluster to scale out)")
        return members

    def ids(self) -> tuple[int, int]:
        """(member ID, cluster ID), derived exactly as etcd derives them."""
        members = self.cluster()
        ids = [member_id(urls, self.initial_cluster_token) for urls in members.values()]
        mine = member_id(members[self.name], self.initial_cluster_token)
        return mine, cluster_id(ids)
