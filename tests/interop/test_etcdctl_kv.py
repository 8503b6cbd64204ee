"""Differential tests: the real etcdctl 3.4 against a fresh real etcd 3.4.23 and a fresh coord-server.

Every test runs the same etcdctl invocations against both servers and compares rc, stdout and stderr
after normalising only what must differ (helpers/normalize.py: IDs, ports, raft term/index, db size,
timings). Revisions, versions, counts and error texts are compared exactly.
"""

from __future__ import annotations

import itertools

import grpc
import pytest
from helpers import Action, ServerProcess, cmd, normalize_message

from coord._pb import rpc_pb2, rpc_pb2_grpc

pytestmark = pytest.mark.etcd

# "get -w json" on a key nobody writes: shows header.revision without changing anything
REV = "get __rev_probe__ -w json"


def seed(*pairs: tuple[str, str]) -> list[str | tuple[str, ...]]:
    return [("put", k, v) for k, v in pairs]


def test_put_get_basic_and_revision_header(differential):
    differential(
        [
            REV,
            "put a 1",
            REV,
            "get a",
            "put a 2",
            REV,
            "get a -w json",
            "put b 2 -w json",
            "put c 3 -w fields",
            "put d 4 -w simple",
            "put e 5 -w table",  # etcdctl refuses table output for put: same error on both
            REV,
            "put a 2",  # same value still bumps the revision and the version
            "get a -w json",
            "get a -w fields",
            "get a -w table",
            "get a -w simple",
            "get missing",
            "get missing -w json",
            "get missing -w fields",
            ("put", "key with spaces", "value with spaces"),
            ("put", "ключ", "значение ☃"),
            ("get", "key with spaces", "-w", "json"),
            ("get", "ключ"),
            ("get", "ключ", "-w", "json"),
            cmd("put", "fromstdin", input="stdin value\n"),
            "get fromstdin -w json",
            ("put", "emptyvalue", ""),
            "get emptyvalue -w json",
            "get emptyvalue",
            REV,
        ]
    )


def test_get_prefix_from_key_and_ranges(differential):
    keys = ["fo", "foo", "foo/1", "foo/2", "foo0", "fop", "fp", "zoo", "~", "a"]
    differential(
        [
            *seed(*[(k, f"v-{k}") for k in keys]),
            "get foo --prefix",
            "get fo --prefix",
            "get foo/ --prefix",
            "get f --prefix --keys-only",
            ("get", "", "--prefix", "--keys-only"),
            "get --from-key fop",
            "get --from-key foo0 -w json",
            ("get", "--from-key", "", "--keys-only"),
            "get a z",
            "get foo fop",
            "get foo foo",  # range_end == key: empty
            "get z a",  # range_end < key: empty
            "get z a -w json",
            "get nothing --prefix -w json",
            "get foo --prefix -w fields",
            "get foo --prefix --limit 2 -w json",
            "get --from-key foo --limit 3",
        ]
    )


def test_get_rev_history(differential):
    differential(
        [
            "put a 1",  # rev 2
            "put a 2",  # rev 3
            "put b x",  # rev 4
            "del a",  # rev 5
            "put a 3",  # rev 6: new incarnation, version 1
            "get a -w json",
            "get a --rev 1 -w json",
            "get a --rev 2 -w json",
            "get a --rev 3 -w json",
            "get a --rev 4",
            "get a --rev 5 -w json",
            "get a --rev 6 -w json",
            "get a --rev 0",
            "get a --rev 7",  # future
            "get a --rev 100 -w json",
            "get a z --rev 4 -w json",
            "get a z --rev 5 --keys-only",
            "get --prefix '' --rev 3 -w json",
            "get a --rev -1",
        ]
    )


SORT_TARGETS = ["KEY", "VERSION", "CREATE", "MODIFY", "VALUE"]
ORDERS = ["ASCEND", "DESCEND", None]


def _sort_seed() -> list[str | tuple[str, ...]]:
    # keys whose key / version / create / mod / value orders all differ
    return [
        "put k3 b",
        "put k1 e",
        "put k5 a",
        "put k2 d",
        "put k4 c",
        "put k1 c",
        "put k1 a",
        "put k5 z",
        "put k3 b",
        "put zz outside",
    ]


def test_get_sort_and_order(differential):
    steps: list[str | tuple[str, ...]] = list(_sort_seed())
    for target, order in itertools.product(SORT_TARGETS, ORDERS):
        args = ["get", "k", "--prefix", f"--sort-by={target}"]
        if order:
            args.append(f"--order={order}")
        steps.append(tuple(args))
        steps.append((*args, "--limit=2", "-w", "json"))
    steps += [
        "get k --prefix --order=DESCEND",
        "get k --prefix --order=ASCEND --limit 3",
        "get k --prefix --order=DESCEND -w json",
        "get k --prefix --sort-by=BOGUS",  # refused by etcdctl itself
        "get k --prefix --order=SIDEWAYS",
        "get k --prefix --sort-by=MODIFY --order=DESCEND --limit 1 --keys-only",
        "get k --prefix --sort-by=VALUE --print-value-only",
    ]
    differential(steps)


def test_get_limit_keys_only_print_value_only(differential):
    # etcdctl 3.4.23 has no --count-only (it came in 3.5): count_only is covered over gRPC below.
    differential(
        [
            *_sort_seed(),
            "get k --prefix --limit 1",
            "get k --prefix --limit 1 -w json",  # more=true, count = all
            "get k --prefix --limit 5 -w json",  # exactly all: more=false
            "get k --prefix --limit 6 -w json",
            "get k --prefix --limit 0 -w json",
            "get k --prefix --limit -1",
            "get k --prefix --keys-only",
            "get k --prefix --keys-only -w json",
            "get k --prefix --keys-only -w fields",
            "get k --prefix --print-value-only",
            "get k1 --print-value-only",
            "get k --prefix --print-value-only --keys-only",
            "get k --prefix --keys-only --limit 2 --sort-by=VALUE -w json",
            "get k --prefix --consistency=s -w json",
        ]
    )


def test_put_flags(differential):
    differential(
        [
            "put --prev-kv a 1",  # new key: nothing to print
            "put --prev-kv a 2",
            "put --prev-kv a 3 -w json",
            "put --prev-kv a 4 -w fields",
            "put --ignore-value a",  # keeps "4", bumps version
            "get a -w json",
            "put --ignore-value missing",
            "put --ignore-value a newvalue",  # refused by etcdctl itself
            "put --ignore-value --prev-kv a -w json",
            "put --ignore-lease a newvalue",
            "get a -w json",
            "put --ignore-lease missing x",
            "put --ignore-lease --lease=1234 a x",
            "put --lease=1234 a x",
            "put --lease=1234 --ignore-value a",
            "put --ignore-value --ignore-lease a",
            "put --ignore-value --ignore-lease missing",
            REV,
            "get a -w json",
        ]
    )


def test_del_flags(differential):
    differential(
        [
            *seed(("a", "1"), ("ab", "2"), ("abc", "3"), ("b", "4"), ("c", "5"), ("d", "6"), ("e", "7")),
            REV,
            "del missing",  # no-op delete: no revision bump
            REV,
            "del missing -w json",
            "del a",
            REV,
            "del --prev-kv ab",
            "put a 1",
            "put ab 2",
            "del --prefix a -w json",
            REV,
            "del --prefix a",  # nothing left
            "put a 1",
            "del --prev-kv --prefix a -w json",
            "del b c --prev-kv",  # range [b, c)
            "get --from-key '' --keys-only",
            "del --from-key d --prev-kv -w fields",
            "get --from-key '' -w json",
            "put x 1",
            "del x -w table",
            "del x -w simple",
            "del --from-key ''",
            REV,
            "del z a",  # empty range
            REV,
        ]
    )


def _txn(compares: list[str], success: list[str], failure: list[str]) -> str:
    """Non-interactive txn input: three sections, each ended by an empty line."""
    return "".join(line + "\n" for line in [*compares, "", *success, "", *failure, ""])


def test_txn_compares_and_branches(differential):
    differential(
        [
            "put k1 v1",  # rev 2
            "put k2 v2",  # rev 3
            "put k2 v2b",  # rev 4, k2 version 2
            cmd("txn", input=_txn(['value("k1") = "v1"'], ["put k3 yes"], ["put k3 no"])),
            "get k3 -w json",
            cmd("txn", input=_txn(['value("k1") = "nope"'], ["put k4 yes"], ["put k4 no", "get k1"])),
            "get k4 -w json",
            cmd(
                "txn",
                "-w",
                "json",
                input=_txn(
                    [
                        'version("k2") = "2"',
                        'create("k2") = "3"',
                        'mod("k2") = "4"',
                        'val("k1") != "zzz"',
                        'version("k1") > "0"',
                        'mod("k1") < "10"',
                        'value("k2") > "v2"',
                    ],
                    ["get k1", "put k5 five", "get k5", "del k4 --prev-kv"],
                    ["put k5 failed"],
                ),
            ),
            cmd(
                "txn",
                "-w",
                "json",
                input=_txn(['version("k2") = "1"', 'version("k1") = "1"'], ["put k6 x"], ["get k --prefix"]),
            ),
            cmd("txn", "-w", "fields", input=_txn(['create("k1") > "0"'], ["put k7 x", "get k7"], [])),
            cmd("txn", input=_txn(['create("missing") = "0"'], ["put m 1"], ["put m 2"])),
            cmd("txn", input=_txn(['version("missing") = "0"'], ["get missing"], [])),
            cmd("txn", input=_txn(['value("missing") = ""'], [], ["put valuecompare failed"])),
            "get valuecompare -w json",
            cmd("txn", input=_txn([], ["put nocompare 1"], ["put nocompare 2"])),
            cmd("txn", "-w", "json", input=_txn([], [], [])),
            cmd("txn", "-w", "json", input=_txn(['value("k1") = "v1"'], [], [])),
            REV,
        ]
    )


def test_txn_sub_response_header_revisions(differential):
    """A range before a put in the same txn, a range after it, deletes, and read-only txns."""
    differential(
        [
            "put a 1",
            "put b 2",
            cmd("txn", "-w", "json", input=_txn([], ["get a", "put a 2", "get a", "get b"], [])),
            cmd("txn", "-w", "json", input=_txn([], ["get b", "del b", "get b", "put c 3", "get c"], [])),
            cmd("txn", "-w", "json", input=_txn([], ["get a", "get c"], [])),  # read-only: no bump
            REV,
            cmd("txn", "-w", "json", input=_txn([], ["del nothing", "get a"], [])),  # deletes nothing: no bump
            REV,
            cmd("txn", "-w", "json", input=_txn(['value("a") = "x"'], [], ["get a", "put a 3", "del c"])),
            cmd("txn", "-w", "json", input=_txn([], ["put d 1", "put e 1"], [])),
            cmd("txn", "-w", "json", input=_txn([], ["del d", "del d", "del e --prev-kv"], [])),
            REV,
            cmd("txn", input=_txn([], ["get a --prefix", "put f 1", "get a --rev=2"], [])),
        ]
    )


def test_txn_failing_compare_and_errors(differential):
    differential(
        [
            "put a 1",
            cmd("txn", "-w", "json", input=_txn(['value("a") = "2"'], ["put b 1"], [])),
            REV,
            cmd("txn", "-w", "json", input=_txn(['mod("a") > "100"'], ["put b 1"], ["get a --rev=1"])),
            cmd("txn", input=_txn([], ["put x 1", "put x 2"], [])),  # duplicate key
            cmd("txn", input=_txn([], ["put x 1", "del x"], [])),  # put inside a delete of the same branch
            cmd("txn", input=_txn(['value("a") = "1"'], ["put x 1"], ["put x 1"])),  # same key in both: fine
            cmd("txn", input=_txn([], ["get a --rev=100"], [])),  # future revision inside a txn
            cmd("txn", input=_txn([], ["put --ignore-value nokey"], [])),
            cmd("txn", input=_txn([], ["put --lease=1234 l v"], [])),
            cmd("txn", input=_txn([], ["bogus a"], [])),  # etcdctl's own parse error
            cmd("txn", input='value("a") = 1\n\n\n\n'),  # etcdctl's own compare parse error
            REV,
        ]
    )


def test_txn_interactive(differential):
    differential(
        [
            "put a 1",
            cmd("txn", "-i", input=_txn(['value("a") = "1"'], ["put b 2", "get a"], ["put b 3"])),
            cmd("txn", "--interactive", "-w", "json", input=_txn(['value("a") = "2"'], ["put b 2"], ["get b"])),
        ]
    )


def test_compaction_and_revision_errors(differential):
    differential(
        [
            "put a 1",  # 2
            "put a 2",  # 3
            "put a 3",  # 4
            "put b 1",  # 5
            "put a 4",  # 6
            "compaction 4",
            REV,  # compaction does not bump
            "get a --rev 3",
            "get a --rev 2 -w json",
            "get a --rev 4 -w json",  # == compact revision: allowed
            "get a --rev 5 -w json",
            "get a --rev 6 -w json",
            "get a --rev 7",  # future
            "get a --rev 1000 -w json",
            "get --prefix '' --rev 4 -w json",
            "compaction 4",  # already compacted
            "compaction 3",
            "compaction 7",  # future
            "compaction 6",  # == current: OK
            "compaction --physical 6",
            "put a 5",
            "compaction --physical 7",
            "get a --rev 6",
            "get a -w json",
            "compaction 0",
            "compaction -1",
            "compaction abc",  # etcdctl's own parse error
            "compaction 8 -w json",
            REV,
        ]
    )


def test_compaction_fresh_store(differential):
    differential(
        [
            "compaction 1",  # == current revision of a fresh store
            "compaction 1",
            "get a --rev 1 -w json",
            "put a 1",
            "compaction --physical 2",
            "get a -w json",
            "get a --rev 1",
        ]
    )


def test_compaction_zero_on_fresh_store(differential):
    differential(["compaction 0", "compaction 1", "compaction 0", "get a --rev 0 -w json"])


def test_revision_after_each_write(differential):
    steps: list[str | tuple[str, ...]] = []
    for i in range(6):
        steps += [f"put k{i % 3} v{i}", REV]
    steps += [
        "del k0",
        REV,
        "del k0",
        REV,
        cmd("txn", input=_txn([], ["put t1 a", "put t2 b", "del k1"], [])),
        REV,
        "get k --prefix -w json",
        "get t --prefix -w json",
    ]
    differential(steps)


# ---------------------------------------------------------------------------------------------------
# RangeRequest fields etcdctl 3.4 cannot send (count_only, min/max filters), compared over gRPC

RR = rpc_pb2.RangeRequest
ASC, DESC = RR.ASCEND, RR.DESCEND

RANGE_CASES: list[rpc_pb2.RangeRequest] = [
    RR(key=b"k", range_end=b"l", count_only=True),
    RR(key=b"k", range_end=b"l", count_only=True, limit=2),
    RR(key=b"k", range_end=b"l", count_only=True, keys_only=True),
    RR(key=b"k", range_end=b"l", count_only=True, revision=4),
    RR(key=b"k", range_end=b"l", count_only=True, min_mod_revision=5),
    RR(key=b"missing", count_only=True),
    RR(key=b"k", range_end=b"l", keys_only=True, limit=2),
    RR(key=b"k", range_end=b"l", min_mod_revision=5),
    RR(key=b"k", range_end=b"l", max_mod_revision=5),
    RR(key=b"k", range_end=b"l", min_create_revision=3, max_create_revision=5),
    RR(key=b"k", range_end=b"l", max_create_revision=1),  # no kvs, count still counts the range
    RR(key=b"k", range_end=b"l", min_mod_revision=5, limit=1),
    RR(key=b"k", range_end=b"l", min_mod_revision=5, limit=1, sort_order=DESC, sort_target=RR.MOD),
    RR(key=b"k", range_end=b"l", max_create_revision=9, limit=1, sort_order=DESC, sort_target=RR.CREATE),
    RR(key=b"k", range_end=b"l", sort_target=RR.VALUE),  # target without order: ascending
    RR(key=b"k", range_end=b"l", sort_target=RR.VERSION, limit=3),
    RR(key=b"k", range_end=b"l", sort_target=RR.VERSION, limit=1),  # NONE order: limit+1 keys read, then sorted
    RR(key=b"k", range_end=b"l", sort_target=RR.MOD, limit=2),
    RR(key=b"k", range_end=b"l", sort_target=RR.VALUE, limit=2, min_mod_revision=2),
    RR(key=b"k", range_end=b"l", sort_target=RR.CREATE, limit=1),
    RR(key=b"k", range_end=b"l", sort_target=RR.CREATE, sort_order=ASC, limit=1),
    RR(key=b"k", range_end=b"l", sort_target=RR.KEY, sort_order=DESC, limit=1, keys_only=True),
    # binary keys: bytewise order, 0xff prefixes
    RR(key=b"\xff", range_end=b"\x00"),
    RR(key=b"a\xff", range_end=b"b"),
    RR(key=b"b", range_end=b"b\x01"),
    RR(key=b"\x00", range_end=b"\x00", count_only=True),
    RR(key=b"\xff\xff"),
    RR(key=b"k", range_end=b"l", sort_order=DESC, limit=2),
    RR(key=b"k", range_end=b"l", limit=5),
    RR(key=b"k", range_end=b"l", limit=4, revision=6),
    RR(key=b"k", range_end=b"l", serializable=True),
    RR(key=b"\x00", range_end=b"\x00", keys_only=True),
    RR(key=b"k3", range_end=b"\x00", keys_only=True),
    RR(key=b"k3", range_end=b"k1"),
    RR(key=b"k2", range_end=b"k2"),
]


def _range_all(server: ServerProcess) -> list[object]:
    out: list[object] = []
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for k, v in [("k3", "b"), ("k1", "e"), ("k5", "a"), ("k2", "d"), ("k4", "c"), ("k1", "c"), ("k5", "z")]:
            kv.Put(rpc_pb2.PutRequest(key=k.encode(), value=v.encode()), timeout=5)
        kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"k4"), timeout=5)
        for key in (b"\xff", b"\xff\xff", b"a\xff", b"b\x00", b"b"):
            kv.Put(rpc_pb2.PutRequest(key=key, value=key), timeout=5)
        for req in RANGE_CASES:
            try:
                out.append(normalize_message(kv.Range(req, timeout=5)))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details()))
    return out


def test_range_fields_over_grpc(etcd_and_coord):
    etcd, coord = etcd_and_coord
    ref, got = _range_all(etcd), _range_all(coord)
    for req, r, g in zip(RANGE_CASES, ref, got, strict=True):
        assert g == r, f"RangeRequest {{{req}}}: etcd\n{r}\ncoord\n{g}"


# ---------------------------------------------------------------------------------------------------
# Txn features etcdctl 3.4 cannot express (range compares, LEASE target, nested txns), over gRPC

CMP = rpc_pb2.Compare
OP = rpc_pb2.RequestOp
TX = rpc_pb2.TxnRequest


def _put(key: bytes, value: bytes = b"v", **kw: object) -> rpc_pb2.RequestOp:
    return OP(request_put=rpc_pb2.PutRequest(key=key, value=value, **kw))  # type: ignore[arg-type]


def _get(key: bytes, **kw: object) -> rpc_pb2.RequestOp:
    return OP(request_range=rpc_pb2.RangeRequest(key=key, **kw))  # type: ignore[arg-type]


def _del(key: bytes, range_end: bytes = b"", prev_kv: bool = False) -> rpc_pb2.RequestOp:
    return OP(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end, prev_kv=prev_kv))


TXN_CASES: list[rpc_pb2.TxnRequest] = [
    TX(success=[_put(b"r/1", b"a"), _put(b"r/2", b"b"), _put(b"r/3", b"c")]),
    # range compares: every key in the range must satisfy it
    TX(compare=[CMP(key=b"r/", range_end=b"r0", target=CMP.VERSION, result=CMP.EQUAL, version=1)],
       success=[_get(b"r/", range_end=b"r0")], failure=[_put(b"f", b"1")]),
    TX(compare=[CMP(key=b"r/", range_end=b"r0", target=CMP.VALUE, result=CMP.GREATER, value=b"a")],
       success=[_put(b"s", b"1")], failure=[_put(b"f", b"2")]),
    TX(compare=[CMP(key=b"r/", range_end=b"r0", target=CMP.VALUE, result=CMP.NOT_EQUAL, value=b"z")],
       success=[_put(b"s", b"2")]),
    TX(compare=[CMP(key=b"r/", range_end=b"r0", target=CMP.MOD, result=CMP.LESS, mod_revision=5)],
       success=[_put(b"s", b"3")], failure=[_get(b"r/2")]),
    TX(compare=[CMP(key=b"r/", range_end=b"\x00", target=CMP.CREATE, result=CMP.GREATER, create_revision=0)],
       success=[_get(b"s")]),
    # missing keys: zero KeyValue, except VALUE which is false
    TX(compare=[CMP(key=b"nope", target=CMP.VERSION, result=CMP.EQUAL, version=0)], success=[_put(b"m", b"1")]),
    TX(compare=[CMP(key=b"nope", target=CMP.VALUE, result=CMP.EQUAL, value=b"")], success=[_put(b"m", b"2")],
       failure=[_put(b"m", b"3")]),
    TX(compare=[CMP(key=b"nope", target=CMP.VALUE, result=CMP.NOT_EQUAL, value=b"x")], success=[_put(b"m", b"4")],
       failure=[_put(b"m", b"5")]),
    TX(compare=[CMP(key=b"no/", range_end=b"no0", target=CMP.MOD, result=CMP.EQUAL, mod_revision=0)],
       success=[_put(b"m", b"6")]),
    TX(compare=[CMP(key=b"m", target=CMP.LEASE, result=CMP.EQUAL, lease=0)], success=[_get(b"m")]),
    TX(compare=[CMP(key=b"m", target=CMP.LEASE, result=CMP.GREATER, lease=0)], failure=[_get(b"m")]),
    TX(compare=[CMP(key=b"m", target=CMP.VERSION, result=CMP.EQUAL)], failure=[_get(b"m")]),  # unset union: 0
    TX(compare=[CMP(key=b"m", target=CMP.VALUE, result=CMP.LESS, value=b"7")], success=[_get(b"m")]),
    # nested txns and sub-response headers
    TX(success=[_get(b"m"), OP(request_txn=TX(compare=[CMP(key=b"m", target=CMP.VALUE, value=b"6")],
                                             success=[_put(b"n", b"1"), _get(b"n")])), _get(b"n")]),
    TX(success=[OP(request_txn=TX(success=[_get(b"n")])), OP(request_txn=TX(failure=[_del(b"n", prev_kv=True)],
                                                                           compare=[CMP(key=b"n", value=b"x")]))]),
    TX(success=[OP(request_txn=TX())]),
    TX(success=[_del(b"r/", range_end=b"r0", prev_kv=True), _get(b"r/", range_end=b"r0")]),
    TX(success=[_del(b"gone"), _get(b"m", keys_only=True)]),
    TX(success=[_put(b"p", b"1", prev_kv=True), _put(b"q", b"1", prev_kv=True)]),
    TX(success=[_put(b"p", b"2", prev_kv=True), _get(b"p", revision=2)]),
    TX(success=[_put(b"p", ignore_value=True, value=b""), _get(b"p")]),
]


def _txn_all(server: ServerProcess) -> list[object]:
    out: list[object] = []
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for req in TXN_CASES:
            try:
                out.append(normalize_message(kv.Txn(req, timeout=5)))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details()))
    return out


def test_txn_over_grpc(etcd_and_coord):
    etcd, coord = etcd_and_coord
    ref, got = _txn_all(etcd), _txn_all(coord)
    for i, (req, r, g) in enumerate(zip(TXN_CASES, ref, got, strict=True)):
        assert g == r, f"TxnRequest #{i} {{{req}}}:\netcd\n{r}\ncoord\n{g}"


# ---------------------------------------------------------------------------------------------------
# restart


def _restart(server: ServerProcess) -> None:
    server.restart()


def test_restart_keeps_revision_history_and_compaction(differential):
    differential(
        [
            "put a 1",
            "put a 2",
            "put b 1",
            "del b",
            "put c 1",
            cmd("txn", input=_txn([], ["put d 1", "put e 1"], [])),
            "compaction 3",
            "endpoint hashkv -w json",
            Action("restart", _restart),
            REV,
            "get --prefix '' -w json",
            "get a --rev 3 -w json",
            "get a --rev 2",
            "get b --rev 4 -w json",
            "compaction 3",
            "endpoint hashkv -w json",
            "endpoint hashkv --rev=5 -w json",
            "put a 3",
            "get a -w json",
            Action("restart", _restart),
            "get --prefix '' -w json",
            "compaction 8",
            Action("restart", _restart),
            "get a --rev 7",
            "get a --rev 8 -w json",
            "endpoint hashkv -w json",
            "member list -w json",
            "endpoint status -w json",
            "put f 1 -w json",
        ]
    )
