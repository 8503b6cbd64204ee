"""A leader-elected queue worker on coord: ``python -m examples.worker --help``."""
