"""A raw etcd Watch stream over grpcio's synchronous API, for tests against any server process.

Requests go in through a queue; a thread reads responses into another queue, so a test can
``recv()`` with a timeout and send at any time (a bidi stream, as clientv3 uses it).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg

MiB = 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]

_END = object()


class StreamEnded(Exception):
    """The server ended the stream (``error`` holds the status, if any)."""

    def __init__(self, error: grpc.RpcError | None) -> None:
        super().__init__(repr(error))
        self.error = error


class RawWatch:
    def __init__(self, target: str | grpc.Channel) -> None:
        self._own = isinstance(target, str)
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS) if isinstance(target, str) else target
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self._call = pbg.WatchStub(self.channel).Watch(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
        except grpc.RpcError as exc:
            self._responses.put(StreamEnded(exc))
            return
        self._responses.put(StreamEnded(None))

    # -- requests

    def send(self, req: pb.WatchRequest) -> None:
        self._requests.put(req)

    def create(self, key: bytes, range_end: bytes = b"", **kw: Any) -> None:
        self.send(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=range_end, **kw)))

    def cancel(self, watch_id: int) -> None:
        self.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch_id)))

    def progress(self) -> None:
        self.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    def half_close(self) -> None:
        self._requests.put(_END)

    # -- responses

    def recv(self, timeout: float = 10.0) -> pb.WatchResponse:
        """The next response; raises StreamEnded if the stream ended, queue.Empty on timeout."""
        item = self._responses.get(timeout=timeout)
        if isinstance(item, StreamEnded):
            self._responses.put(item)  # stays ended
            raise item
        resp: pb.WatchResponse = item
        return resp

    def poll(self) -> list[pb.WatchResponse]:
        """Every response already received, without waiting (raises StreamEnded after the last one)."""
        out = []
        while True:
            try:
                item = self._responses.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, StreamEnded):
                self._responses.put(item)
                if out:
                    return out
                raise item
            out.append(item)

    def recv_until(self, pred: Any, timeout: float = 10.0) -> list[pb.WatchResponse]:
        """Responses up to and including the first one for which ``pred(resp)`` holds."""
        out = []
        while True:
            resp = self.recv(timeout)
            out.append(resp)
            if pred(resp):
                return out

    def until_end(self, timeout: float = 10.0) -> list[pb.WatchResponse]:
        """Every response up to the end of the stream."""
        out = []
        while True:
            item = self._responses.get(timeout=timeout)
            if isinstance(item, StreamEnded):
                self._responses.put(item)
                return out
            out.append(item)

    def ended(self, timeout: float = 10.0) -> StreamEnded:
        """Wait for the end of the stream (every response before it is discarded)."""
        while True:
            item = self._responses.get(timeout=timeout)
            if isinstance(item, StreamEnded):
                return item

    def close(self) -> None:
        self._call.cancel()
        self._requests.put(_END)
        self._reader.join(timeout=10)
        if self._own:
            self.channel.close()

    def __enter__(self) -> RawWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
