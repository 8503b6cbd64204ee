"""Run the real etcdctl 3.4 (API v3) against an endpoint."""

from __future__ import annotations

import difflib
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .normalize import normalize

COMMAND_TIMEOUT = "5s"
PROCESS_TIMEOUT = 30.0


def find_etcdctl() -> str | None:
    if os.access("/usr/bin/etcdctl", os.X_OK):
        return "/usr/bin/etcdctl"
    return shutil.which("etcdctl")


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        """Raise unless rc == 0 (for setup steps)."""
        if self.rc != 0:
            raise AssertionError(
                f"etcdctl failed rc={self.rc}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
            )
        return self


def etcdctl(
    endpoint: str,
    *args: str,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = PROCESS_TIMEOUT,
) -> Result:
    """``etcdctl --endpoints=<endpoint> --command-timeout=5s <args>`` with ETCDCTL_API=3."""
    binary = find_etcdctl()
    if binary is None:
        raise RuntimeError("etcdctl binary not found")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    full_env["ETCDCTL_API"] = "3"
    if env:
        full_env.update(env)
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [binary, f"--endpoints={endpoint}", f"--command-timeout={COMMAND_TIMEOUT}", *args],
        input=data if data is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    return Result(
        proc.returncode,
        proc.stdout.decode("utf-8", errors="backslashreplace"),
        proc.stderr.decode("utf-8", errors="backslashreplace"),
    )


# ---------------------------------------------------------------------------------------------------
# differential runs: the same etcdctl invocations against two servers, outputs compared


@dataclass(frozen=True)
class Cmd:
    """One etcdctl invocation of a scenario.

    ``args`` may contain the placeholders {member_hex}, {member_id}, {endpoint}, {client_url}, {peer_url}:
    they are filled in per server (str.replace, so other braces are left alone).
    """

    args: tuple[str, ...]
    input: str | None = None

    def render(self, server: object) -> tuple[str, ...]:
        values = {
            "{member_hex}": lambda: f"{server.member_id:x}",  # type: ignore[attr-defined]
            "{member_id}": lambda: str(server.member_id),  # type: ignore[attr-defined]
            "{endpoint}": lambda: server.endpoint,  # type: ignore[attr-defined]
            "{client_url}": lambda: server.client_url,  # type: ignore[attr-defined]
            "{peer_url}": lambda: server.peer_url,  # type: ignore[attr-defined]
        }
        out = []
        for a in self.args:
            for token, value in values.items():
                if token in a:
                    a = a.replace(token, value())
            out.append(a)
        return tuple(out)

    def title(self) -> str:
        text = "$ etcdctl " + " ".join(shlex.quote(a) for a in self.args)
        if self.input is not None:
            text += "  <<STDIN\n" + self.input + "STDIN"
        return text


@dataclass(frozen=True)
class Action:
    """A scenario step that is not an etcdctl call: ``fn(server)`` (e.g. a restart, a gRPC request).
    Its return value (if not None) is recorded as the step's stdout and compared like etcdctl output."""

    name: str
    fn: Callable[[Any], object]

    def title(self) -> str:
        return f"# action: {self.name}"


def cmd(*args: str, input: str | None = None) -> Cmd:
    """``cmd("get", "a", "--prefix")``; a single string is split like a shell would."""
    if len(args) == 1 and " " in args[0]:
        args = tuple(shlex.split(args[0]))
    return Cmd(tuple(args), input)


ScenarioStep = Cmd | Action | str | Sequence[str]


def _as_cmd(step: ScenarioStep) -> Cmd | Action:
    if isinstance(step, Cmd | Action):
        return step
    if isinstance(step, str):
        return cmd(step)
    return Cmd(tuple(step))


def run_scenario(server: Any, scenario: Sequence[ScenarioStep]) -> list[tuple[Cmd | Action, Result]]:
    """Run each step in order against one server (``server.endpoint``)."""
    results: list[tuple[Cmd | Action, Result]] = []
    for step in scenario:
        c = _as_cmd(step)
        if isinstance(c, Action):
            out = c.fn(server)
            results.append((c, Result(0, "" if out is None else f"{out}\n", "")))
        else:
            results.append((c, etcdctl(server.endpoint, *c.render(server), input=c.input)))
    return results


def transcript(server: Any, results: Sequence[tuple[Cmd | Action, Result]], *, normalise: bool = True) -> str:
    """A readable record of a run; normalised (see helpers.normalize) unless told otherwise."""
    parts = []
    for c, r in results:
        out, err = r.stdout, r.stderr
        if normalise:
            out, err = normalize(out, server), normalize(err, server)
        parts.append(f"{c.title()}\n[rc={r.rc}]\n[stdout]\n{out}\n[stderr]\n{err}\n[end]\n")
    return "".join(parts)


def compare_transcripts(
    reference: str, candidate: str, ref_name: str = "etcd", cand_name: str = "coord"
) -> None:
    if reference == candidate:
        return
    diff = "".join(
        difflib.unified_diff(
            reference.splitlines(keepends=True),
            candidate.splitlines(keepends=True),
            fromfile=ref_name,
            tofile=cand_name,
            n=8,
        )
    )
    raise AssertionError(f"{cand_name} output differs from {ref_name} (after normalisation):\n{diff}")


def differential(reference: Any, candidate: Any, scenario: Sequence[ScenarioStep]) -> str:
    """Run ``scenario`` against both (already started, fresh) servers in parallel, normalise, and assert
    equal rc/stdout/stderr for every step with a unified diff on failure. Returns the reference transcript."""
    steps = [_as_cmd(s) for s in scenario]
    with ThreadPoolExecutor(max_workers=2) as pool:
        f_ref = pool.submit(run_scenario, reference, steps)
        f_cand = pool.submit(run_scenario, candidate, steps)
        ref_results, cand_results = f_ref.result(), f_cand.result()
    ref_t = transcript(reference, ref_results)
    cand_t = transcript(candidate, cand_results)
    compare_transcripts(ref_t, cand_t, reference.kind, candidate.kind)
    return ref_t
