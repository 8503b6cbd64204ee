"""A leader-elected queue worker: exactly one replica consumes ``P/queue/``, the others stand by.

Keys under the prefix ``P`` (default ``worker``)::

    P/leader/<lease>     the election (``etcdctl elect -l P/leader`` shows the active worker)
    P/queue/<item>       work items, consumed in creation order

The active worker takes each item in order, does the work — delivers it to a fenced sink
(``--sink``, the protocol of examples/fenced_sink) with its fencing token, or just prints it — and then
deletes it in a txn guarded by ``term.is_leader()`` and the item's mod revision. A worker that lost office
can therefore never delete (acknowledge) an item, and a sink that checks the token refuses its writes: at
most one worker is ever effective, and an item whose worker died between delivering and acknowledging is
delivered again by the next one, with the same item key as idempotency key.

Hand-over: SIGTERM finishes the item in hand, resigns (deletes the leader key) and the next worker, which
waits on a watch of exactly that key, takes over within milliseconds. A crashed worker's key goes with its
lease, at most ``--ttl`` seconds later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import anyio.to_thread

import coord
from coord import Compare, Delete, SortOrder, SortTarget, WatchFilter

from ..common import Campaigner, Deposed, FleetKeys, default_id, emit
from ..fenced_sink import write as sink_write

BATCH = 100
RETRY_MAX = 2.0


class Keys(FleetKeys):
    @property
    def queue(self) -> str:
        return f"{self.prefix}/queue/"


@dataclass
class Config:
    prefix: str = "worker"
    worker_id: str = field(default_factory=default_id)
    ttl: int = 10
    sink: str | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix.rstrip("/"))


class Worker(Campaigner):
    """Campaigns; while active, consumes the queue. :meth:`stop` (SIGTERM): finish the item in hand, resign,
    exit; a second :meth:`stop` abandons the item in hand (the next worker delivers it again). Events: see
    :class:`~examples.common.Campaigner` (``standby``, ``active``, ...; ``processed=`` on ``resigned`` and
    ``stopped``) and ``processed``, ``changed``, ``sink-error``, ``resigning``."""

    role = "worker"
    waiting_event = "standby"
    elected_event = "active"

    def __init__(self, client: coord.Client, cfg: Config) -> None:
        super().__init__(client, election=cfg.keys.election, ttl=cfg.ttl, name=cfg.worker_id, value=cfg.worker_id)
        self.cfg = cfg
        self.keys = cfg.keys
        self._idle: anyio.CancelScope | None = None
        self.processed = 0

    def stop(self) -> None:
        super().stop()
        if self._idle is not None:
            self._idle.cancel()

    def summary(self) -> dict[str, object]:
        return {"processed": self.processed}

    async def lead(self, term: coord.Term) -> None:
        try:
            await self._work(term)
        finally:
            self._idle = None

    async def _work(self, term: coord.Term) -> None:
        queue = self.keys.queue
        while not self.stopping.is_set():
            res = await self.client.get_prefix(queue, limit=BATCH, sort_target=SortTarget.CREATE,
                                               sort_order=SortOrder.ASCEND)
            if not res.kvs:
                with anyio.CancelScope() as self._idle:
                    if self.stopping.is_set():
                        break
                    # wait for the next item: a watch from just after the (empty) read, so none is missed
                    async with self.client.watch(queue, prefix=True, start_revision=res.revision + 1,
                                                 filters=[WatchFilter.NO_DELETE]) as events:
                        await events.receive()
                self._idle = None
                continue
            for kv in res.kvs:
                if self.stopping.is_set():
                    break
                await self._handle(term, kv)
        # Nothing is in hand any more: from here on the next worker may safely start.
        emit("resigning", worker=self.cfg.worker_id, token=term.revision)

    async def _handle(self, term: coord.Term, kv: coord.KeyValue) -> None:
        item = kv.key.decode()[len(self.keys.queue):]
        token = term.revision
        outcome = "printed"
        if self.cfg.sink is not None:
            outcome = await self._deliver(item, kv.value.decode(errors="replace"), token)
            if outcome == "stale":
                raise Deposed(f"the sink refused token {token}: a newer worker has written")
            if outcome == "abandoned":
                return
        # Acknowledge: only the current leader, and only the version of the item we delivered.
        while True:
            try:
                res = await self.client.txn([term.is_leader(), Compare.mod_revision(kv.key) == kv.mod_revision],
                                            [Delete(kv.key)])
            except coord.OutcomeUnknown:
                await anyio.sleep(0.1)
                continue  # repeating is harmless: the compares fail once the delete landed
            break
        if not res.succeeded:
            leader_kv = await self.client.get(term.key)
            if leader_kv is None or leader_kv.create_revision != token:
                raise Deposed(f"no longer the leader (token {token})")
            if await self.client.get(kv.key) is not None:
                emit("changed", worker=self.cfg.worker_id, item=item)  # rewritten meanwhile: it comes again
                return
        self.processed += 1
        emit("processed", worker=self.cfg.worker_id, item=item, token=token, outcome=outcome,
             value=None if self.cfg.sink else kv.value.decode(errors="replace"))

    async def _deliver(self, item: str, value: str, token: int) -> str:
        """PUT the item to the sink; retries while the sink is unreachable. Returns the sink's verdict, or
        "abandoned" if the worker is stopping meanwhile."""
        assert self.cfg.sink is not None
        pause = 0.1
        while True:
            try:
                res = await anyio.to_thread.run_sync(
                    lambda: sink_write(self.cfg.sink or "", item, value, token, writer=self.cfg.worker_id))
                return res.outcome
            except OSError as exc:
                emit("sink-error", worker=self.cfg.worker_id, item=item, error=str(exc))
            if self.stopping.is_set():
                return "abandoned"
            await anyio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)


async def observe(client: coord.Client, keys: Keys) -> None:
    """Print the active worker now and at every change, until cancelled."""
    emit("observing", election=keys.election)
    async with client.election(keys.election).observe() as leaders:
        async for kv in leaders:
            emit("leader", worker=kv.value.decode(errors="replace"), token=kv.create_revision,
                 key=kv.key.decode(errors="replace"))
