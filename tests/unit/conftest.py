"""Hypothesis profiles for the unit tests.

``HYPOTHESIS_PROFILE=ci`` (the default) is deterministic and fast enough for every CI
run; ``HYPOTHESIS_PROFILE=soak`` runs many more random examples (reliability.md R20) and
keeps a failure database under ``.hypothesis/`` so a failure found there replays.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

# No "explain" phase: on Python < 3.12 it traces every line and turns a 10 s shrink into minutes.
# One bug per run: shrinking a second, distinct failure doubles the time to the first report.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    stateful_step_count=40,
    print_blob=True,
    phases=_PHASES,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "soak",
    derandomize=False,
    deadline=None,
    max_examples=5000,
    stateful_step_count=50,
    print_blob=True,
    phases=_PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
