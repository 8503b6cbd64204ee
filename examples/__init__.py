"""Runnable coord examples. Run them from the repository root, e.g. ``python -m examples.cron --help``.

See examples/README.md. Every example uses only the public ``coord`` API.
"""
