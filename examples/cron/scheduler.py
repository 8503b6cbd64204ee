"""The scheduler replica: campaign, and while leader, fire each job's ticks with fenced bookkeeping.

Keys under the prefix ``P`` (default ``cron``)::

    P/leader/<lease>        the election (etcd's layout: ``etcdctl elect -l P/leader`` shows the leader)
    P/jobs/<job>            jobs defined in the store: "SCHEDULE COMMAND" (``add`` / ``remove``)
    P/schedule              the schedule the current leader runs (JSON, for observers)
    P/cursor/<job>          the last tick handled (recorded or skipped)
    P/running/<job>         the tick in flight: written (fenced) before the job starts, deleted with its record
    P/runs/<job>/<time>     one record per tick: status, exit code, output tail, attempt, fencing token

Every write a leader makes is a txn guarded by ``term.is_leader()`` (the leader key's create revision): once a
newer leader exists, a deposed one can neither start nor record a tick. A tick's record is also guarded by
``create_revision(record) == 0``, so it is written exactly once across the fleet.

Execution is at-least-once: a tick whose ``running`` key exists but whose record does not was started by a
leader that died (or was deposed) before recording it; the next leader runs it again with ``CRON_ATTEMPT``
one higher. Jobs receive ``CRON_TICK_ID`` and ``COORD_FENCING_TOKEN`` to make their effects idempotent and
fenced. A job still running when leadership is lost is killed (SIGTERM to its process group, SIGKILL after
``kill_grace``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import coord
from coord import Compare, Delete, Put

from ..common import Campaigner, Deposed, FleetKeys, default_id, emit, exit_status
from .schedule import CatchUp, CrontabError, Job, decide, iso, parse_crontab, parse_job, tick_id

RELOAD_INTERVAL = 2.0  # seconds between checks of the crontab file
RETRY_PAUSE = 0.2


class Keys(FleetKeys):
    @property
    def jobs(self) -> str:
        return f"{self.prefix}/jobs/"

    @property
    def schedule(self) -> str:
        return f"{self.prefix}/schedule"

    @property
    def runs_root(self) -> str:
        return f"{self.prefix}/runs/"

    def job(self, name: str) -> str:
        return self.jobs + name

    def cursor(self, name: str) -> str:
        return f"{self.prefix}/cursor/{name}"

    def running(self, name: str) -> str:
        return f"{self.prefix}/running/{name}"

    def runs(self, name: str) -> str:
        return f"{self.runs_root}{name}/"

    def run(self, name: str, tick: int) -> str:
        return self.runs(name) + iso(tick)


@dataclass
class Config:
    prefix: str = "cron"
    replica_id: str = field(default_factory=default_id)
    ttl: int = 10
    crontab: Path | None = None
    policy: CatchUp = CatchUp.ALL
    max_catch_up: int = 10
    grace: float = 5.0
    kill_grace: float = 2.0
    job_timeout: float = 0.0
    drain: float = 30.0
    keep: int = 200
    output_limit: int = 4096

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix.rstrip("/"))


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


async def load_store_jobs(client: coord.Client, keys: Keys) -> tuple[list[Job], list[str]]:
    """Jobs defined under ``P/jobs/`` and the errors of unparsable ones."""
    res = await client.get_prefix(keys.jobs)
    jobs, errors = [], []
    for kv in res.kvs:
        name = kv.key.decode()[len(keys.jobs):]
        try:
            jobs.append(parse_job(name, kv.value.decode()))
        except CrontabError as exc:
            errors.append(f"{kv.key.decode()}: {exc}")
    return jobs, errors


class Runner:
    """Fires the ticks of one job, one at a time (a job never overlaps itself)."""

    def __init__(self, leader: Leader, job: Job) -> None:
        self.leader = leader
        self.job = job
        self.removed = False
        self.idle: anyio.CancelScope | None = None
        self.done = anyio.Event()
        self.busy = False
        self.records = 0

    def poke(self) -> None:
        """Re-decide now (the job changed, or the leader is draining)."""
        if self.idle is not None:
            self.idle.cancel()

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            self.done.set()

    async def _loop(self) -> None:
        ld, keys, name = self.leader, self.leader.keys, self.job.name
        cursor = await ld.read_cursor(self.job)
        kv = await ld.client.get(keys.running(name))
        in_flight = json.loads(kv.value) if kv is not None else None
        while not (self.removed or ld.draining):
            job, cfg = self.job, ld.cfg
            d = decide(job.schedule, cursor, time.time(), policy=cfg.policy, grace=cfg.grace,
                       max_catch_up=cfg.max_catch_up, in_flight=in_flight["tick"] if in_flight else None)
            if d.skip is not None:
                await ld.record_skip(job, *d.skip)
                cursor = d.skip[1]
            if d.run is not None:
                attempt = in_flight["attempt"] + 1 if in_flight and in_flight["tick"] == d.run else 1
                in_flight = None
                self.busy = True
                try:
                    await ld.run_tick(job, d.run, attempt)
                finally:
                    self.busy = False
                cursor = d.run
                self.records += 1
                if self.records % max(cfg.keep // 10, 1) == 0:
                    await ld.prune(job)
            elif d.wake_at is not None:
                with anyio.CancelScope() as self.idle:
                    await anyio.sleep(max(d.wake_at - time.time(), 0.0))
                self.idle = None


class Leader:
    """One term of office: loads the schedule, runs a :class:`Runner` per job, drains on request."""

    def __init__(self, client: coord.Client, cfg: Config, term: coord.Term, stopping: anyio.Event) -> None:
        self.client = client
        self.cfg = cfg
        self.keys = cfg.keys
        self.term = term
        self.token = term.revision
        self.stopping = stopping
        self.draining = False
        self.runners: dict[str, Runner] = {}
        self._file_state: tuple[float, list[Job]] | None = None
        self._published: str | None = None

    # -- fenced writes ---------------------------------------------------------------------------
    async def fenced(self, compare: Sequence[Compare], ops: Sequence[coord.Op], check_key: str | None = None) -> bool:
        """Run ``ops`` if this replica still leads and ``compare`` holds. Returns False if ``compare`` failed;
        raises Deposed if the leadership compare failed. A txn whose answer was lost is read back through
        ``check_key`` (whose value then carries our token) or simply repeated: every caller's compares make a
        repeat harmless."""
        while True:
            try:
                res = await self.client.txn([self.term.is_leader(), *compare], ops)
            except (coord.OutcomeUnknown, coord.Unavailable):
                await anyio.sleep(RETRY_PAUSE)
                continue
            if res.succeeded:
                return True
            now = await self.client.get(self.term.key)
            if now is None or now.create_revision != self.token:
                raise Deposed(f"no longer the leader (token {self.token})")
            if check_key is not None:
                kv = await self.client.get(check_key)
                if kv is not None and json.loads(kv.value).get("token") == self.token:
                    return True  # an earlier attempt whose answer was lost did land
            return False

    async def read_cursor(self, job: Job) -> int:
        """The job's cursor; a job never scheduled before starts at the latest tick that has passed (no
        catch-up of ticks from before it existed)."""
        key = self.keys.cursor(job.name)
        kv = await self.client.get(key)
        if kv is not None:
            return int(json.loads(kv.value)["tick"])
        now = int(time.time())
        start = job.schedule.last_at_or_before(now)
        tick = start if start is not None else now
        value = {"tick": tick, "id": tick_id(job.name, tick), "token": self.token, "new": True}
        if not await self.fenced([Compare.create_revision(key) == 0], [Put(key, dumps(value))]):
            kv = await self.client.get(key)  # created meanwhile (by our own earlier attempt)
            assert kv is not None
            return int(json.loads(kv.value)["tick"])
        return tick

    async def record_skip(self, job: Job, first: int, last: int) -> None:
        key = self.keys.run(job.name, first)
        record = {
            "job": job.name, "tick": tick_id(job.name, first), "time": iso(first), "status": "skipped",
            "until": iso(last), "policy": self.cfg.policy.value, "token": self.token,
            "leader": self.cfg.replica_id, "recorded": time.time(),
        }
        cursor = {"tick": last, "id": tick_id(job.name, last), "token": self.token}
        await self.fenced([Compare.create_revision(key) == 0],
                          [Put(key, dumps(record)), Put(self.keys.cursor(job.name), dumps(cursor))], key)
        emit("skip", job=job.name, first=tick_id(job.name, first), last=tick_id(job.name, last),
             policy=self.cfg.policy.value)

    async def prune(self, job: Job) -> None:
        """Keep the newest ``keep`` records of the job."""
        prefix = self.keys.runs(job.name)
        res = await self.client.get_prefix(prefix, keys_only=True)
        if res.count > self.cfg.keep:
            cut = res.kvs[res.count - self.cfg.keep].key
            await self.fenced([], [Delete(prefix, range_end=cut)])

    # -- one tick ----------------------------------------------------------------------------------
    async def run_tick(self, job: Job, tick: int, attempt: int) -> None:
        """Start the job for ``tick`` (fenced), wait for it, record the outcome (fenced, exactly once)."""
        keys, tid = self.keys, tick_id(job.name, tick)
        record_key = keys.run(job.name, tick)
        started = time.time()
        in_flight = {"tick": tick, "id": tid, "attempt": attempt, "token": self.token,
                     "leader": self.cfg.replica_id, "started": started}
        if not await self.fenced([Compare.create_revision(record_key) == 0],
                                 [Put(keys.running(job.name), dumps(in_flight))]):
            emit("already-recorded", job=job.name, tick=tid)  # cannot happen while cursors are fenced
            return
        emit("start", job=job.name, tick=tid, attempt=attempt, token=self.token, leader=self.cfg.replica_id)
        status, code, output, truncated = await self._execute(job, tick, attempt)
        finished = time.time()
        record = {
            "job": job.name, "tick": tid, "time": iso(tick), "tick_time": tick, "status": status, "exit_code": code,
            "attempt": attempt, "token": self.token, "leader": self.cfg.replica_id, "started": started,
            "finished": finished, "duration": round(finished - started, 3), "output": output,
            "output_truncated": truncated, "command": job.command,
        }
        cursor = {"tick": tick, "id": tid, "token": self.token}
        recorded = await self.fenced(
            [Compare.create_revision(record_key) == 0],
            [Put(record_key, dumps(record)), Put(keys.cursor(job.name), dumps(cursor)),
             Delete(keys.running(job.name))],
            record_key,
        )
        emit("done" if recorded else "already-recorded", job=job.name, tick=tid, status=status, exit_code=code,
             attempt=attempt, token=self.token)

    async def _execute(self, job: Job, tick: int, attempt: int) -> tuple[str, int | None, str, int]:
        """Run the command; (status, exit code, output tail, bytes of output dropped). Cancelling this (lost
        leadership, hard stop) kills the job's whole process group."""
        env = dict(os.environ)
        env.update({
            "CRON_JOB": job.name, "CRON_TICK": str(tick), "CRON_TICK_ID": tick_id(job.name, tick),
            "CRON_TICK_TIME": iso(tick), "CRON_ATTEMPT": str(attempt), "COORD_FENCING_TOKEN": str(self.token),
            "CRON_LEADER": self.cfg.replica_id,
        })
        limit = self.cfg.output_limit
        out = bytearray()
        dropped = 0
        proc = await anyio.open_process(["/bin/sh", "-c", job.command], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        timed_out = False
        try:
            async with anyio.create_task_group() as tg:
                eof = anyio.Event()

                async def read_output() -> None:
                    nonlocal dropped
                    assert proc.stdout is not None
                    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                                             anyio.BrokenResourceError):
                        while True:
                            out.extend(await proc.stdout.receive())
                            if len(out) > limit:
                                dropped += len(out) - limit
                                del out[: len(out) - limit]
                    eof.set()

                tg.start_soon(read_output)
                timeout = self.cfg.job_timeout if self.cfg.job_timeout > 0 else math.inf
                with anyio.move_on_after(timeout) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    await kill_group(proc, self.cfg.kill_grace)
                with anyio.move_on_after(1.0):  # a daemonised grandchild may keep the pipe open: do not wait
                    await eof.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if proc.returncode is None:
                    emit("kill", job=job.name, tick=tick_id(job.name, tick), pid=proc.pid)
                    await kill_group(proc, self.cfg.kill_grace)
                await proc.aclose()
        code = proc.returncode
        assert code is not None
        status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
        return status, exit_status(code), out.decode(errors="replace"), dropped

    # -- the term ------------------------------------------------------------------------------------
    async def load_jobs(self) -> list[Job]:
        """The crontab file's jobs (re-read when it changes) overlaid with the store's (same name: the
        store wins)."""
        jobs: dict[str, Job] = {}
        path = self.cfg.crontab
        if path is not None:
            try:
                mtime = path.stat().st_mtime
                if self._file_state is None or self._file_state[0] != mtime:
                    self._file_state = (mtime, parse_crontab(path.read_text(), str(path)))
            except (CrontabError, OSError) as exc:
                if self._file_state is None or self._file_state[0] != -1:
                    emit("crontab-error", error=str(exc))  # keep running the last good version
                self._file_state = (-1, self._file_state[1] if self._file_state else [])
            jobs.update((j.name, j) for j in self._file_state[1])
        store_jobs, errors = await load_store_jobs(self.client, self.keys)
        for err in errors:
            emit("crontab-error", error=err)
        jobs.update((j.name, j) for j in store_jobs)
        return list(jobs.values())

    async def apply_schedule(self, tg: anyio.abc.TaskGroup) -> None:
        jobs = await self.load_jobs()
        current = {j.name: j for j in jobs}
        for name, runner in list(self.runners.items()):
            if name not in current:
                runner.removed = True
                runner.poke()
                del self.runners[name]
            elif runner.job != current[name]:
                runner.job = current[name]
                runner.poke()
        for name, job in current.items():
            if name not in self.runners:
                self.runners[name] = runner = Runner(self, job)
                tg.start_soon(runner.run)
        published = dumps({"leader": self.cfg.replica_id, "token": self.token,
                           "jobs": [{"name": j.name, "spec": j.spec, "command": j.command} for j in jobs]})
        if published != self._published:
            await self.fenced([], [Put(self.keys.schedule, published)])
            self._published = published
            emit("schedule", jobs=",".join(sorted(current)) or "-", token=self.token)

    async def run(self) -> None:
        """Lead until ``stopping`` is set (then drain: no new ticks, wait up to ``drain`` seconds for running
        jobs, kill the rest) or until cancelled by the loss of leadership. Raises Deposed."""
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as schedule_tg:

                async def reload_loop() -> None:
                    async with self.client.watch(self.keys.jobs, prefix=True) as events:
                        while True:
                            await self.apply_schedule(tg)
                            with anyio.move_on_after(RELOAD_INTERVAL):
                                await events.receive()

                schedule_tg.start_soon(reload_loop)
                await self.stopping.wait()
                schedule_tg.cancel_scope.cancel()
            self.draining = True
            emit("draining", running=sum(r.busy for r in self.runners.values()))
            for runner in self.runners.values():
                runner.poke()
            with anyio.move_on_after(self.cfg.drain):
                for runner in list(self.runners.values()):
                    await runner.done.wait()
            tg.cancel_scope.cancel()  # jobs still running are killed; the next leader runs them again


async def kill_group(proc: anyio.abc.Process, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, wait for the process (shield it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with anyio.move_on_after(grace if sig == signal.SIGTERM else math.inf):
            await proc.wait()
        if proc.returncode is not None:
            # the leader is gone; its children may live on: kill the rest of the group too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return


class Replica(Campaigner):
    """Campaigns, leads, and campaigns again after losing leadership, until stopped.

    :meth:`stop` (first SIGTERM/SIGINT): a waiting replica leaves the queue at once; a leader drains (no new
    ticks, running jobs may finish for up to ``drain`` seconds) and resigns, so the next replica takes over
    immediately. A second :meth:`stop` kills running jobs and resigns now. Events: see
    :class:`~examples.common.Campaigner` (``campaign``, ``leader``, ...).
    """

    def __init__(self, client: coord.Client, cfg: Config) -> None:
        value = dumps({"id": cfg.replica_id, "host": socket.gethostname(), "pid": os.getpid()})
        super().__init__(client, election=cfg.keys.election, ttl=cfg.ttl, name=cfg.replica_id, value=value)
        self.cfg = cfg

    async def lead(self, term: coord.Term) -> None:
        await Leader(self.client, self.cfg, term, self.stopping).run()
