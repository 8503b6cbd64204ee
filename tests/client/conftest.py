"""Client suite fixtures.

Every test here runs on each anyio backend (``anyio_backend``: trio, asyncio, asyncio+uvloop) against each
server kind (``shared_server`` from tests/conftest.py: one real etcd 3.4 and one coord-server per module).
Slow, TTL-bound modules narrow the backends with ``one_backend_per_server``.
"""

from __future__ import annotations

from typing import Any

import pytest

BACKENDS = [
    pytest.param("trio", id="trio"),
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param

