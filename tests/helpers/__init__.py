"""Test helpers: etcd and coord-server processes, etcdctl, output normalisation, differential runs."""

from .etcdctl import (
    Action,
    Cmd,
    Result,
    cmd,
    compare_transcripts,
    differential,
    etcdctl,
    find_etcdctl,
    run_scenario,
    transcript,
)
from .normalize import Known, normalize, normalize_message
from .procs import (
    CoordServerProcess,
    EtcdProcess,
    ServerProcess,
    find_etcd,
    free_port,
    start_all,
)

__all__ = [
    "Action",
    "Cmd",
    "CoordServerProcess",
    "EtcdProcess",
    "Known",
    "Result",
    "ServerProcess",
    "cmd",
    "compare_transcripts",
    "differential",
    "etcdctl",
    "find_etcd",
    "find_etcdctl",
    "free_port",
    "normalize",
    "normalize_message",
    "run_scenario",
    "start_all",
    "transcript",
]
