"""The transport: the only module of coord that imports grpc or trio_asyncio.

Everything above it is anyio code that calls :meth:`Transport.unary` and :meth:`Transport.open_stream`.

Event loops. grpc.aio needs an asyncio loop. On asyncio (and uvloop) the transport awaits grpc.aio
directly in the caller's loop. Under Trio it opens its own trio-asyncio loop for the lifetime of the
client, and every grpc object is created and awaited inside that loop. Each callback that loop runs costs
a round of the Trio scheduler, so the hot paths keep them few: a unary call is started by one callback and
driven by done-callbacks straight back to the waiting Trio task (no wrapper task), and the shared watch
stream (:class:`PushStream`) reads and writes in two tasks of that loop, handing replies to a plain
function as they arrive, with no crossing per message. Either way, channels are closed (shielded, bounded)
and late completions of cancelled calls are given a moment to land *before* the loop that owns them goes
away (grpc's poller thread would otherwise hand them to a closed loop, which breaks the next loop that runs).

Deadlines. No call takes a timeout argument: the caller's effective anyio deadline (``fail_after`` /
``move_on_after``) is sent to the server as the gRPC timeout, and when gRPC reports DEADLINE_EXCEEDED the
transport waits for the caller's own scope to fire, so the caller sees its usual ``TimeoutError`` (or just
moves on), never a gRPC error.

Failover and retries. The endpoints are tried in turn. An endpoint whose connection fails is put aside
for a short exponential backoff (50 ms doubling to 2 s, with jitter; a success resets it) — never for
minutes — and another one is used (the rules are in ``_endpoints.py``). A call is repeated on another
endpoint only when that cannot apply a write twice: reads and other idempotent calls always; writes only
when the request certainly did not reach a server (no connection, or the server refused it before
applying: "no leader", an expired auth token). A write that was sent and whose answer was lost raises
:class:`OutcomeUnknown`. Idempotent calls keep retrying within the caller's deadline, and at most
``retry_window`` seconds without one, then raise :class:`Unavailable`.

Errors. :func:`map_error` turns a gRPC status into the CoordError hierarchy; the original gRPC error is
the ``__cause__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import grpc  # type: ignore[import-untyped]
import sniffio

from . import _errors as errors
from ._endpoints import EndpointRotation

T = TypeVar("T")

CONNECT_TIMEOUT = 3.0  # one attempt to reach an endpoint (a SIGSTOPped server accepts TCP but never answers)
CLOSE_BOUND = 2.0  # shielded cleanup (channel close, stream cancel) never takes longer than this
SETTLE_SECONDS = 0.05  # let grpc's poller deliver completions of cancelled calls before the loop goes away

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", -1),  # etcd watch responses can exceed 4 MiB
    ("grpc.max_send_message_length", -1),
    # grpc's own reconnect backoff defaults to 1 s growing to 120 s: far too slow to notice a restarted member.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Detect a dead peer on an idle connection (etcd's server allows pings every 5 s at most).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # retries are decided here, where idempotence is known
)

# Server answers that prove a request was refused before it could be applied (safe to send elsewhere).
_NOT_APPLIED = (
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: rpc not supported for learner",
    "etcdserver: too many requests",
)
# Transport failures that prove the request never left this process.
_NOT_SENT = ("failed to connect", "connection refused", "connections to all backends failing", "dns resolution")


def parse_endpoint(endpoint: str) -> str:
    """``host:port`` from ``host:port`` or ``http://host:port``. Raises ValueError for https/unix."""
    ep = endpoint.strip()
    if ep.startswith("http://"):
        ep = ep[len("http://") :]
    elif "://" in ep:
        raise ValueError(f"unsupported endpoint scheme (only plain http/gRPC is supported): {endpoint!r}")
    ep = ep.rstrip("/")
    if not ep or ":" not in ep:
        raise ValueError(f"endpoint must be host:port, got {endpoint!r}")
    return ep


# ---------------------------------------------------------------------------------------------- errors


def _code_name(exc: Any) -> str:
    try:
        return str(exc.code().name)
    except Exception:
        return "UNKNOWN"


def _details(exc: Any) -> str:
    try:
        return str(exc.details() or "")
    except Exception:
        return str(exc)


def map_error(code: str, details: str, *, write: bool = False) -> errors.CoordError:
    """The CoordError for a gRPC status ``code`` (name) and ``details`` text.

    ``write`` marks a request that may have been applied: an UNAVAILABLE answer then becomes
    :class:`OutcomeUnknown` unless the text proves the server refused it before applying.
    """
    low = details.lower()
    kw: dict[str, Any] = {"code": code, "details": details}
    if "required revision has been compacted" in low:
        return errors.Compacted(details, **kw)
    if "required revision is a future revision" in low:
        return errors.FutureRevision(details, **kw)
    if "requested lease not found" in low or (code == "NOT_FOUND" and "lease" in low):
        return errors.LeaseNotFound(details, **kw)
    if code == "PERMISSION_DENIED" or "permission denied" in low:
        return errors.PermissionDenied(details, **kw)
    if code == "UNAUTHENTICATED" or "authentication failed" in low or "user name is empty" in low:
        return errors.AuthenticationFailed(details, **kw)
    if code == "RESOURCE_EXHAUSTED":
        return errors.NoSpace(details, **kw)
    if code == "UNAVAILABLE":
        if write and not any(s in details for s in _NOT_APPLIED) and not _not_sent(details):
            return errors.OutcomeUnknown(f"write outcome unknown: {details}", **kw)
        return errors.Unavailable(details or "unavailable", **kw)
    if code in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION"):
        return errors.InvalidRequest(details, **kw)
    return errors.ServerError(f"{code}: {details}", **kw)


def _not_sent(details: str) -> bool:
    low = details.lower()
    return any(s in low for s in _NOT_SENT)


# Server answers that mean "this member could not serve it right now" (raft leader lost or changing): the
# request may have been proposed, so a write's outcome is unknown, but a read can go elsewhere.
_MEMBER_TROUBLE = ("context deadline exceeded", "etcdserver: request timed out", "etcdserver: leader changed")


def _is_transport_failure(code: str, details: str = "") -> bool:
    # CANCELLED without our doing: the connection went away under the call.
    if code in ("UNAVAILABLE", "CANCELLED"):
        return True
    return code in ("UNKNOWN", "DEADLINE_EXCEEDED") and any(s in details for s in _MEMBER_TROUBLE)


class _Unreachable(Exception):
    """An endpoint could not be connected to (nothing was sent)."""


# ---------------------------------------------------------------------------------------------- loops


class _Runner:
    """Runs an asyncio coroutine function from the current anyio task: directly on asyncio, through
    ``aio_as_trio`` into the transport's own loop under Trio."""

    def __init__(self, loop: Any = None) -> None:
        self._loop = loop
        if loop is not None:
            import trio

            # The clock and deadline of the caller's event loop, without anyio's per-call backend lookup.
            self.current_time: Callable[[], float] = trio.current_time
            self.current_effective_deadline: Callable[[], float] = trio.current_effective_deadline
        else:
            self.current_time = anyio.current_time
            self.current_effective_deadline = anyio.current_effective_deadline

    async def __call__(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._loop is None:
            try:
                return await fn(*args)
            except asyncio.CancelledError as exc:
                # grpc.aio answers the cancellation of a call it awaits with a CancelledError of its own
                # (no anyio marker): let the caller's cancel scope deliver one it recognises.
                await anyio.lowlevel.checkpoint()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # a native asyncio cancellation (not an anyio scope): pass it on
                raise errors.Unavailable("the gRPC call was cancelled by the transport") from exc
        # The loop's own entry point (what aio_as_trio wraps): one asyncio task, no wrapper objects.
        result: T = await self._loop.run_aio_coroutine(fn(*args))
        return result

    async def unary(
        self,
        fn: Any,
        request: Any,
        grpc_timeout: float | None,
        metadata: Any,
        on_response: Callable[[Any], None] | None = None,
    ) -> Any:
        """Make one grpc.aio unary call and return its response (raises grpc.aio.AioRpcError).

        Under Trio the call is made without a wrapper task: a callback of the transport's loop creates it and
        steps its awaitable from done-callbacks, and the result goes straight back to the waiting Trio task.
        Every handle of the trio-asyncio loop costs a round of the Trio scheduler, so this halves both the CPU
        and the latency that the crossing adds to each call. ``on_response`` (a plain function, same rules as a
        push stream's ``on_message``) sees the response as soon as it arrived, before the caller is resumed.
        """
        if self._loop is None:
            resp = await self(_unary_call, fn, request, grpc_timeout, metadata)
            if on_response is not None:
                _tell(on_response, resp)
            return resp
        import trio

        st = _TrioCall(trio.lowlevel.current_task())
        st.on_response = on_response
        loop = self._loop
        loop.call_soon(_start_call, st, fn, request, grpc_timeout, metadata)

        def abort(raise_cancel: Any) -> Any:
            st.raise_cancel = raise_cancel
            loop.call_soon(_cancel_trio_call, st)
            return trio.lowlevel.Abort.FAILED  # the call's end reschedules us

        try:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        except asyncio.CancelledError:
            if st.raise_cancel is not None:
                st.raise_cancel()  # raises trio.Cancelled: the call ended because we were cancelled
            raise errors.Unavailable("the gRPC call was cancelled by the transport") from None

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run the plain function ``fn`` in the asyncio loop that owns the grpc objects, without waiting:
        directly on asyncio, as a callback of the transport's loop under Trio (no crossing, no task)."""
        if self._loop is None:
            fn(*args)
        else:
            self._loop.call_soon(fn, *args)


class _TrioCall:
    """A unary call made for a Trio task (see :meth:`_Runner.unary`); its fields live in the asyncio loop."""

    __slots__ = ("call", "done", "gen", "on_response", "raise_cancel", "task")

    def __init__(self, task: Any) -> None:
        self.task = task
        self.call: Any = None
        self.gen: Any = None
        self.raise_cancel: Any = None
        self.on_response: Callable[[Any], None] | None = None
        self.done = False


def _tell(on_response: Callable[[Any], None], resp: Any) -> None:
    try:
        on_response(resp)
    except Exception:  # a bug there must not turn a successful call into a failed one
        logging.getLogger("coord").exception("coord: response callback failed")


def _finish_trio_call(st: _TrioCall, result: Any) -> None:
    if not st.done:
        import trio

        st.done = True
        trio.lowlevel.reschedule(st.task, result)


def _step_trio_call(st: _TrioCall, _future: Any = None) -> None:
    """Advance the call's awaitable (as an asyncio task would) until it waits on a future or ends."""
    import outcome

    try:
        future = st.gen.send(None)
    except StopIteration as stop:
        if st.on_response is not None and not st.done:
            _tell(st.on_response, stop.value)
        _finish_trio_call(st, outcome.Value(stop.value))
        return
    except BaseException as exc:  # the call's error, or CancelledError after a cancel
        _finish_trio_call(st, outcome.Error(exc))
        return
    future.add_done_callback(functools.partial(_step_trio_call, st))


def _start_call(st: _TrioCall, fn: Any, request: Any, grpc_timeout: float | None, metadata: Any) -> None:
    import outcome

    try:
        st.call = fn(request, timeout=grpc_timeout, metadata=metadata)
        st.gen = st.call.__await__()
    except BaseException as exc:
        _finish_trio_call(st, outcome.Error(exc))
        return
    _step_trio_call(st)


def _cancel_trio_call(st: _TrioCall) -> None:
    if st.call is not None:
        st.call.cancel()


class _SharedLoop:
    """One trio-asyncio loop per Trio run, shared by every client of that run.

    grpc.aio registers its completion-queue file descriptor with the asyncio loop it first runs on; two
    trio-asyncio loops alive at once in one Trio run would both wait on that fd (Trio refuses that). So
    the loop lives in a Trio system task that the first client starts and the last one stops.
    """

    def __init__(self) -> None:
        self.loop: Any = None
        self.users = 0
        self.ready = anyio.Event()
        self.stop = anyio.Event()
        self.done = anyio.Event()
        self.error: BaseException | None = None

    async def host(self) -> None:
        import trio_asyncio  # type: ignore[import-untyped]

        try:
            async with trio_asyncio.open_loop() as loop:
                self.loop = loop
                self.ready.set()
                await self.stop.wait()
        except BaseException as exc:  # never crash the Trio run from a system task
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()


_shared_loops: dict[Any, _SharedLoop] = {}


@contextlib.asynccontextmanager
async def _open_runner() -> AsyncIterator[_Runner]:
    if sniffio.current_async_library() != "trio":
        yield _Runner()
        return
    import trio

    token = trio.lowlevel.current_trio_token()
    shared = _shared_loops.get(token)
    if shared is None or shared.stop.is_set():
        shared = _SharedLoop()
        _shared_loops[token] = shared
        trio.lowlevel.spawn_system_task(shared.host)
    shared.users += 1
    try:
        await shared.ready.wait()
        if shared.loop is None:
            raise errors.CoordError(f"could not start the trio-asyncio loop: {shared.error!r}") from shared.error
        yield _Runner(shared.loop)
    finally:
        shared.users -= 1
        if shared.users == 0:
            shared.stop.set()
            if _shared_loops.get(token) is shared:
                del _shared_loops[token]
            with anyio.CancelScope(shield=True):
                await shared.done.wait()


# ---------------------------------------------------------------------------------------------- endpoints


@dataclass
class _Endpoint:
    target: str
    index: int  # in the EndpointRotation
    channel: Any = None
    stubs: dict[str, Any] = field(default_factory=dict)


async def _make_channel(target: str) -> Any:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def _unary_call(fn: Any, request: Any, grpc_timeout: float | None, metadata: Any) -> Any:
    return await fn(request, timeout=grpc_timeout, metadata=metadata)


async def _open_call(fn: Any, metadata: Any) -> Any:
    return fn(metadata=metadata)


async def _cancel_call(call: Any) -> None:
    call.cancel()


async def _close_channels(channels: list[Any]) -> None:
    for ch in channels:
        with contextlib.suppress(Exception):
            await ch.close()
    await asyncio.sleep(SETTLE_SECONDS)


async def _wait_state_change(channel: Any, state: Any) -> None:
    await channel.wait_for_state_change(state)


@dataclass(frozen=True)
class Method:
    """A gRPC method: full path and the message classes of request and response."""

    path: str
    request: Any
    response: Any
    stream: bool = False


class Transport:
    """Channels to the endpoints, retries, failover and error mapping. Made by :func:`open_transport`."""

    def __init__(
        self,
        runner: _Runner,
        endpoints: Sequence[str],
        *,
        user: str | None,
        password: str | None,
        retry_window: float,
        connect_timeout: float,
    ) -> None:
        self._run = runner
        self._endpoints = [_Endpoint(parse_endpoint(e), i) for i, e in enumerate(endpoints)]
        self._random = random.Random()
        self._rotation = EndpointRotation(len(self._endpoints), jitter=self._random.random)
        self._user = user
        self._password = password
        self._token: str | None = None
        self._auth_lock = anyio.Lock()
        self._auth_generation = 0
        self._md_cache: tuple[str | None, tuple[tuple[str, str], ...]] = (None, ())
        self.retry_window = retry_window
        self.connect_timeout = connect_timeout
        self.closed = False

    # -- endpoints ----------------------------------------------------------------------------
    @property
    def current_endpoint(self) -> str:
        """The endpoint (host:port) calls currently go to."""
        return self._endpoints[self._rotation.current].target

    @property
    def endpoints(self) -> list[str]:
        return [e.target for e in self._endpoints]

    def _mark_failed(self, ep: _Endpoint) -> None:
        self._rotation.failed(ep.index, anyio.current_time())

    def report_failure(self, target: str) -> None:
        """Put the endpoint ``target`` aside (backoff) and move on to another one: used when a stream to it
        went silent although its connection looks healthy (a frozen or partitioned member)."""
        for ep in self._endpoints:
            if ep.target == target:
                self._mark_failed(ep)

    def _mark_ok(self, ep: _Endpoint) -> None:
        self._rotation.ok(ep.index)

    async def _choose(self) -> _Endpoint:
        """The endpoint to use next; sleeps (a checkpoint) while every endpoint is backing off."""
        if self.closed:
            raise errors.ClientClosed("the client is closed")
        index, wait = self._rotation.choose(anyio.current_time())
        if wait > 0:
            await anyio.sleep(wait)
        return self._endpoints[index]

    async def _connected(self, ep: _Endpoint, budget: float = math.inf) -> Any:
        """The endpoint's channel once it is READY, waiting at most ``connect_timeout`` (and ``budget``).
        Raises _Unreachable (endpoint marked failed)."""
        if ep.channel is None:
            ep.channel = await self._run(_make_channel, ep.target)
        ch = ep.channel
        state = ch.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return ch
        seen_attempt = state != grpc.ChannelConnectivity.TRANSIENT_FAILURE
        with anyio.move_on_after(max(0.0, min(self.connect_timeout, budget))):
            while True:
                if state == grpc.ChannelConnectivity.READY:
                    return ch
                if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and seen_attempt:
                    break  # a connection attempt failed: try another endpoint rather than wait for grpc
                if state == grpc.ChannelConnectivity.SHUTDOWN:
                    break
                await self._run(_wait_state_change, ch, state)
                state = ch.get_state(try_to_connect=True)
                seen_attempt = seen_attempt or state == grpc.ChannelConnectivity.CONNECTING
        self._mark_failed(ep)
        raise _Unreachable(f"cannot connect to {ep.target} ({state.name})")

    def _stub(self, ep: _Endpoint, method: Method) -> Any:
        fn = ep.stubs.get(method.path)
        if fn is None:
            make = ep.channel.stream_stream if method.stream else ep.channel.unary_unary
            fn = make(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            ep.stubs[method.path] = fn
        return fn

    def _metadata(self, extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
        if not extra:
            cached = self._md_cache
            if cached[0] == self._token:
                return cached[1]
        md = tuple(extra)
        if self._token is not None:
            md += (("token", self._token),)
        if not extra:
            self._md_cache = (self._token, md)
        return md

    # -- auth ---------------------------------------------------------------------------------
    async def authenticate(self) -> None:
        """Get a fresh token for the configured user (no-op without credentials). A checkpoint.

        Raises AuthenticationFailed for a wrong user/password; if the server has auth disabled, calls go
        on without a token.
        """
        if self._user is None:
            return
        generation = self._auth_generation
        async with self._auth_lock:
            if generation != self._auth_generation:
                return  # another task renewed it meanwhile
            self._token = None
            req = _AUTHENTICATE.request(name=self._user, password=self._password or "")
            try:
                resp = await self.unary(_AUTHENTICATE, req, idempotent=True, _auth=False)
            except errors.InvalidRequest as exc:
                if "authentication is not enabled" in exc.details:
                    self._auth_generation += 1
                    return
                raise
            except errors.AuthenticationFailed:
                raise
            self._token = resp.token or None
            self._auth_generation += 1

    def _token_rejected(self, code: str, details: str) -> bool:
        return self._user is not None and code == "UNAUTHENTICATED" and "invalid auth token" in details

    # -- unary --------------------------------------------------------------------------------
    async def unary(
        self,
        method: Method,
        request: Any,
        *,
        idempotent: bool,
        on_response: Callable[[Any], None] | None = None,
        _auth: bool = True,
    ) -> Any:
        """Send one unary request and return the response message. A checkpoint.

        ``idempotent`` allows a repeat after an answer was lost. Raises a CoordError subclass
        (:class:`OutcomeUnknown` for a non-idempotent request whose answer was lost, :class:`Unavailable`
        when no endpoint served it in time, or the mapped server error); cancellation as usual.
        ``on_response``: see :meth:`_Runner.unary`.
        """
        clock = self._run.current_time
        started = clock()
        reauthed = False
        last: BaseException | None = None
        while True:
            if last is not None and clock() - started > self.retry_window:
                raise errors.Unavailable(
                    f"no endpoint answered within {self.retry_window:g}s (tried {', '.join(self.endpoints)}): {last}"
                ) from last
            ep = self._endpoints[self._rotation.current]
            if not self._rotation.healthy() or self.closed:
                ep = await self._choose()
            ch = ep.channel
            if ch is None or ch.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
                try:
                    await self._connected(ep, self.retry_window - (clock() - started))
                except _Unreachable as exc:
                    last = exc
                    continue
            deadline = self._run.current_effective_deadline()
            timeout = None if math.isinf(deadline) else max(deadline - clock(), 0.001)
            fn = self._stub(ep, method)
            try:
                resp = await self._run.unary(fn, request, timeout, self._metadata(), on_response)
            except grpc.aio.AioRpcError as exc:
                code, details = _code_name(exc), _details(exc)
                if code == "DEADLINE_EXCEEDED" and not math.isinf(deadline):
                    await _wait_for_deadline(deadline)
                    raise map_error(code, details) from exc
                if _auth and not reauthed and self._token_rejected(code, details):
                    reauthed = True  # a rejected token means the request was not applied
                    await self.authenticate()
                    continue
                if _is_transport_failure(code, details):
                    self._mark_failed(ep)
                    safe = idempotent or _not_sent(details) or any(s in details for s in _NOT_APPLIED)
                    if safe:
                        last = exc
                        continue
                    raise errors.OutcomeUnknown(
                        f"write outcome unknown: {code} {details}", code=code, details=details
                    ) from exc
                raise map_error(code, details, write=not idempotent) from exc
            self._mark_ok(ep)
            return resp

    # -- streams ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def open_stream(
        self, method: Method, *, metadata: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[BidiStream]:
        """A bidirectional stream on the current endpoint, cancelled when the block exits.

        Raises Unavailable when no endpoint can be connected to within the retry window. Use it from one
        task at a time per direction.
        """
        ep = await self._stream_endpoint()
        fn = self._stub(ep, method)
        call = await self._run(_open_call, fn, self._metadata(metadata))
        stream = BidiStream(self, call, ep)
        try:
            yield stream
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_BOUND):
                await self._run(_cancel_call, call)

    async def _stream_endpoint(self) -> _Endpoint:
        started = anyio.current_time()
        while True:
            ep = await self._choose()
            try:
                await self._connected(ep, self.retry_window - (anyio.current_time() - started))
                return ep
            except _Unreachable as exc:
                if anyio.current_time() - started > self.retry_window:
                    raise errors.Unavailable(str(exc)) from exc

    @contextlib.asynccontextmanager
    async def open_push_stream(
        self,
        method: Method,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        on_message: Callable[[Any], None] | None = None,
    ) -> AsyncIterator[PushStream]:
        """A bidirectional stream on the current endpoint whose I/O runs inside the asyncio loop: requests are
        queued with :meth:`PushStream.send_nowait`; replies are handed to ``on_message`` as they arrive, or
        collected and handed over in batches by :meth:`PushStream.receive_many`. No loop crossing and no task
        per message, which is what a stream shared by many watchers needs. Cancelled when the block exits.

        ``on_message`` runs in the asyncio loop's context (under Trio: inside the transport's trio-asyncio
        loop), so it must be a plain function that only does non-blocking work: set events, send to memory
        streams without waiting, cancel scopes — never create anyio objects or start tasks. If it raises, the
        stream ends with that exception (raised by :meth:`PushStream.receive_many`).

        Raises Unavailable when no endpoint can be connected to within the retry window.
        """
        ep = await self._stream_endpoint()
        fn = self._stub(ep, method)
        call = await self._run(_open_call, fn, self._metadata(metadata))
        stream = PushStream(self, call, ep, on_message)
        try:
            await self._run(stream._start)
            yield stream
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_BOUND):
                await self._run(stream._stop)

    # -- shutdown -----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close every channel (shielded, bounded) and let late completions land."""
        self.closed = True
        channels = [ep.channel for ep in self._endpoints if ep.channel is not None]
        for ep in self._endpoints:
            ep.channel = None
            ep.stubs.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_BOUND):
            await self._run(_close_channels, channels)


def _stream_error(transport: Transport, ep: _Endpoint, exc: Any) -> errors.CoordError:
    """The CoordError for the gRPC error that ended a stream (a broken connection is Unavailable and puts the
    endpoint aside; a rejected token is AuthenticationFailed)."""
    code, details = _code_name(exc), _details(exc)
    if _is_transport_failure(code, details):
        transport._mark_failed(ep)
        return errors.Unavailable(f"stream to {ep.target} broke: {code} {details}", code=code, details=details)
    if transport._token_rejected(code, details):
        return errors.AuthenticationFailed(details, code=code, details=details)
    return map_error(code, details)


class BidiStream:
    """One open gRPC bidi stream. ``send`` and ``receive`` are checkpoints; errors are CoordErrors
    (a broken connection is :class:`Unavailable`), the end of the stream is ``anyio.EndOfStream``."""

    def __init__(self, transport: Transport, call: Any, ep: _Endpoint) -> None:
        self._transport = transport
        self._call = call
        self._ep = ep

    @property
    def endpoint(self) -> str:
        return self._ep.target

    def _fail(self, exc: Any) -> errors.CoordError:
        return _stream_error(self._transport, self._ep, exc)

    async def send(self, message: Any) -> None:
        try:
            await self._transport._run(self._call.write, message)
        except grpc.aio.AioRpcError as exc:
            raise self._fail(exc) from exc
        except asyncio.InvalidStateError as exc:  # the call already finished
            raise errors.Unavailable(f"stream to {self._ep.target} is closed") from exc

    async def receive(self) -> Any:
        try:
            msg = await self._transport._run(self._call.read)
        except grpc.aio.AioRpcError as exc:
            raise self._fail(exc) from exc
        if msg is grpc.aio.EOF:
            raise anyio.EndOfStream
        self._transport._mark_ok(self._ep)
        return msg


class PushStream:
    """One open gRPC bidi stream whose reading and writing run as two tasks of the asyncio loop that owns the
    call (made by :meth:`Transport.open_push_stream`).

    Replies are queued as they arrive and handed out in batches by :meth:`receive_many` (a checkpoint); requests
    are queued by :meth:`send_nowait` and written in order. So a busy stream costs no event-loop crossing per
    message under Trio, and no task switch per message on asyncio. Errors are CoordErrors (a broken connection
    is :class:`Unavailable`), the end of the stream is ``anyio.EndOfStream``; both come after every reply that
    arrived before them.
    """

    def __init__(
        self, transport: Transport, call: Any, ep: _Endpoint, on_message: Callable[[Any], None] | None = None
    ) -> None:
        self._transport = transport
        self._call = call
        self._ep = ep
        self._on_message = on_message
        self._inbox: deque[Any] = deque()
        self._ready = anyio.Event()  # set (from the asyncio side) when the inbox gets a reply or the stream ends
        self._end: BaseException | None = None  # the gRPC error that ended it, or _EOF
        self._outbox: deque[Any] = deque()
        self._writer_idle = False
        self._wake_scheduled = False
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.received = 0
        """Replies received so far."""

    @property
    def endpoint(self) -> str:
        return self._ep.target

    # -- the anyio side ---------------------------------------------------------------------------
    def send_nowait(self, message: Any) -> None:
        """Queue ``message`` to be written after those queued before it. Never blocks; if the stream breaks,
        :meth:`receive_many` reports it."""
        self._outbox.append(message)
        if self._writer_idle and not self._wake_scheduled:
            self._wake_scheduled = True
            self._transport._run.call_soon(self._wake_writer)

    def poke(self) -> None:
        """Wake the task waiting in :meth:`receive_many` (it returns what arrived, possibly nothing)."""
        self._ready.set()

    async def receive_many(self) -> list[Any]:
        """Every reply that arrived since the last call and was not handed to ``on_message``; waits (a
        checkpoint) until there is one, or until :meth:`poke` (then the list may be empty).

        Raises the stream's end once every reply before it was handed out: ``anyio.EndOfStream`` when the
        server ended the stream, a CoordError when it broke, or what ``on_message`` raised."""
        if not self._inbox:
            if self._end is None:
                self._ready = anyio.Event()
                await self._ready.wait()
            if not self._inbox and self._end is not None:
                end = self._end
                if end is _EOF:
                    raise anyio.EndOfStream
                if isinstance(end, asyncio.InvalidStateError):
                    raise errors.Unavailable(f"stream to {self._ep.target} is closed") from end
                if isinstance(end, grpc.aio.AioRpcError):
                    raise _stream_error(self._transport, self._ep, end) from end
                raise end
        else:
            await anyio.lowlevel.checkpoint()
        out = list(self._inbox)
        self._inbox.clear()
        return out

    # -- the asyncio side (run in the loop that owns the call) ------------------------------------
    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._write_loop())]

    async def _stop(self) -> None:
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _finish(self, end: BaseException) -> None:
        if self._end is None:
            self._end = end
        self._ready.set()

    async def _read_loop(self) -> None:
        ok = False
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    self._finish(_EOF)
                    return
                self.received += 1
                if not ok:
                    ok = True
                    self._transport._mark_ok(self._ep)
                if self._on_message is not None:
                    self._on_message(msg)
                else:
                    self._inbox.append(msg)
                    self._ready.set()
        except asyncio.CancelledError:
            self._finish(_EOF if self._end is None else self._end)
            raise
        except Exception as exc:  # grpc.aio.AioRpcError, a call that already finished, or on_message's
            self._finish(exc)
            self._call.cancel()

    def _wake_writer(self) -> None:
        self._wake_scheduled = False
        if self._wake is not None:
            self._wake.set()

    async def _write_loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                if not self._outbox:
                    self._wake.clear()
                    self._writer_idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._writer_idle = False
                    continue
                await self._call.write(self._outbox.popleft())
        except Exception:  # the call broke or finished: its reader reports why (cancel makes sure it ends)
            self._call.cancel()


class _EndOfStream(Exception):
    """Marks a stream the server ended normally."""


_EOF = _EndOfStream()


async def _wait_for_deadline(deadline: float) -> None:
    """gRPC gave up at the deadline we sent; let the caller's own scope fire so it sees its usual
    TimeoutError/move-on (the clocks differ by microseconds)."""
    with anyio.move_on_after(0.5):
        await anyio.sleep(max(0.0, deadline - anyio.current_time()) + 0.001)
        await anyio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def open_transport(
    endpoints: Sequence[str],
    *,
    user: str | None = None,
    password: str | None = None,
    retry_window: float = 30.0,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[Transport]:
    """A :class:`Transport` for the current event loop; closed (shielded, bounded) on exit."""
    async with _open_runner() as runner:
        transport = Transport(
            runner,
            endpoints,
            user=user,
            password=password,
            retry_window=retry_window,
            connect_timeout=connect_timeout,
        )
        try:
            if user is not None:
                await transport.authenticate()
            yield transport
        finally:
            await transport.aclose()


# ---------------------------------------------------------------------------------------------- methods


def _methods() -> dict[str, Method]:
    from ._pb import rpc_pb2 as r

    return {
        "Range": Method("/etcdserverpb.KV/Range", r.RangeRequest, r.RangeResponse),
        "Put": Method("/etcdserverpb.KV/Put", r.PutRequest, r.PutResponse),
        "DeleteRange": Method("/etcdserverpb.KV/DeleteRange", r.DeleteRangeRequest, r.DeleteRangeResponse),
        "Txn": Method("/etcdserverpb.KV/Txn", r.TxnRequest, r.TxnResponse),
        "Compact": Method("/etcdserverpb.KV/Compact", r.CompactionRequest, r.CompactionResponse),
        "Watch": Method("/etcdserverpb.Watch/Watch", r.WatchRequest, r.WatchResponse, stream=True),
        "LeaseGrant": Method("/etcdserverpb.Lease/LeaseGrant", r.LeaseGrantRequest, r.LeaseGrantResponse),
        "LeaseRevoke": Method("/etcdserverpb.Lease/LeaseRevoke", r.LeaseRevokeRequest, r.LeaseRevokeResponse),
        "LeaseKeepAlive": Method(
            "/etcdserverpb.Lease/LeaseKeepAlive", r.LeaseKeepAliveRequest, r.LeaseKeepAliveResponse, stream=True
        ),
        "LeaseTimeToLive": Method(
            "/etcdserverpb.Lease/LeaseTimeToLive", r.LeaseTimeToLiveRequest, r.LeaseTimeToLiveResponse
        ),
        "LeaseLeases": Method("/etcdserverpb.Lease/LeaseLeases", r.LeaseLeasesRequest, r.LeaseLeasesResponse),
        "Status": Method("/etcdserverpb.Maintenance/Status", r.StatusRequest, r.StatusResponse),
        "MemberList": Method("/etcdserverpb.Cluster/MemberList", r.MemberListRequest, r.MemberListResponse),
        "Authenticate": Method("/etcdserverpb.Auth/Authenticate", r.AuthenticateRequest, r.AuthenticateResponse),
    }


METHODS = _methods()
_AUTHENTICATE = METHODS["Authenticate"]
