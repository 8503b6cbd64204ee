"""coord: a Trio-first client for etcd v3 coordination (locks, elections, sessions, watches)."""

__version__ = "0.1.0"
