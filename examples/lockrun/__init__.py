"""A lock-guarded job runner on coord, compatible with ``etcdctl lock``: ``python -m examples.lockrun --help``."""
