"""Fixtures for the example tests: ``fleet(endpoint)`` makes a :class:`example_kit.Fleet` of example processes,
reaped at teardown; a failing test's report gets every example process's output."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from example_kit import Fleet

_FLEETS_ATTR = "_example_fleets"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.failed:
        for fleet in getattr(item, _FLEETS_ATTR, []):
            for p in fleet.procs:
                rep.sections.append((f"example {p.name}", p.report()))
    return rep


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str | None], Fleet]]:
    made: list[Fleet] = []
    setattr(request.node, _FLEETS_ATTR, made)

    def make(endpoint: str | None) -> Fleet:
        f = Fleet(tmp_path, endpoint)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
