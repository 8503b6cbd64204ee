"""The leader-elected worker example as processes, against coord-server and a real etcd 3.4.

Three workers — on trio, asyncio and uvloop — share a queue fed continuously by ``enqueue`` (from a pipe); an
``observe`` process follows the election. The active worker is SIGTERMed (graceful hand-over: it finishes the
item in hand and resigns; the next one takes over in milliseconds), then the next active one is SIGKILLed
(hand-over when its lease expires, within the TTL). Every item is delivered to a fenced sink process.

Judged by counts: the sink refused 0 stale writes (no deposed worker ever acted), every item was applied exactly
once, the active periods never overlapped, the observer saw every leader in order. Hand-over latencies are
printed, and bounded only loosely (SIGTERM: far below the TTL; crash: within the TTL plus slack).
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from typing import Any

from example_kit import ExampleProcess, Fleet, sink_stats
from helpers import ServerProcess

TTL = 4


def active(workers: dict[str, ExampleProcess]) -> tuple[ExampleProcess, int, float] | None:
    """The running worker that won the newest term: (process, token, time it became active)."""
    best: tuple[ExampleProcess, int, float] | None = None
    for p in workers.values():
        for ev in p.events("active"):
            if best is None or int(ev["token"]) > best[1]:
                best = (p, int(ev["token"]), float(ev["ts"]))
    return best if best is not None and best[0].running else None


def processed(f: Fleet, token: int | None = None) -> list[dict[str, str]]:
    return [ev for _, ev in f.events("processed") if token is None or int(ev["token"]) == token]


def test_worker_handover_term_and_kill(server: ServerProcess, fleet: Any) -> None:
    f: Fleet = fleet(server.endpoint)
    _, url = f.start_sink()
    observer = f.start("examples.worker", "observe", name="observer")
    f.wait_until(lambda: observer.events("observing"), 20, "the observer")
    workers: dict[str, ExampleProcess] = {}

    def start(name: str, backend: str) -> ExampleProcess:
        workers[name] = f.start("examples.worker", "run", "--id", name, "--ttl", str(TTL), "--backend", backend,
                                "--sink", url, name=name)
        return workers[name]

    w1 = start("w1", "trio")
    f.wait_until(lambda: w1.events("active"), 20, "w1 to become active")
    for name, backend in (("w2", "asyncio"), ("w3", "uvloop")):
        p = start(name, backend)
        f.wait_until(lambda p=p: p.events("standby"), 20, f"{name} to stand by")  # type: ignore[misc]

    feeder = f.start("examples.worker", "enqueue", name="feeder", stdin=True)
    stop_feeding = threading.Event()

    def feed() -> None:
        n = 0
        while not stop_feeding.is_set():
            n += 1
            feeder.write(f"item-{n}\n")
            time.sleep(0.05)

    feeding = threading.Thread(target=feed, daemon=True)
    feeding.start()
    latencies: dict[str, float] = {}
    try:
        f.wait_until(lambda: len(processed(f)) >= 20, 30, "20 items processed")
        for how in ("SIGTERM", "SIGKILL"):
            old, token, _ = f.wait_until(lambda: active(workers), 20, "an active worker")
            t0 = time.time()
            if how == "SIGTERM":
                old.signal(signal.SIGTERM)
            else:
                old.kill()
                start("w4", "trio")
            new, new_token, new_at = f.wait_until(
                lambda token=token: (a := active(workers)) and a[1] > token and a,  # type: ignore[misc]
                TTL + 20, "the next worker to take over")
            latencies[how] = new_at - t0
            if how == "SIGTERM":
                assert old.proc.wait(20) == 0, old.report()
                assert old.events("resigned"), old.report()
            f.wait_until(lambda t=new_token: len(processed(f, t)) >= 20, 30,  # type: ignore[misc]
                         f"{new.name} to process items")
    finally:
        stop_feeding.set()
        feeding.join(5)
    feeder.close_stdin()
    assert feeder.proc.wait(30) == 0, feeder.report()
    enqueued = {ev["item"] for ev in feeder.events("enqueued")}
    f.wait_until(lambda: enqueued <= {ev["item"] for ev in processed(f)}, 30, "the queue to drain")
    for p in [*workers.values(), observer]:
        if p.running:
            assert p.stop() == 0, p.report()
    stats = sink_stats(url)

    # at most one effective worker at a time, as seen by the fenced sink
    stale = [e for e in stats["log"] if e["outcome"] == "stale"]
    applied = [e["key"] for e in stats["log"] if e["outcome"] == "applied"]
    repeats = [e["key"] for e in stats["log"] if e["outcome"] == "duplicate"]
    accepted_tokens = [e["token"] for e in stats["log"] if e["outcome"] != "stale"]
    # ... and by the workers' own reports: [active, end) periods never overlap
    periods = []
    for p in workers.values():
        for ev in p.events("active"):
            term = ev["token"]
            ends = [float(e["ts"]) for e in p.events() if e.get("token") == term
                    and e.get("event") in ("resigning", "deposed")]
            end = min(ends) if ends else (p.killed_at or float("inf"))
            periods.append((float(ev["ts"]), end, p.name, int(term)))
    periods.sort()
    overlaps = [(a, b) for a, b in itertools.pairwise(periods) if b[0] < a[1]]
    leaders_seen = [ev["worker"] for ev in observer.events("leader")]
    leaders_seen = [w for i, w in enumerate(leaders_seen) if i == 0 or leaders_seen[i - 1] != w]

    print(f"\nworker[{server.kind}]: {len(enqueued)} items, applied {len(applied)} (missing "
          f"{len(enqueued - set(applied))}, duplicate {len(applied) - len(set(applied))}), re-deliveries "
          f"{len(repeats)}, stale writes rejected {len(stale)}, active periods {[(p[2], p[3]) for p in periods]}, "
          f"overlaps {len(overlaps)}; hand-over after SIGTERM {latencies['SIGTERM'] * 1000:.0f} ms, "
          f"after SIGKILL {latencies['SIGKILL']:.2f} s (TTL {TTL} s)")

    assert stale == []
    assert sorted(applied) == sorted(enqueued), "every item applied exactly once"
    assert len(repeats) <= 1, "only the item in the killed worker's hands may be delivered twice"
    assert accepted_tokens == sorted(accepted_tokens)
    assert overlaps == []
    assert leaders_seen == [p[2] for p in periods], (leaders_seen, periods)
    assert latencies["SIGTERM"] < 1.5, "a resigning worker hands over without waiting for its lease"
    assert latencies["SIGKILL"] < TTL + 3
