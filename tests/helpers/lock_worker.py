"""A separate process that takes a coord lock and talks to a FencedResource (tests/helpers/client_kit.py).

    python lock_worker.py contend ENDPOINT NAME RESOURCE_PORT BACKEND TASKS ROUNDS
        TASKS tasks each take the lock ROUNDS times: ENTER, WRITE, EXIT with the fencing token. Prints
        "done <n>" when finished.
    python lock_worker.py hold ENDPOINT NAME RESOURCE_PORT BACKEND TTL
        takes the lock with a session of TTL seconds, prints "held <token>", then writes with its token every
        50 ms until the lock is lost; prints "write <token> OK|REJECT" for each answer and "lost" on LockLost.

BACKEND is trio, asyncio or uvloop.
"""

from __future__ import annotations

import sys

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import coord


class ResourceConn:
    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.buffered = BufferedByteReceiveStream(stream)
        self.lock = anyio.Lock()

    async def ask(self, line: str) -> str:
        async with self.lock:
            await self.stream.send((line + "\n").encode())
            return (await self.buffered.receive_until(b"\n", 100)).decode()


async def contend(endpoint: str, name: str, port: int, tasks: int, rounds: int) -> None:
    async with coord.open_client(endpoint) as client, await anyio.connect_tcp("127.0.0.1", port) as sock:
        conn = ResourceConn(sock)
        done = 0

        async def task(t: int) -> None:
            nonlocal done
            who = f"{name}-{id(conn)}-{t}"
            for _ in range(rounds):
                async with client.lock(name, ttl=10) as lock:
                    token = lock.fencing_token
                    assert await conn.ask(f"ENTER {token} {who}") == "OK"
                    await anyio.sleep(0.01)
                    assert await conn.ask(f"WRITE {token} {who}") == "OK"
                    await conn.ask(f"EXIT {token} {who}")
                done += 1

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for t in range(tasks):
                    tg.start_soon(task, t)
    print(f"done {done}", flush=True)


async def hold(endpoint: str, name: str, port: int, ttl: int) -> None:
    async with coord.open_client(endpoint) as client, await anyio.connect_tcp("127.0.0.1", port) as sock:
        conn = ResourceConn(sock)
        try:
            with anyio.fail_after(120):
                async with client.lock(name, ttl=ttl) as lock:
                    token = lock.fencing_token
                    print(f"held {token}", flush=True)
                    while True:
                        answer = await conn.ask(f"WRITE {token} holder")
                        print(f"write {token} {answer}", flush=True)
                        await anyio.sleep(0.05)
        except coord.LockLost:
            print("lost", flush=True)


def main() -> None:
    mode, endpoint, name, port_s, backend, *rest = sys.argv[1:]
    port = int(port_s)
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    lib = "trio" if backend == "trio" else "asyncio"
    if mode == "contend":
        anyio.run(contend, endpoint, name, port, int(rest[0]), int(rest[1]), backend=lib, backend_options=options)
    else:
        anyio.run(hold, endpoint, name, port, int(rest[0]), backend=lib, backend_options=options)


if __name__ == "__main__":
    main()
