"""Slow and fault tests: several processes contending for a lock, a frozen lock holder, a frozen server,
a watch across a SIGKILL + restart, interop with etcdctl lock/elect, authentication with token renewal.

TTL-bound tests run on one backend per server (``SLOW_BACKEND``); the multi-process tests mix backends
across their worker processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import ServerProcess, etcdctl
from helpers.client_kit import SLOW_BACKEND, FencedServer, unique

import coord
from coord import EventType, SessionState

WORKER = str(Path(__file__).resolve().parents[1] / "helpers" / "lock_worker.py")


def lease_count(server: ServerProcess) -> int:
    out = etcdctl(server.endpoint, "lease", "list").check().stdout
    return int(out.split()[1])


def spawn_worker(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# ------------------------------------------------------------------------------------------ processes


def test_lock_contention_across_processes(shared_server: ServerProcess) -> None:
    """3 processes (trio, asyncio, uvloop) x 2 tasks x 3 rounds: no overlap at the fenced resource, hand-off in
    queue (create revision) order, no lease left behind."""
    name = unique("mp")
    before = lease_count(shared_server)
    with FencedServer() as res:
        procs = [
            spawn_worker("contend", shared_server.endpoint, name, res.port, backend, 2, 3)
            for backend in ("trio", "asyncio", "uvloop")
        ]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=150)
            outs.append(out)
            assert p.returncode == 0, err[-3000:]
        r = res.resource
    assert [o.strip() for o in outs] == ["done 6"] * 3
    assert r.overlaps == 0
    assert r.rejected == []
    assert len(r.entries) == 18
    assert r.entries == sorted(r.entries), "hand-off must follow the queue (create revision) order"
    assert lease_count(shared_server) == before


def test_frozen_holder_makes_no_stale_write(shared_server: ServerProcess) -> None:
    """SIGSTOP a lock holder past its TTL; another client takes the lock and writes; on SIGCONT the old holder's
    writes carry the old fencing token: the resource accepts none of them, and the holder gets LockLost."""
    name = unique("stop")
    ttl = 3
    backend = "trio" if shared_server.kind == "coord" else "uvloop"
    with FencedServer() as res:
        holder = spawn_worker("hold", shared_server.endpoint, name, res.port, backend, ttl)
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            assert line.startswith("held "), line + (holder.stderr.read() if holder.stderr else "")
            old_token = int(line.split()[1])
            time.sleep(0.2)
            os.kill(holder.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()

            async def take_over() -> int:
                with anyio.fail_after(ttl + 20):
                    async with coord.open_client(shared_server.endpoint) as client, client.lock(name) as lock:
                        assert time.monotonic() - stopped_at >= 1.0  # it waited for the frozen holder's lease
                        assert res.resource.handle(f"WRITE {lock.fencing_token} new-holder") == "OK"
                        return lock.fencing_token

            new_token = anyio.run(take_over, backend="trio")
            assert new_token > old_token
            os.kill(holder.pid, signal.SIGCONT)
            out, err = holder.communicate(timeout=30)
        finally:
            if holder.poll() is None:
                os.kill(holder.pid, signal.SIGCONT)
                holder.kill()
                holder.wait()
        r = res.resource
    assert "lost" in out.splitlines(), out + err[-2000:]
    after_new = r.accepted[r.accepted.index((new_token, "new-holder")) + 1 :]
    stale_accepted = [a for a in after_new if a[0] < new_token]
    assert stale_accepted == []
    assert all(t == old_token for t, _ in r.rejected)


# ------------------------------------------------------------------------------------------ frozen server


@pytest.mark.parametrize("kind", [pytest.param("etcd", marks=pytest.mark.etcd), "coord"])
def test_frozen_server_loses_session_on_the_local_clock(server_factory: Any, kind: str) -> None:
    """The server stops answering (SIGSTOP): the session goes SUSPENDED, then LOST when its *local* deadline
    (send time of the last confirmed keep-alive + TTL) passes; the lock body is cancelled with LockLost."""
    srv = server_factory(kind).start()
    ttl = 3
    states: list[SessionState] = []
    followed: list[str] = []  # what wait_state() reported

    async def run() -> float:
        with anyio.fail_after(40):
            async with coord.open_client(srv.endpoint) as client, client.session(ttl=ttl) as session:

                async def follow() -> None:
                    followed.append((await session.wait_state(SessionState.SUSPENDED)).value)
                    try:
                        await session.wait_state(SessionState.HELD)
                    except coord.SessionExpired:
                        followed.append("expired")

                async with anyio.create_task_group() as tg:
                    await session.wait_state(SessionState.HELD)  # already: returns at once
                    tg.start_soon(follow)
                    with pytest.raises(coord.LockLost):
                        async with session.lock(unique("fz")):
                            t0 = anyio.current_time()
                            srv.kill(signal.SIGSTOP)
                            try:
                                while True:
                                    states.append(session.state)
                                    await anyio.sleep(0.05)
                            finally:
                                lost_after = anyio.current_time() - t0
                srv.kill(signal.SIGCONT)
                assert session.state is SessionState.LOST
                assert await session.wait_state(SessionState.LOST) is SessionState.LOST
                return lost_after

    try:
        backend = SLOW_BACKEND[kind]
        name, opts = (backend, {}) if isinstance(backend, str) else backend
        lost_after = anyio.run(run, backend=name, backend_options=opts)
    finally:
        srv.kill(signal.SIGCONT)
    assert SessionState.SUSPENDED in states
    assert followed == ["suspended", "expired"]
    assert lost_after <= ttl + 1.0, f"lost after {lost_after:.2f}s with TTL {ttl}s"


# ------------------------------------------------------------------------------------------ watch restart


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_watch_resumes_across_sigkill_restart(server_factory: Any, anyio_backend: Any) -> None:
    """Writes continue through a SIGKILL + restart of coord-server; the watch resumes from last + 1: compared
    with the server's own history afterwards, 0 events lost and 0 duplicated."""
    srv = server_factory("coord").start()
    p = unique("wk") + "/"
    acked: dict[int, bytes] = {}
    unknown = 0
    with anyio.fail_after(90):
        async with coord_client(srv) as client:
            start = (await client.put(p + "start", "s")).revision + 1
            seen: list[tuple[int, int, bytes, bytes]] = []
            async with client.watch(p, prefix=True, start_revision=start) as events:

                async def writer() -> None:
                    nonlocal unknown
                    for i in range(150):
                        try:
                            r = await client.put(f"{p}k{i % 7}", f"v{i}")
                            acked[r.revision] = f"v{i}".encode()
                        except coord.OutcomeUnknown:
                            unknown += 1
                        if i == 50:
                            restarted.set()  # and keep writing through the restart

                async def restarter() -> None:
                    await restarted.wait()
                    await anyio.sleep(0.05)
                    await anyio.to_thread.run_sync(srv.kill)  # SIGKILL, possibly while writes are in flight
                    await anyio.to_thread.run_sync(srv.start)

                restarted = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer)
                    tg.start_soon(restarter)
                last = max(acked)
                while not seen or seen[-1][0] < last:
                    ev = await events.receive()
                    seen.append((ev.revision, ev.type.value, ev.key, ev.kv.value))
            # the server's history from the same start, read in one go after the fact
            history: list[tuple[int, int, bytes, bytes]] = []
            async with client.watch(p, prefix=True, start_revision=start) as replay:
                while not history or history[-1][0] < last:
                    ev = await replay.receive()
                    history.append((ev.revision, ev.type.value, ev.key, ev.kv.value))
    assert srv.starts == 2
    assert len(seen) == len(set(seen)), "duplicated events"
    assert seen == history, "the resumed watch differs from the server's history"
    got = {rev: value for rev, _, _, value in seen}
    assert all(got.get(rev) == value for rev, value in acked.items()), "an acknowledged write was not seen"
    assert unknown <= 5


def coord_client(srv: ServerProcess) -> Any:
    return coord.open_client(srv.endpoint, watch_probe_interval=2.0)


# ------------------------------------------------------------------------------------------ etcdctl interop


async def _read_line(stream: Any) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        buf += await stream.receive(1)
    return buf.decode().rstrip("\n")


def _ctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_interop_with_etcdctl_lock(shared_server: ServerProcess, anyio_backend: Any) -> None:
    name = unique("ctl")
    ep = f"--endpoints={shared_server.endpoint}"
    with anyio.fail_after(60):
        async with coord.open_client(shared_server.endpoint) as client:
            async with await anyio.open_process(["etcdctl", ep, "lock", name], env=_ctl_env()) as ctl:
                assert ctl.stdout is not None
                ctl_key = await _read_line(ctl.stdout)
                assert ctl_key.startswith(name + "/")
                # an etcdctl holder excludes a coord waiter; the cancelled waiter leaves no key
                with anyio.move_on_after(1.0) as scope:
                    async with client.lock(name):
                        pytest.fail("coord entered while etcdctl held the lock")
                assert scope.cancelled_caught
                assert [kv.key.decode() for kv in (await client.get_prefix(name + "/")).kvs] == [ctl_key]
                got = anyio.Event()
                token = 0

                async def waiter() -> None:
                    nonlocal token
                    async with client.lock(name) as lock:
                        token = lock.fencing_token
                        got.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    await anyio.sleep(0.3)
                    assert not got.is_set()
                    ctl.send_signal(signal.SIGINT)  # etcdctl unlocks on SIGINT
                    await got.wait()
                assert token > 0
            # coord holds; etcdctl waits until coord releases
            async with client.session(ttl=10) as session:
                lock = session.lock(name)
                await lock.acquire()
                async with await anyio.open_process(
                    ["etcdctl", ep, "lock", name, "--", "echo", "etcdctl-got-it"], env=_ctl_env()
                ) as ctl2:
                    assert ctl2.stdout is not None
                    with anyio.move_on_after(1.0) as scope:
                        await ctl2.stdout.receive(1)
                    assert scope.cancelled_caught, "etcdctl acquired while coord held the lock"
                    await lock.release()
                    assert await _read_line(ctl2.stdout) == "etcdctl-got-it"
                    assert await ctl2.wait() == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_interop_with_etcdctl_elect(shared_server: ServerProcess, anyio_backend: Any) -> None:
    name = unique("elect")
    ep = f"--endpoints={shared_server.endpoint}"
    with anyio.fail_after(60):
        async with coord.open_client(shared_server.endpoint) as client:
            election = client.election(name)
            async with await anyio.open_process(["etcdctl", ep, "elect", name, "ctl-value"], env=_ctl_env()) as ctl:
                assert ctl.stdout is not None
                assert (await _read_line(ctl.stdout)).startswith(name + "/")
                assert await _read_line(ctl.stdout) == "ctl-value"
                leader = await election.leader()
                assert leader is not None and leader.value == b"ctl-value"
                async with election.observe() as leaders:
                    first = await leaders.receive()
                    assert first.value == b"ctl-value"
                    won = anyio.Event()

                    async def campaign() -> None:
                        async with election.campaign("coord-value"):
                            won.set()
                            await anyio.sleep(1.0)  # etcdctl's observer must see this term

                    async with await anyio.open_process(
                        ["etcdctl", ep, "elect", "-l", name], env=_ctl_env()
                    ) as observer:
                        assert observer.stdout is not None
                        assert (await _read_line(observer.stdout)).startswith(name + "/")
                        assert await _read_line(observer.stdout) == "ctl-value"
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(campaign)
                            await anyio.sleep(0.3)
                            assert not won.is_set()
                            ctl.send_signal(signal.SIGINT)  # etcdctl resigns
                            await won.wait()
                            nxt = await leaders.receive()
                            assert nxt.value == b"coord-value"
                            assert (await _read_line(observer.stdout)).startswith(name + "/")
                            assert await _read_line(observer.stdout) == "coord-value"
                        observer.send_signal(signal.SIGINT)


# ------------------------------------------------------------------------------------------ auth


@pytest.mark.anyio
@pytest.mark.etcd
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_auth_with_token_renewal(server_factory: Any, anyio_backend: Any) -> None:
    """Real etcd (coord-server has no auth yet): wrong password, missing token, and a token that expires
    (``--auth-token-ttl=1``) being renewed transparently for unary calls and watches."""
    srv = server_factory("etcd", extra_args=["--auth-token-ttl=1"]).start()
    for args in (("user", "add", "root:rootpw", "--interactive=false"), ("auth", "enable")):
        etcdctl(srv.endpoint, *args).check()
    with anyio.fail_after(40):
        with pytest.raises(coord.AuthenticationFailed):
            async with coord.open_client(srv.endpoint, user="root", password="wrong"):
                pass
        async with coord.open_client(srv.endpoint) as anonymous:
            with pytest.raises(coord.AuthenticationFailed):
                await anonymous.get("k")
        async with coord.open_client(srv.endpoint, user="root", password="rootpw") as client:
            await client.put("k", "1")
            async with client.watch("k") as events:
                await anyio.sleep(2.5)  # the token expires (TTL 1 s, reset on use)
                await client.put("k", "2")  # rejected once as an invalid token, renewed, then applied
                ev = await events.receive()
                assert ev.type is EventType.PUT and ev.kv.value == b"2"
            async with client.lock("auth-lock") as lock:
                assert lock.fencing_token > 0
            assert (await client.get("k")).value == b"2"  # type: ignore[union-attr]
