"""The lock CLI example (``python -m examples.lockrun``) as processes, against coord-server and a real etcd 3.4.

* concurrent invocations — lockrun loops and ``etcdctl lock`` loops on the same name — never overlap, get
  distinct lock keys in etcd's layout, and ETCD_LOCK_REV / the fencing token grow from holder to holder;
* exit codes propagate (own status, 128+signal, 127), ``--timeout`` gives up with 75 and leaves no queue key,
  SIGTERM is passed on to the command and the lock is released after it exits;
* losing the lock kills the command: when the key is deleted, and when lockrun is frozen (SIGSTOP) past its
  TTL while its command keeps writing to a fenced sink — the sink refuses the old holder's writes once the new
  holder has written (the control), and on SIGCONT the old command is killed and lockrun exits 75.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from example_kit import ROOT, Fleet, descendants, example_env, sink_stats
from helpers import ServerProcess, etcdctl, find_etcdctl

SECTION = """\
echo "start $ETCD_LOCK_KEY $ETCD_LOCK_REV ${COORD_FENCING_TOKEN:-etcdctl}" >> "$1"
sleep 0.05
echo "end $ETCD_LOCK_KEY" >> "$1"
"""

WRITER = """\
import os, sys, time
sys.path.append(sys.argv[1])
from examples.fenced_sink import write
url, name, pidfile = sys.argv[2:5]
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {os.environ['ETCD_LOCK_KEY']} {os.environ['COORD_FENCING_TOKEN']}")
os.rename(pidfile + ".tmp", pidfile)
token = int(os.environ["COORD_FENCING_TOKEN"])
n = 0
while True:
    n += 1
    write(url, f"{name}-{n}", "x", token, writer=name)
    time.sleep(0.05)
"""


def lockrun_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "examples.lockrun", *args]


def spawn(argv: list[str], endpoint: str, **kw: Any) -> subprocess.Popen[str]:
    env = example_env(endpoint)
    env["ETCDCTL_API"] = "3"
    return subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)


def reap(*procs: subprocess.Popen[str]) -> None:
    """Kill what still runs — with the commands lockrun started in their own process groups, which hold its
    pipes — and collect every process and its pipes."""
    for p in procs:
        if p.poll() is None:
            for pid in [*descendants(p.pid), p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGCONT)
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # an orphaned grandchild still holds a pipe: do not leak ours
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
            p.wait(10)


def lockrun(endpoint: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lockrun_argv(*args), cwd=ROOT, env=example_env(endpoint), text=True, capture_output=True,
                          timeout=timeout, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def lock_keys(server: ServerProcess, name: str) -> list[str]:
    out: str = etcdctl(server.endpoint, "get", name + "/", "--prefix", "--keys-only").check().stdout
    return out.split()


def wait_for(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_lockrun_and_etcdctl_lock_never_overlap(server: ServerProcess, tmp_path: Path) -> None:
    log, section = tmp_path / "sections.log", tmp_path / "section.sh"
    section.write_text(SECTION)
    rounds = 3
    ctl = find_etcdctl()
    assert ctl is not None
    tools = {
        "lockrun": " ".join(lockrun_argv("--ttl", "5", "jobs/report", "--", "sh", str(section), str(log))),
        "etcdctl": f"{ctl} --endpoints={server.endpoint} lock jobs/report sh {section} {log}",
    }
    loops = [spawn(["sh", "-c", f"for i in $(seq {rounds}); do {tools[t]} || exit 1; done"], server.endpoint)
             for t in ("lockrun", "etcdctl", "lockrun", "etcdctl", "lockrun")]
    try:
        for p in loops:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        reap(*loops)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 2 * len(loops) * rounds
    starts, ends = lines[::2], lines[1::2]
    overlaps = sum(1 for s, e in zip(starts, ends, strict=True) if s[0] != "start" or e[0] != "end" or s[1] != e[1])
    keys = [s[1] for s in starts]
    revs = [int(s[2]) for s in starts]
    tokens = [int(s[3]) for s in starts if s[3] != "etcdctl"]
    print(f"\nlockrun[{server.kind}]: {len(starts)} critical sections ({len(tokens)} by lockrun, "
          f"{len(starts) - len(tokens)} by etcdctl lock), overlaps {overlaps}")
    assert overlaps == 0
    assert len(tokens) == 3 * rounds
    assert len(set(keys)) == len(keys) and all(k.startswith("jobs/report/") for k in keys)
    assert revs == sorted(revs) and len(set(revs)) == len(revs), "ETCD_LOCK_REV must grow from holder to holder"
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), "fencing tokens must grow"
    assert lock_keys(server, "jobs/report") == []


def test_lockrun_exit_codes_timeout_and_signals(server: ServerProcess, tmp_path: Path) -> None:
    ep = server.endpoint
    assert lockrun(ep, "L", "--", "sh", "-c", "exit 7").returncode == 7
    assert lockrun(ep, "L", "--", "sh", "-c", "kill -9 $$").returncode == 128 + 9
    res = lockrun(ep, "--shell", "L", "--", 'test "$ETCD_LOCK_KEY" = "L/$COORD_LEASE_ID" && echo ok')
    assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr
    res = lockrun(ep, "L", "--", str(tmp_path / "no-such-command"))
    assert res.returncode == 127 and "command not found" in res.stderr
    assert lockrun(ep, "L").returncode == 2  # usage: no command

    # an etcdctl holder: lockrun --timeout gives up with 75 and leaves no key in the queue
    holder = spawn([str(find_etcdctl()), f"--endpoints={ep}", "lock", "L"], ep)
    waiter = None
    try:
        assert holder.stdout is not None
        held_key = holder.stdout.readline().strip()
        assert held_key.startswith("L/")
        started = time.monotonic()
        res = lockrun(ep, "--timeout", "1", "L", "--", "true")
        assert res.returncode == 75 and "not acquired within" in res.stderr, res.stderr
        assert time.monotonic() - started < 15
        assert lock_keys(server, "L") == [held_key]
        # SIGTERM while waiting in the queue: leaves the queue, exits 128+15
        waiter = spawn(lockrun_argv("L", "--", "true"), ep)
        wait_for(lambda: len(lock_keys(server, "L")) == 2, 20, "the waiter to queue")
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(20) == 128 + signal.SIGTERM
        assert lock_keys(server, "L") == [held_key]
        holder.send_signal(signal.SIGINT)  # etcdctl unlocks on SIGINT
        assert holder.wait(20) == 0
    finally:
        reap(holder, *([waiter] if waiter else []))

    # SIGTERM while the command runs: passed on; the command's status is lockrun's; the lock is released after
    script = 'trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 0.05; done'
    p = spawn(lockrun_argv("L", "--", "sh", "-c", script), ep)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        assert (p.returncode, out) == (42, "got-term\n"), err
    finally:
        reap(p)
    assert lock_keys(server, "L") == []


def test_lockrun_kills_the_command_when_the_lock_is_lost(server: ServerProcess, fleet: Any, tmp_path: Path) -> None:
    ep = server.endpoint
    f: Fleet = fleet(ep)
    _, url = f.start_sink()
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)

    def holder(name: str) -> tuple[subprocess.Popen[str], Path]:
        pidfile = tmp_path / f"{name}.pid"
        argv = lockrun_argv("--ttl", "2", "--kill-grace", "1", "jobs/fenced", "--", sys.executable, str(writer),
                            str(ROOT), url, name, str(pidfile))
        return spawn(argv, ep), pidfile

    def child(pidfile: Path) -> tuple[int, str, int]:
        pid, key, token = wait_for(lambda: pidfile.exists() and pidfile.read_text().split(), 30, f"{pidfile.name}")
        return int(pid), key, int(token)

    # 1. an operator deletes the lock key: the command is killed, lockrun exits 75
    a, a_pid = holder("deleted")
    try:
        pid, key, _ = child(a_pid)
        etcdctl(ep, "del", key).check()
        _, err = a.communicate(timeout=20)
        assert a.returncode == 75 and "was deleted" in err, err
        assert not alive(pid)
    finally:
        reap(a)

    # 2. lockrun frozen past its TTL while its command keeps writing; a second lockrun takes over
    a, a_pid = holder("old")
    b = None
    try:
        a_child, _, a_token = child(a_pid)
        b, b_pid = holder("new")  # queued behind the first holder
        wait_for(lambda: any(e["writer"] == "old" for e in sink_stats(url)["log"]), 20, "the first holder to write")
        os.kill(a.pid, signal.SIGSTOP)  # lockrun only: its command runs on, as after a partition
        frozen_at = time.time()
        _b_child, _, b_token = child(b_pid)
        assert b_token > a_token
        wait_for(lambda: any(e["writer"] == "old" and e["outcome"] == "stale" for e in sink_stats(url)["log"]),
                 20, "the sink to refuse the old holder")
        os.kill(a.pid, signal.SIGCONT)
        _, err = a.communicate(timeout=30)
        assert a.returncode == 75 and "lost" in err, err
        assert not alive(a_child), "lockrun must kill its command when the lock is lost"
        thawed_at = time.time()
        b.send_signal(signal.SIGTERM)  # passed on to the writer, which dies of it: 128 + 15
        assert b.wait(20) == 128 + signal.SIGTERM
    finally:
        reap(a, *([b] if b else []))
    log = sink_stats(url)["log"]
    first_new = next(i for i, e in enumerate(log) if e["writer"] == "new" and e["outcome"] == "applied")
    old_after_new = [e for e in log[first_new:] if e["writer"] == "old"]
    accepted_after_new = [e for e in old_after_new if e["outcome"] != "stale"]
    print(f"\nlockrun[{server.kind}] frozen holder (token {a_token}) vs new holder (token {b_token}): the old command "
          f"tried {len(old_after_new)} writes after the new holder's first, all refused as stale; it was killed "
          f"{thawed_at - frozen_at:.1f}s after the freeze, once lockrun ran again")
    assert accepted_after_new == []
    assert old_after_new, "the control: the old command did try to write after the new holder"
    assert lock_keys(server, "jobs/fenced") == []
