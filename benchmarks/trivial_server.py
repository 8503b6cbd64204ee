"""A do-nothing server on coord-server's own RPC stack: the ceiling for kv_bench.py.

Same listener (:class:`coord_server.transport.ClientListener`: sniffer + coord's HTTP/2 path,
:mod:`coord_server.h2conn`), same method binding (:class:`coord_server.rpc.Method`), same event
loop (asyncio + uvloop) as coord-server, but ``/etcdserverpb.KV/Range`` and ``/etcdserverpb.KV/Put``
answer an empty response at once: no validation, no store, no writer, no fsync. Whatever
coord-server costs beyond this server is coord's own work. (Both handlers have no await, so the
transport runs them eagerly, without a task, as it runs coord's Range; coord's Put awaits the
write path and gets a task: that difference counts as coord's work.)

Usage: python benchmarks/trivial_server.py PORT [HOST]   (stops on SIGINT/SIGTERM)
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from coord._pb import rpc_pb2
from coord_server.rpc import CallContext, Kind, Method
from coord_server.transport import ClientListener

_RANGE_RESPONSE = rpc_pb2.RangeResponse
_PUT_RESPONSE = rpc_pb2.PutResponse


async def _range(request: rpc_pb2.RangeRequest, ctx: CallContext) -> rpc_pb2.RangeResponse:
    return _RANGE_RESPONSE()


async def _put(request: rpc_pb2.PutRequest, ctx: CallContext) -> rpc_pb2.PutResponse:
    return _PUT_RESPONSE()


METHODS = [
    Method("/etcdserverpb.KV/Range", Kind.UNARY, rpc_pb2.RangeRequest, rpc_pb2.RangeResponse, _range),
    Method("/etcdserverpb.KV/Put", Kind.UNARY, rpc_pb2.PutRequest, rpc_pb2.PutResponse, _put),
]


async def serve(host: str, port: int) -> None:
    listener = ClientListener(METHODS)
    bound = await listener.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"trivial server ready on {host}:{bound}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await listener.close(grace=0.5)


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3:
        print(__doc__, file=sys.stderr)
        return 2
    port = int(argv[1])
    host = argv[2] if len(argv) == 3 else "127.0.0.1"
    uvloop.run(serve(host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
