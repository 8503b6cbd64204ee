"""The etcd versions coord-server reports: it implements the etcd 3.4 API, so it says so."""

SERVER_VERSION = "3.4.23"
CLUSTER_VERSION = "3.4.0"
API_VERSION = "3.4"
