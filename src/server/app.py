"""Assemble and run a coord-server: recover the node, start the writer, serve the client URLs."""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from .config import Config, listen_address
from .errors import Code
from .gateway import ClientHttpApp
from .node import Node, open_node
from .rpc import Kind, Method
from .services import cluster, election, kv, lease, lock, maintenance, watch
from .transport import ClientListener

log = logging.getLogger("coord_server")


def all_methods(node: Node) -> list[Method]:
    return [*kv.methods(node), *watch.methods(node), *maintenance.methods(node), *cluster.methods(node),
            *lease.methods(node), *lock.methods(node), *election.methods(node)]


@dataclass
class Server:
    """A running server: its node and the addresses it actually listens on."""

    node: Node
    listeners: list[ClientListener] = field(default_factory=list)
    addresses: list[tuple[str, int]] = field(default_factory=list)
    fatal: BaseException | None = None
    stopped: anyio.Event = field(default_factory=anyio.Event)


@asynccontextmanager
async def open_server(config: Config) -> AsyncIterator[Server]:
    """Recover the data directory and serve every ``--listen-client-urls`` address.

    On exit the listeners close, in-flight writes finish and the backend is closed.
    ``server.stopped`` is set when a backend failure stops the server by itself.
    Raises ConfigError / BackendError when the server cannot start.
    """
    holder: dict[str, Server] = {}

    def on_fatal(exc: BaseException) -> None:
        srv = holder.get("server")
        if srv is not None:
            srv.fatal = exc
            srv.stopped.set()

    node = open_node(config, on_fatal=on_fatal)
    server = holder["server"] = Server(node)

    def on_rpc_done(path: str, kind: Kind, code: Code) -> None:
        _, svc, name = path.split("/")
        node.counters.rpc_handled[(svc, name, code.name)] += 1

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(node.writer.run)
            node.background = tg
            tg.start_soon(watch.progress_notifier, node)
            await tg.start(lease.run_expiry, node)
            methods = all_methods(node)
            # One HTTP app for all client URLs: the JSON gateway over the same methods, /health, /metrics.
            http_app = ClientHttpApp(node, methods, on_rpc_done=on_rpc_done)
            for url in config.listen_client_urls:
                addr = listen_address(url)
                listener = ClientListener(methods, http_app, max_recv_bytes=config.max_recv_bytes(),
                                          on_rpc_done=on_rpc_done, http_max_body_bytes=None)
                server.listeners.append(listener)
                port = await listener.start(addr.host, addr.port)
                server.addresses.append((addr.host, port))
            # Gateway calls count too: a lone HTTP write must not skip group commit while 63 others wait.
            node.writer.concurrency = lambda: (sum(listener.open_streams() for listener in server.listeners)
                                               + http_app.gateway.in_flight)
            try:
                yield server
            finally:
                # Close listeners while the writer still runs, so in-flight writes can finish.
                with anyio.CancelScope(shield=True):
                    for listener in server.listeners:
                        await listener.close()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for listener in server.listeners:  # idempotent; covers a failed start
                await listener.close()
        node.writer.close()
        node.writer.wal.close()
        node.backend.close()


async def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or a backend failure (exit 1)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(config) as server:
            # The recovered history is long-lived: keep the collector from rescanning it, and
            # collect young objects less often (the Put p99 tail was mostly GC pauses).
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            where = ", ".join(f"{h}:{p}" for h, p in server.addresses)
            log.info("coord-server %s ready: serving client requests on %s (data dir %s, member %x)",
                     config.name, where, config.resolved_data_dir(), server.node.member_id)
            async with anyio.create_task_group() as tg:

                async def watch_signals() -> None:
                    async for signum in signals:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        break
                    tg.cancel_scope.cancel()

                async def watch_fatal() -> None:
                    await server.stopped.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_signals)
                tg.start_soon(watch_fatal)
    c = server.node.counters
    if c.commits:
        log.info("write path: %d jobs in %d log syncs (%d lone writes, largest batch %d)",
                 c.committed_jobs, c.commits, c.lone_writes, max(c.commit_batch_sizes))
    if server.fatal is not None:
        log.critical("stopped after a backend failure: %s", server.fatal)
        return 1
    log.info("coord-server stopped")
    return 0
