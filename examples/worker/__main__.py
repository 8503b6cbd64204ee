"""``python -m examples.worker`` — a leader-elected worker. See ``--help`` and examples/README.md."""

from __future__ import annotations

import argparse
import secrets
import sys
import time

import anyio

import coord

from ..common import add_fleet_args, client_kwargs, emit, on_signals, run_cli, serve_replica
from .worker import Config, Keys, Worker, observe

DESCRIPTION = """\
A leader-elected worker: run `run` on several machines; exactly one replica consumes the queue
(<prefix>/queue/), the others stand by. SIGTERM finishes the item in hand and hands over at once; a crashed
worker is replaced within --ttl seconds. Events are printed as logfmt lines on stdout.
"""

EPILOG = """\
Examples:
  python -m examples.worker run --id a &  python -m examples.worker run --id b &
  python -m examples.worker observe                  # who is active, live
  python -m examples.worker enqueue hello world      # or: some-producer | python -m examples.worker enqueue
  python -m examples.worker run --backend asyncio --sink http://127.0.0.1:8080   # deliver to a fenced sink
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.worker", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a worker replica",
                       description="Campaign; while active, take the items of <prefix>/queue/ in order, deliver "
                       "each (--sink) or print it, then acknowledge it (delete it, fenced by the leadership). "
                       "SIGTERM/SIGINT: finish the item in hand, resign, exit (a second signal abandons the item; "
                       "the next worker delivers it again).")
    add_fleet_args(p, "worker")
    p.add_argument("--id", dest="worker_id", help="this worker's name (default: <host>-<pid>)")
    p.add_argument("--ttl", type=int, default=10, help="lease TTL in seconds: a crashed worker is replaced "
                   "within it (default: %(default)s)")
    p.add_argument("--sink", help="deliver each item to this fenced sink (examples/fenced_sink) with the "
                   "fencing token, instead of printing it")
    p = sub.add_parser("observe", help="print the active worker now and on every change",
                       description="Follow the election: print the active worker now and on every change.")
    add_fleet_args(p, "worker")
    p = sub.add_parser("enqueue", help="add items to the queue (arguments, or one per line of stdin)")
    add_fleet_args(p, "worker")
    p.add_argument("values", nargs="*")
    p = sub.add_parser("status", help="the active worker and the queue length")
    add_fleet_args(p, "worker")
    return parser


async def cmd_run(args: argparse.Namespace) -> int:
    cfg = Config(prefix=args.prefix, ttl=args.ttl, sink=args.sink)
    if args.worker_id:
        cfg.worker_id = args.worker_id
    return await serve_replica(args, lambda client: Worker(client, cfg))


async def cmd_observe(args: argparse.Namespace) -> int:
    async with coord.open_client(**client_kwargs(args)) as client, anyio.create_task_group() as tg:
        tg.start_soon(on_signals, lambda sig: tg.cancel_scope.cancel())
        await observe(client, Keys(args.prefix.rstrip("/")))
    return 0


async def cmd_enqueue(args: argparse.Namespace) -> int:
    queue = Keys(args.prefix.rstrip("/")).queue
    async with coord.open_client(**client_kwargs(args)) as client:

        async def put(value: str) -> None:
            item = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
            res = await client.put(queue + item, value)
            emit("enqueued", item=item, revision=res.revision)

        if args.values:
            for value in args.values:
                await put(value)
        else:
            async for line in anyio.wrap_file(sys.stdin):
                if line.strip():
                    await put(line.rstrip("\n"))
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    keys = Keys(args.prefix.rstrip("/"))
    async with coord.open_client(**client_kwargs(args)) as client:
        leader = await client.election(keys.election).leader()
        queued = await client.get_prefix(keys.queue, count_only=True)
    print(f"active: {leader.value.decode()} (token {leader.create_revision})" if leader else "active: none")
    print(f"queued: {queued.count}")
    return 0


COMMANDS = {"run": cmd_run, "observe": cmd_observe, "enqueue": cmd_enqueue, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(COMMANDS[args.cmd], args, backend=args.backend, prog="worker")


if __name__ == "__main__":
    sys.exit(main())
