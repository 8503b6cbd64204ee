"""`etcdctl lock` and `etcdctl elect` (3.4) against coord-server, and the same checks on real etcd.

These drive the real etcdctl, which uses KV + Lease + Watch only (clientv3/concurrency), so they are
also an end-to-end proof of those services:
  * mutual exclusion: 8 concurrent `etcdctl lock L -- <critical section>` loops, several rounds each;
    sections never overlap, every process runs, and acquisitions follow the queue (create revision)
  * holder failure: SIGKILL of the holder -> the next waiter acquires within the lease TTL + 1 s;
    SIGSTOP of a holder past its TTL -> the lock passes on and the fencing token grows
  * election: campaigners and an `elect -l` observer; the observer sees the leaders in create-revision
    order with proclamations; SIGINT of the leader resigns and hands over at once
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ServerProcess, etcdctl, find_etcdctl

ROUNDS = 3
PROCS = 8

# The critical section: note start (with the lock key's create revision, read while holding the lock),
# hold it briefly, note the end. Appends are single write() calls, so lines never interleave.
SECTION = r"""
import json, os, subprocess, sys, time
log, ep, ctl = sys.argv[1], sys.argv[2], sys.argv[3]
key = os.environ["ETCD_LOCK_KEY"]
out = subprocess.run([ctl, "--endpoints=" + ep, "get", key, "-w", "json"], capture_output=True, text=True,
                     env={"ETCDCTL_API": "3", "PATH": os.environ.get("PATH", "")})
create = json.loads(out.stdout)["kvs"][0]["create_revision"]
def note(what):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps({"what": what, "key": key, "rev": int(os.environ["ETCD_LOCK_REV"]),
                              "create": create, "t": time.time()}) + "\n").encode())
    os.close(fd)
note("start")
time.sleep(0.05)
note("end")
"""


def kv_key(kv: dict[str, Any]) -> str:
    return base64.b64decode(kv["key"]).decode()


def ctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


def ctl() -> str:
    binary = find_etcdctl()
    assert binary is not None
    return binary


def reap(*procs: subprocess.Popen[str]) -> None:
    """Kill what still runs (its whole session) and collect every process and its pipes."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGCONT)
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)


def spawn(server: ServerProcess, *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([ctl(), f"--endpoints={server.endpoint}", *args], env=ctl_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def test_mutual_exclusion_fifo_with_etcdctl(server: ServerProcess, tmp_path: Path) -> None:
    log = tmp_path / "sections.log"
    script = tmp_path / "section.py"
    script.write_text(SECTION)
    loop = (f"for i in $(seq {ROUNDS}); do {ctl()} --endpoints={server.endpoint} lock L -- "
            f"{sys.executable} {script} {log} {server.endpoint} {ctl()} || exit 1; done")
    procs = [subprocess.Popen(["sh", "-c", loop], env=ctl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(PROCS)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=150)
            assert p.returncode == 0, err
    finally:
        reap(*procs)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2 * PROCS * ROUNDS
    overlaps = 0
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        if not (start["what"] == "start" and end["what"] == "end" and start["key"] == end["key"]):
            overlaps += 1
    creates = [line["create"] for line in lines[::2]]
    fences = [line["rev"] for line in lines[::2]]
    holders = {line["key"].split("/")[1] for line in lines}
    print(f"{server.kind}: {len(creates)} critical sections by {len(holders)} sessions, overlaps={overlaps}")
    assert overlaps == 0
    assert len(holders) == PROCS * ROUNDS  # every round is a new session (etcdctl lock never reuses one)
    assert creates == sorted(creates), "acquisitions out of queue order"
    assert fences == sorted(fences) and len(set(fences)) == len(fences), "fencing tokens must grow"


def _holder(server: ServerProcess, tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], str]:
    """An `etcdctl lock --ttl=2 NAME` holding the lock; returns the process and its lock key."""
    p = spawn(server, "lock", "--ttl=2", name)
    assert p.stdout is not None
    key = p.stdout.readline().strip()
    assert key.startswith(name + "/"), key
    return p, key


def _waiter(server: ServerProcess, name: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sh", "-c", f'{ctl()} --endpoints={server.endpoint} lock --ttl=2 {name} -- sh -c '
                     f'\'echo "$ETCD_LOCK_KEY $ETCD_LOCK_REV $(date +%s.%N)" > {out}; sleep 30\''],
        env=ctl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} not written within {timeout}s")


def _lock_keys(server: ServerProcess, name: str) -> list[str]:
    out = etcdctl(server.endpoint, "get", name + "/", "--prefix", "--keys-only").check().stdout
    return [line for line in out.splitlines() if line]


def test_holder_killed_next_waiter_acquires_within_ttl(server: ServerProcess, tmp_path: Path) -> None:
    holder, key = _holder(server, tmp_path, "K")
    out = tmp_path / "waiter.out"
    waiter = _waiter(server, "K", out)
    try:
        for _ in range(200):
            if len(_lock_keys(server, "K")) == 2:
                break
            time.sleep(0.02)
        killed = time.time()
        os.killpg(holder.pid, signal.SIGKILL)
        got = _wait_file(out, 10)
        took = float(got.split()[2]) - killed
        print(f"{server.kind}: next waiter acquired {took:.2f}s after the holder was killed (TTL 2 s)")
        assert took <= 2 + 1 + 0.5, took  # TTL + 1 s (+ the time etcdctl needs to start the command)
        assert got.split()[0] != key
    finally:
        reap(holder, waiter)


def test_stopped_holder_loses_the_lock_and_the_fence_grows(server: ServerProcess, tmp_path: Path) -> None:
    first_out, second_out = tmp_path / "first.out", tmp_path / "second.out"
    first = _waiter(server, "S", first_out)
    try:
        first_key, first_rev, _ = _wait_file(first_out, 10).split()
        second = _waiter(server, "S", second_out)
        try:
            os.killpg(first.pid, signal.SIGSTOP)  # keep-alives stop; the lease expires after its TTL
            second_key, second_rev, _ = _wait_file(second_out, 10).split()
            print(f"{server.kind}: fencing token {first_rev} -> {second_rev} after SIGSTOP of the holder")
            assert second_key != first_key
            assert int(second_rev) > int(first_rev)
            assert first_key not in _lock_keys(server, "S")
        finally:
            reap(second)
    finally:
        reap(first)


def test_election_observer_sees_leaders_in_order_and_resign_hands_over(server: ServerProcess) -> None:
    observer = spawn(server, "elect", "-l", "E")
    campaigners = []
    try:
        for i in range(3):
            campaigners.append(spawn(server, "elect", "E", f"p{i}"))
            for _ in range(200):  # queue them in a known order
                if len(_lock_keys(server, "E")) == i + 1:
                    break
                time.sleep(0.02)
        out = etcdctl(server.endpoint, "get", "E/", "--prefix", "-w", "json").check().stdout
        create = {kv_key(kv): kv["create_revision"] for kv in json.loads(out)["kvs"]}
        assert observer.stdout is not None
        leader0 = campaigners[0]
        assert leader0.stdout is not None
        key0 = leader0.stdout.readline().strip()
        assert leader0.stdout.readline().strip() == "p0"
        lines = [observer.stdout.readline().strip() for _ in range(2)]
        assert lines == [key0, "p0"]
        # SIGINT makes `etcdctl elect` resign: the next in line leads at once
        t = time.monotonic()
        os.killpg(leader0.pid, signal.SIGINT)
        leader0.wait(10)  # pipes are collected by reap()
        key1 = observer.stdout.readline().strip()
        assert observer.stdout.readline().strip() == "p1"
        handover = time.monotonic() - t
        print(f"{server.kind}: resign hand-over observed after {handover * 1000:.0f} ms")
        assert handover < 2
        os.killpg(campaigners[1].pid, signal.SIGINT)
        campaigners[1].wait(10)
        key2 = observer.stdout.readline().strip()
        assert observer.stdout.readline().strip() == "p2"
        # each leader in turn, in queue (create revision) order
        assert create[key0] < create[key1] < create[key2]
    finally:
        reap(observer, *campaigners)


@pytest.mark.parametrize("args, message", [
    (["elect", "E"], "no proposal argument but -l not set"),
    (["elect", "-l", "E", "p"], "proposal given but -l is set"),
])
def test_elect_argument_errors(server: ServerProcess, args: list[str], message: str) -> None:
    r = etcdctl(server.endpoint, *args)
    assert r.rc != 0 and message in r.stderr
