"""The committed generated modules in src/coord/_pb must match proto/, and proto/ must carry
etcd 3.4's wire contract (names, numbers, streaming shapes)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PB_DIR = ROOT / "src" / "coord" / "_pb"
GENPROTO = ROOT / "scripts" / "genproto.py"

# Files in src/coord/_pb that are not produced by genproto.
NOT_GENERATED = {"__init__.py"}


def _listing(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.is_file() and p.name not in NOT_GENERATED}


def _generate(out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(GENPROTO), "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"genproto failed:\n{proc.stdout}\n{proc.stderr}"


def test_generated_modules_match_proto(tmp_path: Path) -> None:
    out = tmp_path / "_pb"
    _generate(out)

    fresh, committed = _listing(out), _listing(PB_DIR)
    assert fresh, "genproto produced nothing"
    assert fresh == committed, (
        f"missing from src/coord/_pb: {sorted(fresh - committed)}; "
        f"extra in src/coord/_pb: {sorted(committed - fresh)}; run scripts/genproto.py"
    )

    stale = sorted(name for name in fresh if (out / name).read_bytes() != (PB_DIR / name).read_bytes())
    if stale:
        # Output also depends on the grpcio-tools version (bundled protoc + plugin): say which.
        committed_grpc = (PB_DIR / "rpc_pb2_grpc.py").read_text(encoding="utf-8")
        m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed_grpc)
        hint = (
            f" (committed files were made with grpcio-tools {m.group(1) if m else '?'}, "
            f"installed: {importlib.metadata.version('grpcio-tools')})"
        )
        pytest.fail(f"generated files differ from src/coord/_pb: {stale}; run scripts/genproto.py{hint}")


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _generate(a)
    _generate(b)
    assert _listing(a) == _listing(b)
    for name in _listing(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_imports_are_package_relative() -> None:
    for path in sorted(PB_DIR.glob("*_pb2*.py*")):
        text = path.read_text(encoding="utf-8")
        flat = re.findall(r"^(?:import|from) (?:kv|auth|rpc|v3lock|v3election)_pb2\b.*$", text, re.MULTILINE)
        assert not flat, f"{path.name} has flat imports: {flat}"


# --------------------------------------------------------------------------------------------
# Wire facts
# --------------------------------------------------------------------------------------------


def test_package_names() -> None:
    from google.protobuf import descriptor_pb2

    from coord._pb import auth_pb2, kv_pb2, rpc_pb2, v3election_pb2, v3lock_pb2

    assert kv_pb2.DESCRIPTOR.package == "mvccpb"
    assert auth_pb2.DESCRIPTOR.package == "authpb"
    assert rpc_pb2.DESCRIPTOR.package == "etcdserverpb"
    assert v3lock_pb2.DESCRIPTOR.package == "v3lockpb"
    assert v3election_pb2.DESCRIPTOR.package == "v3electionpb"
    for mod in (kv_pb2, auth_pb2, rpc_pb2, v3lock_pb2, v3election_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        assert fdp.syntax == "proto3"
        assert fdp.options.ByteSize() == 0, "no file options (gogoproto etc.) expected"
        assert all(m.options.ByteSize() == 0 for s in fdp.service for m in s.method), "no google.api.http"


def test_field_numbers() -> None:
    from coord._pb import auth_pb2, kv_pb2, rpc_pb2

    def num(msg: object, field: str) -> int:
        return msg.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined,no-any-return]

    assert num(rpc_pb2.Compare, "range_end") == 64
    assert num(rpc_pb2.WatchResponse, "events") == 11
    assert num(rpc_pb2.WatchResponse, "fragment") == 7
    assert num(rpc_pb2.WatchCreateRequest, "fragment") == 8
    assert num(rpc_pb2.RangeRequest, "max_create_revision") == 13
    assert num(rpc_pb2.StatusResponse, "isLearner") == 10
    assert num(rpc_pb2.LeaseCheckpoint, "remaining_TTL") == 2
    assert num(rpc_pb2.AuthUserGrantRoleRequest, "user") == 1
    assert num(rpc_pb2.AuthUserRevokeRoleRequest, "name") == 1
    assert num(rpc_pb2.AuthRoleGetRequest, "role") == 1
    assert num(auth_pb2.Permission, "permType") == 1
    assert num(auth_pb2.Role, "keyPermission") == 2
    assert num(kv_pb2.KeyValue, "lease") == 6

    assert [f.name for f in rpc_pb2.Compare.DESCRIPTOR.oneofs_by_name["target_union"].fields] == [
        "version",
        "create_revision",
        "mod_revision",
        "value",
        "lease",
    ]
    assert set(rpc_pb2.RequestOp.DESCRIPTOR.oneofs_by_name) == {"request"}
    assert set(rpc_pb2.ResponseOp.DESCRIPTOR.oneofs_by_name) == {"response"}
    assert set(rpc_pb2.WatchRequest.DESCRIPTOR.oneofs_by_name) == {"request_union"}
    assert rpc_pb2.WatchCreateRequest.DESCRIPTOR.fields_by_name["filters"].is_packed


def test_enum_nesting_and_values() -> None:
    from coord._pb import auth_pb2, kv_pb2, rpc_pb2

    assert rpc_pb2.RangeRequest.SortOrder.DESCRIPTOR.full_name == "etcdserverpb.RangeRequest.SortOrder"
    assert rpc_pb2.RangeRequest.SortTarget.DESCRIPTOR.full_name == "etcdserverpb.RangeRequest.SortTarget"
    assert rpc_pb2.Compare.CompareResult.DESCRIPTOR.full_name == "etcdserverpb.Compare.CompareResult"
    assert rpc_pb2.Compare.CompareTarget.DESCRIPTOR.full_name == "etcdserverpb.Compare.CompareTarget"
    assert (
        rpc_pb2.WatchCreateRequest.FilterType.DESCRIPTOR.full_name
        == "etcdserverpb.WatchCreateRequest.FilterType"
    )
    assert rpc_pb2.AlarmRequest.AlarmAction.DESCRIPTOR.full_name == "etcdserverpb.AlarmRequest.AlarmAction"
    assert rpc_pb2.AlarmType.DESCRIPTOR.full_name == "etcdserverpb.AlarmType"
    assert kv_pb2.Event.EventType.DESCRIPTOR.full_name == "mvccpb.Event.EventType"
    assert auth_pb2.Permission.Type.DESCRIPTOR.full_name == "authpb.Permission.Type"

    assert rpc_pb2.Compare.NOT_EQUAL == 3
    assert rpc_pb2.Compare.LEASE == 4
    assert rpc_pb2.RangeRequest.VALUE == 4
    assert rpc_pb2.WatchCreateRequest.NODELETE == 1
    assert rpc_pb2.CORRUPT == 2
    assert kv_pb2.Event.DELETE == 1
    assert auth_pb2.Permission.READWRITE == 2


# service full name -> {method: (client_streaming, server_streaming)}
SERVICES: dict[str, dict[str, tuple[bool, bool]]] = {
    "etcdserverpb.KV": {m: (False, False) for m in ("Range", "Put", "DeleteRange", "Txn", "Compact")},
    "etcdserverpb.Watch": {"Watch": (True, True)},
    "etcdserverpb.Lease": {
        "LeaseGrant": (False, False),
        "LeaseRevoke": (False, False),
        "LeaseKeepAlive": (True, True),
        "LeaseTimeToLive": (False, False),
        "LeaseLeases": (False, False),
    },
    "etcdserverpb.Cluster": {
        m: (False, False)
        for m in ("MemberAdd", "MemberRemove", "MemberUpdate", "MemberList", "MemberPromote")
    },
    "etcdserverpb.Maintenance": {
        "Alarm": (False, False),
        "Status": (False, False),
        "Defragment": (False, False),
        "Hash": (False, False),
        "HashKV": (False, False),
        "Snapshot": (False, True),
        "MoveLeader": (False, False),
    },
    "etcdserverpb.Auth": {
        m: (False, False)
        for m in (
            "AuthEnable",
            "AuthDisable",
            "Authenticate",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        )
    },
    "v3lockpb.Lock": {"Lock": (False, False), "Unlock": (False, False)},
    "v3electionpb.Election": {
        "Campaign": (False, False),
        "Proclaim": (False, False),
        "Leader": (False, False),
        "Observe": (False, True),
        "Resign": (False, False),
    },
}


def test_services_and_methods() -> None:
    from coord._pb import rpc_pb2, v3election_pb2, v3lock_pb2

    found: dict[str, dict[str, tuple[bool, bool]]] = {}
    for mod in (rpc_pb2, v3lock_pb2, v3election_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            found[svc.full_name] = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert found == SERVICES

    election = v3election_pb2.DESCRIPTOR.services_by_name["Election"]
    observe = election.methods_by_name["Observe"]
    assert observe.input_type.full_name == "v3electionpb.LeaderRequest"
    assert observe.output_type.full_name == "v3electionpb.LeaderResponse"
    lock = v3lock_pb2.DESCRIPTOR.services_by_name["Lock"].methods_by_name["Lock"]
    header_type = lock.output_type.fields_by_name["header"].message_type
    assert header_type is not None
    assert header_type.full_name == "etcdserverpb.ResponseHeader"


def test_grpc_stubs_use_etcd_paths() -> None:
    from coord._pb import rpc_pb2_grpc, v3election_pb2_grpc, v3lock_pb2_grpc

    mods = (rpc_pb2_grpc, v3lock_pb2_grpc, v3election_pb2_grpc)
    texts = "".join(Path(str(m.__file__)).read_text(encoding="utf-8") for m in mods)
    for svc, methods in SERVICES.items():
        for method in methods:
            assert f"'/{svc}/{method}'" in texts, f"/{svc}/{method}"
    assert "/etcdserverpb.Auth/AuthStatus" not in texts
    assert "/etcdserverpb.Maintenance/Downgrade" not in texts


def test_wire_bytes() -> None:
    """A couple of encodings that a real etcd produces/accepts byte for byte."""
    from coord._pb import kv_pb2, rpc_pb2

    cmp = rpc_pb2.Compare(key=b"a", range_end=b"b", target=rpc_pb2.Compare.MOD, mod_revision=0)
    # field 64, wire type 2 -> varint key 0x202 -> b"\x82\x04"; mod_revision=0 still emitted (oneof)
    assert cmp.SerializeToString() == b"\x10\x02\x1a\x01a\x30\x00\x82\x04\x01b"
    resp = rpc_pb2.WatchResponse(events=[kv_pb2.Event(type=kv_pb2.Event.DELETE)])
    assert resp.SerializeToString() == b"\x5a\x02\x08\x01"
