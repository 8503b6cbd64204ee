"""Shared fixtures: real etcd and coord-server processes, etcdctl, differential runs.

Fixtures
  etcd_binary   session: path of the real etcd 3.4 binary (and etcdctl). Missing -> skip with a reason,
                but with CI=true -> fail.
  etcd          function: a fresh, started real etcd (own data dir and ports).
  coord         function: a fresh, started coord-server (``python -m coord_server``).
  server        function, parametrized ["etcd", "coord"]: tests that must pass on both.
  shared_server module, parametrized ["etcd", "coord"]: one server per module and kind.
  etcd_and_coord  function: (etcd, coord), both fresh, booted in parallel.
  differential  function: ``differential(scenario, etcd_args=(), coord_args=(), setup=None)`` boots a
                fresh etcd and a fresh coord-server in parallel, runs the etcdctl scenario against both
                and asserts equal normalised output.
  server_factory  function: ``server_factory("etcd"|"coord", **kw)`` -> unstarted process, stopped at
                teardown.

Environment
  COORD_TEST_CANDIDATE=etcd   run real etcd wherever coord-server would run (checks the tests and the
                              normalisation themselves: every differential test must pass etcd-vs-etcd).
  CI=true                     missing etcd binaries fail instead of skip (Hypothesis profiles: tests/unit).

When a test fails, the tail of every server log it started is attached to the report.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("helpers")

from helpers import (  # noqa: E402
    CoordServerProcess,
    EtcdProcess,
    ServerProcess,
    find_etcd,
    find_etcdctl,
    start_all,
)
from helpers import differential as run_differential  # noqa: E402
from helpers.etcdctl import ScenarioStep  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
CANDIDATE = os.environ.get("COORD_TEST_CANDIDATE", "coord")

# ---------------------------------------------------------------------------------------------------
# attach server logs to failing reports

_SERVERS_ATTR = "_coord_test_servers"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    rep = yield
    if rep.failed:
        servers: list[ServerProcess] = list(getattr(item, _SERVERS_ATTR, []))
        for value in getattr(item, "funcargs", {}).values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, ServerProcess) and v not in servers:
                    servers.append(v)
        for srv in servers:
            rep.sections.append((f"{srv.kind} log ({srv.endpoint})", srv.log_tail(80)))
    return rep


# ---------------------------------------------------------------------------------------------------
# binaries


def _etcd_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in out.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    binary, ctl = find_etcd(), find_etcdctl()
    reason = None
    if binary is None or ctl is None:
        reason = (
            "real etcd 3.4 binaries not found (need /usr/bin/etcd and /usr/bin/etcdctl or both on PATH; "
            "apt-get install etcd-server etcd-client)"
        )
    else:
        version = _etcd_version(binary)
        if not version.startswith("3.4."):
            reason = f"{binary} is etcd {version}, the differential tests need etcd 3.4.x"
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    assert binary is not None
    return binary


# ---------------------------------------------------------------------------------------------------
# processes

ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    made: list[ServerProcess] = []
    setattr(request.node, _SERVERS_ATTR, made)

    def make(kind: str, **kw: Any) -> ServerProcess:
        srv = _new_server(request, kind, tmp_path / f"{kind}{len(made)}", **kw)
        made.append(srv)
        return srv

    yield make
    _stop_all(made)


def _new_server(request: pytest.FixtureRequest, kind: str, workdir: Path, **kw: Any) -> ServerProcess:
    if kind == "etcd" or (kind == "coord" and CANDIDATE == "etcd"):
        return EtcdProcess(workdir, binary=request.getfixturevalue("etcd_binary"), **kw)
    if kind == "coord":
        return CoordServerProcess(workdir, **kw)
    raise ValueError(kind)


def _stop_all(servers: Sequence[ServerProcess]) -> None:
    errors = []
    for srv in servers:
        try:
            srv.stop()
        except Exception as exc:  # keep stopping the others
            errors.append(f"{srv!r}: {exc!r}")
    assert not errors, f"could not stop servers: {errors}"


@pytest.fixture
def etcd(server_factory: ServerFactory, etcd_binary: str) -> ServerProcess:
    return server_factory("etcd").start()


@pytest.fixture
def coord(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("coord").start()


@pytest.fixture(params=[pytest.param("etcd", marks=pytest.mark.etcd), "coord"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    srv: ServerProcess = request.getfixturevalue(request.param)
    return srv


@pytest.fixture(scope="module", params=[pytest.param("etcd", marks=pytest.mark.etcd), "coord"])
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per module and kind, for tests that leave no state others depend on (each test measures
    the revision before and after itself)."""
    srv = _new_server(request, request.param, tmp_path_factory.mktemp(f"shared-{request.param}"))
    try:
        yield srv.start()
    finally:
        _stop_all([srv])


@pytest.fixture
def etcd_and_coord(server_factory: ServerFactory, etcd_binary: str) -> tuple[ServerProcess, ServerProcess]:
    pair = (server_factory("etcd"), server_factory("coord"))
    start_all(pair)
    return pair


Differential = Callable[..., tuple[ServerProcess, ServerProcess]]


@pytest.fixture
def differential(server_factory: ServerFactory, etcd_binary: str) -> Differential:
    """``differential(scenario, *, args=(), etcd_args=(), coord_args=(), setup=None)`` -> (etcd, coord).

    Starts a fresh etcd and a fresh coord-server in parallel (``args`` go to both), calls ``setup(server)``
    on each if given, runs every step of the scenario against each and asserts identical normalised
    rc/stdout/stderr.
    """

    def run(
        scenario: Sequence[ScenarioStep],
        *,
        args: Sequence[str] = (),
        etcd_args: Sequence[str] = (),
        coord_args: Sequence[str] = (),
        setup: Callable[[ServerProcess], object] | None = None,
    ) -> tuple[ServerProcess, ServerProcess]:
        ref = server_factory("etcd", extra_args=[*args, *etcd_args])
        cand = server_factory("coord", extra_args=[*args, *coord_args])
        start_all([ref, cand])
        if setup is not None:
            setup(ref)
            setup(cand)
        run_differential(ref, cand, scenario)
        return ref, cand

    return run
