"""PROTOTYPE, not project code: how fast could a purpose-built Python HTTP/2 path serve gRPC unary calls?

kv_bench.py shows that coord-server spends most of its time in the RPC stack (grpclib + h2, see
docs/performance.md). This file answers "how much of that is inherent to Python?" with the least
HTTP/2 that h2load and etcdctl need for unary calls, on the same event loop (uvloop):

- frames parsed with ``struct`` straight from the receive buffer; request headers decoded with
  hpack's ``Decoder`` (needed: clients index headers in the dynamic table);
- replies built from precomputed HPACK bytes (``:status 200``, ``content-type:
  application/grpc``, trailers ``grpc-status: 0``): no encoder state, no per-stream state
  machine, no event objects;
- everything written while handling one ``data_received`` goes out in one ``transport.write``;
- a handler that cannot suspend (Range) runs eagerly, without a task; others get a task.

It deliberately leaves out what a real server needs: outbound flow control (replies are assumed
to fit the peer's window), CONTINUATION frames, stream limits and resets of running calls,
deadlines, metadata, message size limits, GOAWAY on close, the HTTP/1.1 sniffer, health. Use it
to measure, never to serve.

    python benchmarks/lean_h2_prototype.py PORT trivial          # empty replies (ceiling)
    python benchmarks/lean_h2_prototype.py PORT coord DATA_DIR   # coord's real KV service:
                                                                 # Node, Store, Writer, WAL fsync
"""

from __future__ import annotations

import asyncio
import signal
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from hpack import Decoder

from coord._pb import rpc_pb2

PREFACE_LEN = 24
_FRAME = struct.Struct(">HBBBI")  # 24-bit length as (hi16, lo8), type, flags, stream id
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
# HPACK: indexed ":status: 200" (static 8); "content-type" (static 31) literal without indexing.
REPLY_HEADERS = b"\x88" + b"\x0f\x10" + b"\x10application/grpc"
TRAILERS_OK = b"\x00\x0bgrpc-status\x010"

Handler = Callable[[Any, Any], Awaitable[Any]]


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


class Connection(asyncio.Protocol):
    def __init__(self, methods: dict[bytes, tuple[type[Any], Handler, bool]]) -> None:
        self.methods = methods
        self.buf = bytearray()
        self.preface = False
        self.decoder = Decoder()
        self.streams: dict[int, list[Any]] = {}
        self.out: list[bytes] = []
        self.unacked = 0
        self.flush_scheduled = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.out.append(frame(SETTINGS, 0, 0, b""))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        if not self.preface:
            if n < PREFACE_LEN:
                return
            pos, self.preface = PREFACE_LEN, True
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = _FRAME.unpack_from(buf, pos)
            length = (hi << 8) | lo
            if n - pos - 9 < length:
                break
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            sid &= 0x7FFFFFFF
            if ftype == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY:
                    payload = payload[5:]
                if not flags & END_HEADERS:  # CONTINUATION: out of scope
                    self.out.append(frame(GOAWAY, 0, 0, struct.pack(">II", sid, 0xD)))
                    continue
                path = None
                for name, value in self.decoder.decode(payload, raw=True):
                    if name == b":path":
                        path = value
                self.streams[sid] = [path, bytearray()]
                if flags & END_STREAM:
                    self.dispatch(sid)
            elif ftype == DATA:
                self.unacked += length
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                stream = self.streams.get(sid)
                if stream is not None:
                    stream[1] += payload
                    if flags & END_STREAM:
                        self.dispatch(sid)
            elif ftype == SETTINGS:
                if not flags & ACK:
                    self.out.append(frame(SETTINGS, ACK, 0, b""))
            elif ftype == PING:
                if not flags & ACK:
                    self.out.append(frame(PING, ACK, 0, payload))
            elif ftype == RST_STREAM:
                self.streams.pop(sid, None)
        del buf[:pos]
        if self.unacked > 16384:  # connection-level receive window (stream bodies here are tiny)
            self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        self.flush()

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def dispatch(self, sid: int) -> None:
        path, body = self.streams.pop(sid)
        method = self.methods.get(path)
        if method is None:
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid,
                                  REPLY_HEADERS + _literal(b"grpc-status", b"12")))
            return
        request_type, func, eager = method
        request = request_type.FromString(bytes(body[5:]))
        if not eager:
            asyncio.get_running_loop().create_task(self._run(func, request, sid))
            return
        coro = func(request, None)
        try:
            coro.send(None)
        except StopIteration as done:
            self.reply(sid, done.value)
        except Exception as exc:
            self.error(sid, exc)
        else:
            coro.close()
            raise RuntimeError(f"{path!r} suspended: not an eager handler")

    async def _run(self, func: Handler, request: Any, sid: int) -> None:
        try:
            self.reply(sid, await func(request, None))
        except Exception as exc:
            self.error(sid, exc)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def reply(self, sid: int, message: Any) -> None:
        data = message.SerializeToString()
        self.out.append(frame(HEADERS, END_HEADERS, sid, REPLY_HEADERS))
        self.out.append(frame(DATA, 0, sid, b"\x00" + len(data).to_bytes(4, "big") + data))
        self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, TRAILERS_OK))

    def error(self, sid: int, exc: Exception) -> None:
        code = str(int(getattr(exc, "code", 2))).encode()
        text = str(getattr(exc, "message", exc)).encode()[:120]
        self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, REPLY_HEADERS
                              + _literal(b"grpc-status", code) + _literal(b"grpc-message", text)))


async def serve(port: int, mode: str, data_dir: str | None) -> None:
    methods: dict[bytes, tuple[type[Any], Handler, bool]] = {}
    if mode == "trivial":
        async def range_(request: Any, ctx: Any) -> Any:
            return rpc_pb2.RangeResponse()

        async def put(request: Any, ctx: Any) -> Any:
            return rpc_pb2.PutResponse()

        methods[b"/etcdserverpb.KV/Range"] = (rpc_pb2.RangeRequest, range_, True)
        methods[b"/etcdserverpb.KV/Put"] = (rpc_pb2.PutRequest, put, True)
    elif mode == "coord" and data_dir:
        from coord_server.cli import config_from_args
        from coord_server.node import open_node
        from coord_server.services import kv

        url = f"http://127.0.0.1:{port}"
        config = config_from_args(["--name", "lean", "--data-dir", data_dir, "--listen-client-urls", url,
                                   "--advertise-client-urls", url])
        assert config is not None
        node = open_node(config, on_fatal=lambda exc: print(f"FATAL {exc}", file=sys.stderr, flush=True))
        writer_task = asyncio.get_running_loop().create_task(node.writer.run())
        for m in kv.methods(node):
            # Range never suspends (reads the durable in-memory state): run it eagerly.
            methods[m.path.encode()] = (m.request_type, m.func, m.path.endswith("/Range"))
    else:
        raise SystemExit(__doc__)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(methods), "127.0.0.1", port)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"lean prototype ({mode}) ready on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    if mode == "coord":
        writer_task.cancel()
        await asyncio.gather(writer_task, return_exceptions=True)
        node.writer.close()  # what coord_server.app does at shutdown
        node.writer.wal.close()
        node.backend.close()


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    uvloop.run(serve(int(argv[1]), argv[2], argv[3] if len(argv) > 3 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
