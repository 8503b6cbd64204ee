"""``python -m examples.lockrun NAME -- COMMAND...`` — run a command while holding a distributed lock.

Like ``etcdctl lock NAME COMMAND`` (same keys: the two exclude each other), plus what a job runner needs: the
fencing token in the command's environment, the command killed if the lock is lost, its exit status passed on.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys

import anyio
import anyio.abc
import anyio.lowlevel

import coord

from ..common import add_backend_arg, add_connection_args, client_kwargs, exit_status, on_signals, run_cli, warn

EX_UNAVAILABLE = 69  # sysexits.h: the store could not be reached / the lock could not be taken
EX_TEMPFAIL = 75  # sysexits.h: the lock was lost (the command was killed), or --timeout passed

DESCRIPTION = """\
Run COMMAND while holding the distributed lock NAME (the key layout of `etcdctl lock`, so both exclude
each other). Waiters queue in order (FIFO). The command gets in its environment:

  COORD_FENCING_TOKEN  the lock key's create revision: it only grows from one holder to the next, so a
                       resource that refuses lower tokens cannot be written by a holder that lost the lock
  ETCD_LOCK_KEY        the lock key, <NAME>/<lease hex> (as etcdctl sets it)
  ETCD_LOCK_REV        a store revision at which the lock was held (as etcdctl sets it)
  COORD_LOCK_NAME, COORD_LEASE_ID

If the lock is lost while the command runs (its lease expired: this process was frozen or cut off from the
store; or someone deleted the key), the command's process group gets SIGTERM, then SIGKILL after
--kill-grace seconds. SIGTERM, SIGINT and SIGHUP sent to lockrun are passed on to the command; the lock is
released when the command has exited.
"""

EPILOG = f"""\
Exit status: the command's own (128+N if it was killed by signal N; 127 if it was not found, 126 if it
could not be run); {EX_TEMPFAIL} if the lock was lost while it ran or --timeout passed before the lock was
taken; {EX_UNAVAILABLE} if the store could not be used; 2 for a usage error.

Examples:
  python -m examples.lockrun nightly-backup -- ./backup.sh --full
  python -m examples.lockrun --shell reports -- 'generate-report > /tmp/report.$COORD_FENCING_TOKEN'
  python -m examples.lockrun --timeout 5 deploy -- ./deploy.sh || echo "someone else is deploying"
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.lockrun", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_args(p)
    p.add_argument("--ttl", type=int, default=10, help="lease TTL in seconds: how long a crashed holder keeps "
                   "the lock (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=0.0, help=f"give up (exit {EX_TEMPFAIL}) if the lock is not "
                   "taken within this many seconds (0 = wait forever; default: %(default)s)")
    p.add_argument("--kill-grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL when the "
                   "command is killed (default: %(default)s)")
    p.add_argument("--shell", action="store_true", help="run COMMAND with /bin/sh -c (its words joined by "
                   "spaces)")
    add_backend_arg(p)
    p.add_argument("name", metavar="NAME", help="the lock's name")
    p.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER, help="the command and its arguments "
                   "(put -- before it when it has options)")
    return p


async def signal_group(proc: anyio.abc.Process, sig: int) -> None:
    """Send ``sig`` to the command's process group (the command and its children)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    await anyio.lowlevel.checkpoint()


async def kill(proc: anyio.abc.Process, grace: float) -> None:
    """SIGTERM the command's process group, SIGKILL after ``grace`` seconds; wait for it. Shielded."""
    with anyio.CancelScope(shield=True):
        await signal_group(proc, signal.SIGTERM)
        with anyio.move_on_after(grace):
            await proc.wait()
        await signal_group(proc, signal.SIGKILL)  # also whatever the command left behind in its group
        await proc.wait()


class Command:
    """The command's state, shared with the signal handler: signals received before the lock is held cancel the
    wait; later ones are passed on to the command (as soon as it exists)."""

    def __init__(self) -> None:
        self.proc: anyio.abc.Process | None = None
        self.holding = False
        self.signals: list[signal.Signals] = []


async def run_command(args: argparse.Namespace, argv: list[str], env: dict[str, str], cmd: Command) -> int:
    """Start the command, wait for it; if this is cancelled (the lock was lost), kill its process group."""
    try:
        proc = await anyio.open_process(argv, stdin=None, stdout=None, stderr=None, env=env, start_new_session=True)
    except FileNotFoundError:
        warn(f"lockrun: {argv[0]}: command not found")
        return 127
    except PermissionError:
        warn(f"lockrun: {argv[0]}: permission denied")
        return 126
    cmd.proc = proc
    try:
        for sig in cmd.signals:  # signals that arrived while it was being started
            await signal_group(proc, sig)
        return exit_status(await proc.wait())
    finally:
        if proc.returncode is None:
            await kill(proc, args.kill_grace)
        await proc.aclose()


async def lockrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Take the lock, run the command, release. Returns the exit status (see EPILOG)."""
    cmd = Command()
    status = 1
    async with coord.open_client(**client_kwargs(args)) as client, anyio.create_task_group() as tg:
        waiting = anyio.CancelScope(deadline=anyio.current_time() + args.timeout if args.timeout > 0 else math.inf)

        def on_signal(sig: signal.Signals) -> None:
            cmd.signals.append(sig)
            if not cmd.holding:
                waiting.cancel()  # still waiting for the lock: leave the queue
            elif cmd.proc is not None:
                tg.start_soon(signal_group, cmd.proc, sig)  # the command decides how to stop

        tg.start_soon(on_signals, on_signal)
        try:
            with waiting:
                async with client.session(ttl=args.ttl) as session, session.lock(args.name) as lock:
                    waiting.deadline = math.inf  # --timeout bounds the wait only
                    if cmd.signals:  # a signal arrived just as the lock was taken: leave without running
                        await anyio.lowlevel.checkpoint()
                    cmd.holding = True  # from here on, signals go to the command
                    env = dict(os.environ)
                    env.update({
                        "COORD_FENCING_TOKEN": str(lock.fencing_token), "COORD_LOCK_NAME": args.name,
                        "COORD_LEASE_ID": f"{session.lease_id:x}", "ETCD_LOCK_KEY": lock.key.decode(),
                        "ETCD_LOCK_REV": str(lock.acquired_revision),
                    })
                    status = await run_command(args, argv, env, cmd)
            if waiting.cancelled_caught:
                if cmd.signals:
                    status = 128 + cmd.signals[0]
                else:
                    warn(f"lockrun: lock {args.name!r} not acquired within {args.timeout}s")
                    status = EX_TEMPFAIL
        except coord.LockLost as exc:
            warn(f"lockrun: {exc}; the command was killed")
            status = EX_TEMPFAIL
        tg.cancel_scope.cancel()
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        build_parser().error("a COMMAND is required")
    if args.shell:
        command = ["/bin/sh", "-c", " ".join(command)]
    return run_cli(lockrun, args, command, backend=args.backend, prog="lockrun", error_status=EX_UNAVAILABLE)


if __name__ == "__main__":
    sys.exit(main())
