"""Run the example programs (``python -m examples.<name>``) as real processes and read their logfmt events.

Every process is started from the repository root (so ``examples`` is importable exactly as the README tells
users to run it), in its own session, with stdout read by a thread into ``lines`` and stderr kept in a file
of the test's tmp dir. :class:`Fleet` owns the processes of one test and reaps all of them (SIGCONT, SIGKILL,
wait, close pipes) however the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    # Appended, not prepended: `examples` (a regular package) then wins over the tests/examples namespace dir.
    sys.path.append(str(ROOT))

from examples.common import parse_logfmt  # noqa: E402
from examples.fenced_sink import sink  # noqa: E402

T = TypeVar("T")
Event = dict[str, str]


def example_env(endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDCTL_", "COORD_", "ETCD_"))}
    if endpoint is not None:
        env["COORD_ENDPOINTS"] = endpoint
    return env


class ExampleProcess:
    """One ``python -m <module> <args>`` process."""

    def __init__(self, module: str, args: Iterable[str], *, name: str, workdir: Path, endpoint: str | None,
                 stdin: bool = False) -> None:
        self.name = name
        self.err_path = workdir / f"{name}.stderr"
        self._err = open(self.err_path, "wb")  # closed in close()
        self.argv = [sys.executable, "-m", module, *args]
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._err, env=example_env(endpoint), text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()
        self.killed_at: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def events(self, event: str | None = None, **fields: object) -> list[Event]:
        """Parsed logfmt lines, optionally only those with ``event`` and the given field values."""
        with self._lock:
            lines = list(self.lines)
        out = []
        for line in lines:
            ev = parse_logfmt(line)
            if event is not None and ev.get("event") != event:
                continue
            if all(ev.get(k) == str(v) for k, v in fields.items()):
                out.append(ev)
        return out

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def kill(self) -> None:
        """SIGKILL (the process only, not the jobs it started) and reap."""
        self.killed_at = time.time()
        self.proc.kill()
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (raises subprocess.TimeoutExpired if it hangs)."""
        if self.running:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.close_stdin()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._err.close()

    def stderr_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def report(self) -> str:
        with self._lock:
            out = "\n".join(self.lines[-40:])
        return f"--- {self.name} (rc={self.proc.poll()}) stdout tail:\n{out}\n--- stderr tail:\n{self.stderr_tail()}"


class Fleet:
    """The example processes of one test; :meth:`close` reaps them all."""

    def __init__(self, workdir: Path, endpoint: str | None) -> None:
        self.workdir = workdir
        self.endpoint = endpoint
        self.procs: list[ExampleProcess] = []

    def start(self, module: str, *args: str, name: str, stdin: bool = False) -> ExampleProcess:
        p = ExampleProcess(module, args, name=name, workdir=self.workdir, endpoint=self.endpoint, stdin=stdin)
        self.procs.append(p)
        return p

    def start_sink(self) -> tuple[ExampleProcess, str]:
        """The fenced sink as its own process; returns it and its URL."""
        p = self.start("examples.fenced_sink", "serve", "--port", "0", name="sink")
        ev = self.wait_until(lambda: next(iter(p.events("listening")), None), 20, "the sink to listen")
        return p, ev["url"]

    def wait_until(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        """Poll ``probe`` until it returns something truthy (and return it); fail with every process's output."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.report()}")
            time.sleep(0.02)

    def events(self, event: str | None = None, **fields: object) -> list[tuple[ExampleProcess, Event]]:
        """Events of every process, in timestamp order."""
        out = [(p, ev) for p in self.procs for ev in p.events(event, **fields)]
        return sorted(out, key=lambda pe: float(pe[1].get("ts", 0)))

    def report(self) -> str:
        return "\n".join(p.report() for p in self.procs)

    def close(self) -> None:
        errors = []
        for p in self.procs:
            try:
                p.close()
            except Exception as exc:  # keep reaping the others
                errors.append(f"{p.name}: {exc!r}")
        assert not errors, errors


def sink_stats(url: str) -> dict[str, Any]:
    return sink.stats(url)


def run_example(module: str, *args: str, endpoint: str | None, timeout: float = 60.0,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an example to completion (an observer command such as ``history``)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=example_env(endpoint), text=True,
                          capture_output=True, timeout=timeout, input=input, check=False)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in out:
                    out.append(c)
                    todo.append(c)
    return out
