"""coord-server: a single-node server that speaks the etcd v3 API (import name ``coord_server``)."""

from ._version import API_VERSION, CLUSTER_VERSION, SERVER_VERSION

__all__ = ["API_VERSION", "CLUSTER_VERSION", "SERVER_VERSION"]
