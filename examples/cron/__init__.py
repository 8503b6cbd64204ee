"""A distributed cron on coord: ``python -m examples.cron --help``.

:mod:`.schedule` is the pure part (crontab parsing, tick arithmetic, the catch-up policy); :mod:`.scheduler`
the replica that campaigns and fires jobs with fenced bookkeeping.
"""
