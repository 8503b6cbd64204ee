"""KV API against both servers on every backend: typed results, txn DSL, errors, deadlines."""

from __future__ import annotations

import anyio
import pytest
from helpers import ServerProcess
from helpers.client_kit import unique

import coord
from coord import Compare, Delete, Get, Put, SortOrder, SortTarget, Txn

pytestmark = pytest.mark.anyio

DEADLINE = 20


async def test_put_get_delete_typed_results(shared_server: ServerProcess) -> None:
    k = unique("kv")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            r1 = await client.put(k, "v1")
            assert isinstance(r1, coord.PutResult) and r1.prev_kv is None
            r2 = await client.put(k.encode(), b"v2", prev_kv=True)
            assert r2.revision == r1.revision + 1
            assert r2.prev_kv is not None and r2.prev_kv.value == b"v1"
            kv = await client.get(k)
            assert kv == coord.KeyValue(k.encode(), b"v2", r1.revision, r2.revision, 2, 0)
            old = await client.get(k, revision=r1.revision)
            assert old is not None and old.value == b"v1"
            assert await client.get(k + "-missing") is None
            d = await client.delete(k, prev_kv=True)
            assert d.deleted == 1 and d.prev_kvs[0].value == b"v2" and d.revision == r2.revision + 1
            assert await client.get(k) is None
            assert (await client.delete(k)).deleted == 0


async def test_ranges_prefix_sort_limit(shared_server: ServerProcess) -> None:
    p = unique("rng") + "/"
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            for i in range(5):
                await client.put(f"{p}{i}", f"v{i}")
            await client.put(p[:-1] + "0", "outside")  # after the prefix in byte order
            res = await client.get_prefix(p)
            assert [kv.key for kv in res.kvs] == [f"{p}{i}".encode() for i in range(5)]
            assert res.count == 5 and not res.more
            lim = await client.get_range(p, prefix=True, limit=2, sort_order=SortOrder.DESCEND,
                                         sort_target=SortTarget.CREATE)
            assert [kv.value for kv in lim.kvs] == [b"v4", b"v3"] and lim.more and lim.count == 5
            part = await client.get_range(f"{p}1", range_end=f"{p}3")
            assert [kv.value for kv in part.kvs] == [b"v1", b"v2"]
            ko = await client.get_prefix(p, keys_only=True)
            assert all(kv.value == b"" for kv in ko.kvs)
            co = await client.get_prefix(p, count_only=True)
            assert co.kvs == () and co.count == 5
            d = await client.delete(p, prefix=True)
            assert d.deleted == 5
            assert (await client.get(p[:-1] + "0")) is not None


async def test_txn_dsl(shared_server: ServerProcess) -> None:
    k = unique("txn")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            put = await client.put(k, "1")
            res = await client.txn(
                compare=[Compare.value(k) == "1", Compare.version(k) > 0, Compare.mod_revision(k) == put.revision],
                success=[Put(k, "2", prev_kv=True), Get(k), Txn([Compare.value(k) == "1"], [Get(k)], [])],
                failure=[Get(k)],
            )
            assert res.succeeded and res.revision == put.revision + 1
            p, g, nested = res.responses
            assert isinstance(p, coord.PutResult) and p.prev_kv is not None and p.prev_kv.value == b"1"
            assert isinstance(g, coord.RangeResult) and g.kvs[0].value == b"2"
            # nested compares see the state before the outer txn's writes (etcd's rule)
            assert isinstance(nested, coord.TxnResult) and nested.succeeded
            res2 = await client.txn([Compare.value(k) == "1"], [Delete(k)], [Get(k)])
            assert not res2.succeeded
            got = res2.responses[0]
            assert isinstance(got, coord.RangeResult) and got.kvs[0].value == b"2"
            # create_revision == 0 means "does not exist": the put-if-absent idiom
            absent = await client.txn([Compare.create_revision(k + "x") == 0], [Put(k + "x", "new")])
            assert absent.succeeded
            again = await client.txn([Compare.create_revision(k + "x") == 0], [Put(k + "x", "newer")])
            assert not again.succeeded and (await client.get(k + "x")).value == b"new"  # type: ignore[union-attr]


async def test_typed_errors(shared_server: ServerProcess) -> None:
    k = unique("err")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            r = await client.put(k, "a")
            with pytest.raises(coord.FutureRevision) as fut:
                await client.get(k, revision=r.revision + 1000)
            assert fut.value.code == "OUT_OF_RANGE" and fut.value.__cause__ is not None
            with pytest.raises(coord.InvalidRequest):
                await client.put("", "x")
            with pytest.raises(coord.LeaseNotFound):
                await client.put(k, "b", lease=0x7EADBEEF)
            with pytest.raises(coord.InvalidRequest):  # duplicate key in one txn
                await client.txn([], [Put(k, "1"), Put(k, "2")])
            info = await client.lease_info(0x7EADBEEF)
            assert info.ttl == -1


async def test_compact(server_factory: object, anyio_backend: object) -> None:
    """Compaction on a fresh coord-server (not the shared one: it would break other tests' revisions)."""
    srv = server_factory("coord").start()  # type: ignore[operator]
    k = unique("cmp")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(srv.endpoint) as client:
            r1 = await client.put(k, "1")
            r2 = await client.put(k, "2")
            await client.compact(r2.revision)
            with pytest.raises(coord.Compacted):
                await client.get(k, revision=r1.revision)
            with pytest.raises(coord.Compacted):
                await client.compact(r1.revision)
            assert (await client.get(k, revision=r2.revision)).value == b"2"  # type: ignore[union-attr]


async def test_leases_and_status(shared_server: ServerProcess) -> None:
    k = unique("lease")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            g = await client.grant_lease(30)
            assert g.ttl == 30 and g.id > 0
            assert g.id in await client.leases()
            await client.put(k, "v", lease=g.id)
            info = await client.lease_info(g.id, keys=True)
            assert info.granted_ttl == 30 and 0 < info.ttl <= 30 and info.keys == (k.encode(),)
            await client.revoke_lease(g.id)
            assert await client.get(k) is None
            with pytest.raises(coord.LeaseNotFound):
                await client.revoke_lease(g.id)
            st = await client.status()
            assert st.endpoint == shared_server.endpoint and st.revision > 0 and st.member_id
            assert shared_server.client_url in await client.member_urls()


async def test_deadline_propagates_and_cancel_is_clean(shared_server: ServerProcess) -> None:
    """A caller's deadline cuts a call short with the caller's own TimeoutError (no gRPC error), and the
    client stays usable. A watch wait is the long call here; a unary call gets the deadline as its timeout."""
    k = unique("dl")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.3):
                    async with client.watch(k) as events:
                        await events.receive()
            with anyio.move_on_after(0.000001):
                await client.put(k, "maybe")  # cancelled at once: either applied or not, never an error
            await client.put(k, "after")
            assert (await client.get(k)).value == b"after"  # type: ignore[union-attr]


async def test_endpoint_list_skips_dead_endpoint(shared_server: ServerProcess) -> None:
    """A dead endpoint first in the list costs one failed connect, then calls go to the live one."""
    from helpers import free_port

    dead = f"127.0.0.1:{free_port()}"
    with anyio.fail_after(DEADLINE):
        async with coord.open_client([dead, shared_server.endpoint]) as client:
            await client.put(unique("fo"), "x")  # a write: safe because it never reached the dead endpoint
            assert client.current_endpoint == shared_server.endpoint


async def test_unreachable_cluster_is_unavailable(anyio_backend: object) -> None:
    from helpers import free_port

    with anyio.fail_after(DEADLINE):
        async with coord.open_client(f"127.0.0.1:{free_port()}", retry_window=0.5) as client:
            with pytest.raises(coord.Unavailable):
                await client.get("x")
            with pytest.raises(coord.Unavailable):
                await client.put("x", "y")  # never sent: not OutcomeUnknown


async def test_body_exception_is_not_wrapped(shared_server: ServerProcess) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(KeyError):
        async with coord.open_client(shared_server.endpoint) as client, client.session(ttl=5):
            raise KeyError("mine")


async def test_closed_client(shared_server: ServerProcess) -> None:
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            pass
        with pytest.raises(coord.ClientClosed):
            await client.get("x")
