"""A static binary cache served over HTTP/1.1 on 127.0.0.1 as if it were far away: every request
waits one round trip before its answer, a new connection waits one more (the TCP handshake), and
all responses share one link of a fixed bandwidth. Counts requests and bytes on the wire.

asyncio, so waiting costs no CPU: the clients (Nix, nixfs) are what gets measured, not the server.
Runs in a background thread of the harness; `Cache.counters()` is read between runs."""

import asyncio
import os
import threading
from dataclasses import dataclass, field


@dataclass
class Profile:
    name: str
    rtt_ms: float
    mbit: float  # link bandwidth, megabit/s

    @property
    def bytes_per_second(self) -> float:
        return self.mbit * 1e6 / 8


@dataclass
class Counters:
    requests: int = 0
    narinfo_requests: int = 0
    nar_requests: int = 0
    connections: int = 0
    bytes: int = 0  # response bodies and headers
    nars: list = field(default_factory=list)  # NAR URLs asked for


class Link:
    """One shared pipe: a response's bytes leave no faster than the bandwidth allows, whoever
    sends them. Timer overshoot is absorbed by a virtual clock, so the mean rate is exact."""

    def __init__(self, bytes_per_second: float):
        self.rate = bytes_per_second
        self.free_at = 0.0
        # Slices of ~4 ms of transfer: asyncio's timers have millisecond granularity.
        self.slice = max(16384, int(bytes_per_second * 0.004))

    async def send(self, writer: asyncio.StreamWriter, data) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        for off in range(0, len(view), self.slice):
            piece = view[off:off + self.slice]
            now = loop.time()
            start = self.free_at if self.free_at > now - 0.005 else now
            self.free_at = start + len(piece) / self.rate
            if self.free_at > now:
                await asyncio.sleep(self.free_at - now)
            writer.write(piece)
            await writer.drain()


class Cache:
    def __init__(self, root: str, profile: Profile, listen: str = "127.0.0.1"):
        self.listen = listen  # 0.0.0.0: also reachable from other network namespaces
        self.root = os.path.realpath(root)
        self.profile = profile
        self.lock = threading.Lock()
        self._counters = Counters()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = None
        self._loop = None

    # -- control, from the harness thread --
    def start(self) -> "Cache":
        self._thread.start()
        self._ready.wait(10)
        if not self.port:
            raise RuntimeError("the simulated cache did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self._counters = Counters()

    def counters(self) -> Counters:
        with self.lock:
            c = self._counters
            return Counters(c.requests, c.narinfo_requests, c.nar_requests, c.connections, c.bytes, list(c.nars))

    # -- the server --
    def _count(self, path: str, nbytes: int) -> None:
        with self.lock:
            c = self._counters
            c.requests += 1
            c.bytes += nbytes
            if path.endswith(".narinfo"):
                c.narinfo_requests += 1
            elif path.startswith("/nar/"):
                c.nar_requests += 1
                c.nars.append(path)

    async def _handle(self, reader, writer):
        rtt = self.profile.rtt_ms / 1000
        with self.lock:
            self._counters.connections += 1
        try:
            await asyncio.sleep(rtt)  # the handshake
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = head.split(b" ", 2)[:2]
                path = target.decode().split("?")[0]
                await asyncio.sleep(rtt)  # request out, first byte back
                full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
                if full.startswith(self.root + "/") and os.path.isfile(full):
                    with open(full, "rb") as f:
                        body = f.read()
                    header = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % len(body)
                else:
                    body = b""
                    header = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                if method == b"HEAD":
                    body = b""
                self._count(path, len(header) + len(body))
                writer.write(header)
                await self.link.send(writer, body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _run(self):
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()
            self.link = Link(self.profile.bytes_per_second)
            server = await asyncio.start_server(self._handle, self.listen, 0, backlog=512)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop
            server.close()

        asyncio.run(main())


if __name__ == "__main__":
    # Standalone: netsim.py ROOT RTT_MS [MBIT]  (prints "PORT n", serves until killed)
    import sys
    import time
    root, rtt = sys.argv[1], float(sys.argv[2])
    mbit = float(sys.argv[3]) if len(sys.argv) > 3 else 1e6  # effectively unlimited
    cache = Cache(root, Profile("cli", rtt_ms=rtt, mbit=mbit)).start()
    print("PORT", cache.port, flush=True)
    while True:
        time.sleep(3600)
