"""``python -m examples.cron`` — a distributed cron. See ``--help`` and examples/README.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import coord

from ..common import add_fleet_args, client_kwargs, run_cli, serve_replica, warn
from .schedule import CatchUp, CrontabError, iso, parse_entry, parse_job, tick_id, upcoming
from .scheduler import Config, Keys, Replica, dumps, load_store_jobs

DESCRIPTION = """\
A distributed cron. Run the same `run` command on several machines: the replicas elect a leader and only
the leader fires jobs. Each tick is recorded exactly once in the store (fenced by the leader's term), a job
receives CRON_TICK_ID and COORD_FENCING_TOKEN, a job still running when its leader loses office is killed,
and ticks missed during a failover are caught up according to --catch-up.
"""

RUN_EPILOG = """\
Job environment: CRON_JOB, CRON_TICK (unix time), CRON_TICK_ID (<job>@<UTC time>, the same on every attempt),
CRON_TICK_TIME, CRON_ATTEMPT (1, or more when a leader died before recording the tick), CRON_LEADER and
COORD_FENCING_TOKEN (grows with every new leader: have your side effects refuse lower tokens).
A job's output (stdout and stderr, the last --output-limit bytes) and exit status are recorded in the store.
A job never overlaps itself: ticks of one job run one after the other.

Catch-up policies for ticks missed while no leader could fire them (a tick that was started and never
recorded is always run again):
  all     run every missed tick, oldest first, at most --max-catch-up of them (older ones: skipped)
  latest  run only the most recent missed tick
  skip    run a missed tick only if it is at most --grace seconds late

SIGTERM/SIGINT: a waiting replica exits; the leader starts no new tick, waits up to --drain seconds for
running jobs, records them and resigns (the next replica takes over at once). A second signal kills the
running jobs (the next leader runs those ticks again).
"""

EPILOG = """\
Examples:
  python -m examples.cron run --crontab examples/cron/crontab.example      # on each machine
  python -m examples.cron add hello '@every 5s' 'echo hello from $CRON_LEADER'
  python -m examples.cron status
  python -m examples.cron history --job hello --limit 5 --output

`python -m examples.cron run --help` explains the job environment and the catch-up policies.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.cron", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a scheduler replica (campaign; fire jobs while leader)",
                       description="Run a scheduler replica: campaign for leadership and, while leader, fire "
                       "the jobs. Prints one logfmt event per line on stdout.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fleet_args(p, "cron")
    p.add_argument("--crontab", type=Path, help="crontab file (re-read when it changes); jobs added with `add` "
                   "are merged in (the store wins on a name clash)")
    p.add_argument("--id", dest="replica_id", help="this replica's name (default: <host>-<pid>)")
    p.add_argument("--ttl", type=int, default=10, help="leader lease TTL in seconds: a crashed leader is "
                   "replaced within it (default: %(default)s)")
    p.add_argument("--catch-up", choices=[c.value for c in CatchUp], default="all",
                   help="policy for ticks missed during a failover (default: %(default)s; see below)")
    p.add_argument("--max-catch-up", type=int, default=10, help="with --catch-up all: run at most this many "
                   "missed ticks per job (default: %(default)s)")
    p.add_argument("--grace", type=float, default=5.0, help="with --catch-up skip: how late a tick may still "
                   "run, in seconds (default: %(default)s)")
    p.add_argument("--kill-grace", type=float, default=2.0, help="seconds between SIGTERM and SIGKILL when a "
                   "job is killed (default: %(default)s)")
    p.add_argument("--job-timeout", type=float, default=0.0, help="kill a job running longer than this many "
                   "seconds (0 = never; default: %(default)s)")
    p.add_argument("--drain", type=float, default=30.0, help="on SIGTERM a leader waits this long for running "
                   "jobs before killing them and resigning (default: %(default)s)")
    p.add_argument("--keep", type=int, default=200, help="run records kept per job (default: %(default)s)")
    p.add_argument("--output-limit", type=int, default=4096, help="bytes of job output kept in the record "
                   "(the tail; default: %(default)s)")

    p = sub.add_parser("add", help="add or replace a job in the store")
    add_fleet_args(p, "cron")
    p.add_argument("name")
    p.add_argument("schedule", help="a cron expression (5 or 6 fields) or @every 10s, @hourly, ...")
    p.add_argument("command", help="shell command (run with /bin/sh -c)")

    p = sub.add_parser("remove", help="remove a job from the store")
    add_fleet_args(p, "cron")
    p.add_argument("name")

    p = sub.add_parser("status", help="the leader, its schedule, running and upcoming ticks")
    add_fleet_args(p, "cron")
    p.add_argument("--upcoming", type=int, default=3, help="upcoming ticks shown per job (default: %(default)s)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("history", help="past runs (newest first) from the store")
    add_fleet_args(p, "cron")
    p.add_argument("--job", help="only this job")
    p.add_argument("--limit", type=int, default=20, help="how many (0 = all; default: %(default)s)")
    p.add_argument("--output", action="store_true", help="show each run's output")
    p.add_argument("--json", action="store_true", help="JSON lines, oldest first")
    return parser


async def cmd_run(args: argparse.Namespace) -> int:
    cfg = Config(prefix=args.prefix, ttl=args.ttl, crontab=args.crontab, policy=CatchUp(args.catch_up),
                 max_catch_up=args.max_catch_up, grace=args.grace, kill_grace=args.kill_grace,
                 job_timeout=args.job_timeout, drain=args.drain, keep=args.keep, output_limit=args.output_limit)
    if args.replica_id:
        cfg.replica_id = args.replica_id
    if cfg.crontab is not None:
        from .schedule import parse_crontab

        parse_crontab(cfg.crontab.read_text(), str(cfg.crontab))  # fail fast on a broken file
    return await serve_replica(args, lambda client: Replica(client, cfg))


async def cmd_add(args: argparse.Namespace) -> int:
    entry = f"{args.schedule} {args.command}"
    parse_job(args.name, entry)  # validate before storing
    async with coord.open_client(**client_kwargs(args)) as client:
        await client.put(Keys(args.prefix.rstrip("/")).job(args.name), entry)
    print(f"added {args.name}: {entry}")
    return 0


async def cmd_remove(args: argparse.Namespace) -> int:
    async with coord.open_client(**client_kwargs(args)) as client:
        res = await client.delete(Keys(args.prefix.rstrip("/")).job(args.name))
    if not res.deleted:
        warn(f"no job {args.name!r} in the store (jobs from a crontab file are removed by editing the file)")
        return 1
    print(f"removed {args.name}")
    return 0


async def _last_record(client: coord.Client, keys: Keys, job: str) -> dict[str, Any] | None:
    res = await client.get_prefix(keys.runs(job), limit=1, sort_order=coord.SortOrder.DESCEND)
    return json.loads(res.kvs[0].value) if res.kvs else None


async def cmd_status(args: argparse.Namespace) -> int:
    keys = Keys(args.prefix.rstrip("/"))
    async with coord.open_client(**client_kwargs(args)) as client:
        leader_kv = await client.election(keys.election).leader()
        sched_kv = await client.get(keys.schedule)
        published = json.loads(sched_kv.value) if sched_kv else {"jobs": []}
        store_jobs, errors = await load_store_jobs(client, keys)
        jobs = []
        for j in published["jobs"]:
            cursor_kv = await client.get(keys.cursor(j["name"]))
            running_kv = await client.get(keys.running(j["name"]))
            cursor = json.loads(cursor_kv.value)["tick"] if cursor_kv else int(time.time())
            _, sched, _ = parse_entry(f"{j['spec']} {j['command']}")
            jobs.append({
                **j,
                "running": json.loads(running_kv.value) if running_kv else None,
                "last": await _last_record(client, keys, j["name"]),
                "upcoming": [tick_id(j["name"], t) for t in upcoming(sched, cursor, args.upcoming)],
            })
    status: dict[str, Any] = {
        "leader": json.loads(leader_kv.value) if leader_kv else None,
        "leader_token": leader_kv.create_revision if leader_kv else None,
        "jobs": jobs,
        "store_jobs": [j.line() for j in store_jobs],
        "store_errors": errors,
    }
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    leader = status["leader"]
    print(f"leader: {leader['id']} (pid {leader['pid']} on {leader['host']}, token {status['leader_token']})"
          if leader else "leader: none")
    for j in jobs:
        print(f"\n{j['name']}  {j['spec']}  {j['command']}")
        if j["running"]:
            r = j["running"]
            print(f"  running:  {r['id']} attempt {r['attempt']} since {iso(int(r['started']))} on {r['leader']}")
        if j["last"]:
            last = j["last"]
            print(f"  last:     {last['tick']} {last['status']}" + (f" exit {last['exit_code']}"
                                                                     if "exit_code" in last else ""))
        print("  upcoming: " + ", ".join(t.split("@", 1)[1] for t in j["upcoming"]))
    for err in errors:
        print(f"bad job in the store: {err}")
    return 0


async def cmd_history(args: argparse.Namespace) -> int:
    keys = Keys(args.prefix.rstrip("/"))
    async with coord.open_client(**client_kwargs(args)) as client:
        res = await client.get_prefix(keys.runs(args.job) if args.job else keys.runs_root)
    records = [json.loads(kv.value) for kv in res.kvs]
    records.sort(key=lambda r: (r["time"], r["job"]))
    if args.limit:
        records = records[-args.limit:]
    if args.json:
        for r in records:
            print(dumps(r))
        return 0
    for r in reversed(records):
        if r["status"] == "skipped":
            print(f"{r['tick']}  skipped through {r['until']} (policy {r['policy']}, leader {r['leader']})")
            continue
        late = r["started"] - r["tick_time"] if "tick_time" in r else 0.0
        print(f"{r['tick']}  {r['status']:<7} exit {r['exit_code']:<3} attempt {r['attempt']}  started "
              f"{late:+.1f}s  took {r['duration']:.3f}s  token {r['token']}  on {r['leader']}")
        if args.output and r["output"]:
            print("    " + r["output"].rstrip("\n").replace("\n", "\n    "))
    return 0


COMMANDS = {"run": cmd_run, "add": cmd_add, "remove": cmd_remove, "status": cmd_status, "history": cmd_history}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_cli(COMMANDS[args.cmd], args, backend=args.backend, prog="cron")
    except (CrontabError, OSError) as exc:
        warn(f"cron: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
