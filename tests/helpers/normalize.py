"""Normalisation of etcdctl output before comparing coord-server with real etcd.

Only what MUST differ between two servers is replaced; everything else is compared byte for byte.
The complete list (anything not listed here is compared exactly, in particular revisions, versions,
create/mod revisions, counts, HashKV hashes, compact revisions, error texts and gRPC codes):

  exact values of the server being normalised (replaced by value, not by position, so a server that
  prints a wrong ID or puts one in the wrong place still shows up as a difference):
    * its member ID, decimal                  -> <MEMBER_ID>
    * its member ID, hex (%x and %016x)       -> <MEMBER_HEX>
    * its cluster ID, decimal / hex           -> <CLUSTER_ID> / <CLUSTER_HEX>
    * its client port / peer port             -> <CLIENT_PORT> / <PEER_PORT>  (ports are picked per test)
  raft bookkeeping (coord has no raft log; etcd's numbers depend on its internal proposals):
    * raft term    : "raft_term":N, "raftTerm":N, "RaftTerm" : N
    * raft index   : "raftIndex":N, "raftAppliedIndex":N, "RaftIndex" : N, "RaftAppliedIndex" : N
  backend file sizes (bbolt page layout vs. coord's engine):
    * "dbSize":N, "dbSizeInUse":N, "DBSize" : N, "DBSizeInUse" : N, and the humanised size ("20 kB")
  positional fields of `endpoint status` (simple format line and table): DB SIZE, RAFT TERM, RAFT INDEX,
  RAFT APPLIED INDEX columns
  timings: "took = 1.2ms", "took":"1.2ms", "Took" : 1.2ms, the TOOK table column
  etcdctl's own client log lines: "ts":"<timestamp>" and the random "client-<uuid>" in "target"
  table padding: etcdctl tables are re-rendered without padding (cell widths follow from the contents,
  which stay compared) because a normalised cell changes the column width
  Maintenance/Hash (not HashKV): it hashes etcd's bbolt file; etcdctl 3.4 never prints it, so it only
  appears in protobuf comparisons, see normalize_message().
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol


class _HasIdentity(Protocol):
    member_id: int
    cluster_id: int
    client_port: int
    peer_port: int


@dataclass(frozen=True)
class Known:
    """Server-specific values replaced by exact match."""

    member_id: int
    cluster_id: int
    client_port: int
    peer_port: int

    @classmethod
    def of(cls, server: _HasIdentity) -> Known:
        return cls(server.member_id, server.cluster_id, server.client_port, server.peer_port)


def _exact(value: str) -> re.Pattern[str]:
    return re.compile(r"(?<![0-9A-Za-z])" + re.escape(value) + r"(?![0-9A-Za-z])")


_DURATION = r"[0-9][0-9.]*(?:ns|µs|us|ms|s|m|h)(?:[0-9.]+(?:ns|µs|us|ms|s|m|h))*"

# (pattern, replacement) applied in this order, regardless of the server.
_FIELD_RULES: list[tuple[re.Pattern[str], str]] = [
    # raft term
    (re.compile(r'("raft_term":)\d+'), r"\1<RAFT_TERM>"),
    (re.compile(r'("raftTerm":)\d+'), r"\1<RAFT_TERM>"),
    (re.compile(r'("RaftTerm" : )\d+'), r"\1<RAFT_TERM>"),
    # raft index
    (re.compile(r'("raftIndex":)\d+'), r"\1<RAFT_INDEX>"),
    (re.compile(r'("raftAppliedIndex":)\d+'), r"\1<RAFT_INDEX>"),
    (re.compile(r'("RaftIndex" : )\d+'), r"\1<RAFT_INDEX>"),
    (re.compile(r'("RaftAppliedIndex" : )\d+'), r"\1<RAFT_INDEX>"),
    # db sizes
    (re.compile(r'("dbSize":)\d+'), r"\1<DB_SIZE>"),
    (re.compile(r'("dbSizeInUse":)\d+'), r"\1<DB_SIZE>"),
    (re.compile(r'("DBSize" : )\d+'), r"\1<DB_SIZE>"),
    (re.compile(r'("DBSizeInUse" : )\d+'), r"\1<DB_SIZE>"),
    # timings
    (re.compile(r"(took = )" + _DURATION), r"\1<DURATION>"),
    (re.compile(r'("took":")' + _DURATION + '"'), r'\1<DURATION>"'),
    (re.compile(r'("Took" : )' + _DURATION), r"\1<DURATION>"),
    # etcdctl's zap log lines ({"level":"warn","ts":"2026-...Z","caller":...,"target":"endpoint://client-<uuid>/...})
    (re.compile(r'("ts":")[^"]*(")'), r"\1<TS>\2"),
    (re.compile(r"(endpoint://client-)[0-9a-f-]{36}(/)"), r"\1<UUID>\2"),
]

# `etcdctl endpoint status` simple format:
# 127.0.0.1:P, <id hex>, 3.4.23, 20 kB, true, false, 2, 4, 4, <errors>
_STATUS_LINE = re.compile(
    r"^(?P<head>[^,\n]+, [^,\n]+, [^,\n]+, )(?P<db>[0-9.]+ [kMGTPE]?B)"
    r"(?P<mid>, (?:true|false), (?:true|false), )(?P<term>\d+), (?P<index>\d+), (?P<applied>\d+), ",
    re.MULTILINE,
)

_TABLE_NORMALISED_COLUMNS = {
    "DB SIZE": "<DB_SIZE>",
    "RAFT TERM": "<RAFT_TERM>",
    "RAFT INDEX": "<RAFT_INDEX>",
    "RAFT APPLIED INDEX": "<RAFT_INDEX>",
    "TOOK": "<DURATION>",
}


def _normalise_status_line(m: re.Match[str]) -> str:
    return f"{m['head']}<DB_SIZE>{m['mid']}<RAFT_TERM>, <RAFT_INDEX>, <RAFT_INDEX>, "


def _normalise_tables(text: str) -> str:
    out: list[str] = []
    header: list[str] | None = None
    for line in text.split("\n"):
        if re.fullmatch(r"\+(?:-+\+)+", line):
            out.append("+" + "-+" * (line.count("+") - 1))
            continue
        if len(line) > 1 and line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line[1:-1].split("|")]
            if header is None:
                header = cells
            else:
                for i, h in enumerate(header[: len(cells)]):
                    if h in _TABLE_NORMALISED_COLUMNS and cells[i]:
                        cells[i] = _TABLE_NORMALISED_COLUMNS[h]
            out.append("| " + " | ".join(cells) + " |")
            continue
        header = None
        out.append(line)
    return "\n".join(out)


def normalize(text: str, server: _HasIdentity | Known | None = None) -> str:
    """Normalise etcdctl output. Pass the server to also replace its IDs and ports by exact value."""
    if server is not None:
        k = server if isinstance(server, Known) else Known.of(server)
        exact: list[tuple[str, str]] = [
            (str(k.member_id), "<MEMBER_ID>"),
            (f"{k.member_id:016x}", "<MEMBER_HEX>"),
            (f"{k.member_id:x}", "<MEMBER_HEX>"),
            (str(k.cluster_id), "<CLUSTER_ID>"),
            (f"{k.cluster_id:016x}", "<CLUSTER_HEX>"),
            (f"{k.cluster_id:x}", "<CLUSTER_HEX>"),
        ]
        for value, placeholder in exact:
            text = _exact(value).sub(placeholder, text)
        text = re.sub(rf"(127\.0\.0\.1|localhost):{k.client_port}(?![0-9])", r"\1:<CLIENT_PORT>", text)
        text = re.sub(rf"(127\.0\.0\.1|localhost):{k.peer_port}(?![0-9])", r"\1:<PEER_PORT>", text)
    for pattern, repl in _FIELD_RULES:
        text = pattern.sub(repl, text)
    text = _STATUS_LINE.sub(_normalise_status_line, text)
    if "+-" in text:
        text = _normalise_tables(text)
    return text


# ---------------------------------------------------------------------------------------------------
# protobuf responses (for gRPC-level comparisons)

_HEADER_FIELDS = ("cluster_id", "member_id", "raft_term")
_STATUS_FIELDS = ("dbSize", "dbSizeInUse", "raftIndex", "raftTerm", "raftAppliedIndex", "leader")


def normalize_message(msg: Any) -> Any:
    """A copy of a response message with the server-specific fields cleared.

    Cleared: header.cluster_id/member_id/raft_term (also in nested txn responses), StatusResponse's
    dbSize/dbSizeInUse/raft numbers/leader, HashResponse.hash, Member ID/peerURLs/clientURLs.
    Kept: header.revision, HashKVResponse.hash and compact_revision, everything else.
    """
    out = type(msg)()
    out.CopyFrom(msg)
    _clear(out)
    return out


def _clear(msg: Any) -> None:
    name = msg.DESCRIPTOR.name
    fields = {f.name for f in msg.DESCRIPTOR.fields}
    if name == "ResponseHeader":
        for f in _HEADER_FIELDS:
            msg.ClearField(f)
        return
    if name == "StatusResponse":
        for f in _STATUS_FIELDS:
            msg.ClearField(f)
    if name == "HashResponse":
        msg.ClearField("hash")
    if name == "Member":
        for f in ("ID", "peerURLs", "clientURLs"):
            msg.ClearField(f)
    if name == "AlarmMember":
        msg.ClearField("memberID")
    for fd in msg.DESCRIPTOR.fields:
        if fd.message_type is None or fd.name not in fields:
            continue
        value = getattr(msg, fd.name)
        if fd.is_repeated:
            for item in value:
                _clear(item)
        elif msg.HasField(fd.name):
            _clear(value)
