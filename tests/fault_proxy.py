"""An HTTP proxy that injects faults, for testing remote backends against a real server.

    with FaultProxy("http://127.0.0.1:8000/v1", seed=0, error_rate=0.1, drop_rate=0.1) as base_url:
        ...   # point the client at base_url; proxy.requests, proxy.faults, proxy.log tell what happened

Each request draws one number from a seeded RNG and gets, by the configured rates: an HTTP 500,
a 429 with `Retry-After`, a dropped connection (the socket is closed without a response), or is
forwarded to the upstream; forwarded requests are delayed by `delay` seconds at `delay_rate`.
`script` names the fate of the first requests outright ("ok", "500", "429", "drop", "delay",
"malformed": a 200 whose body is not JSON, "401": a 401 that echoes the Authorization header
back as servers that quote a wrong key do); the rates take over after it. Responses always
close the connection. Runs an asyncio server on 127.0.0.1 (a free port) in a background thread;
forwarding uses httpx."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

ACTIONS = ("ok", "500", "429", "drop", "delay", "malformed", "401")
HOP_BY_HOP = {"host", "connection", "keep-alive", "content-length", "transfer-encoding", "upgrade",
              "proxy-connection", "te", "trailer", "accept-encoding"}
REASONS = {200: "OK", 401: "Unauthorized", 429: "Too Many Requests", 500: "Internal Server Error",
           502: "Bad Gateway"}


@dataclass
class Seen:
    """One request as the proxy saw it."""

    time: float                 # time.monotonic() at arrival
    method: str
    path: str
    headers: dict[str, str]     # lower-cased names
    action: str                 # what the proxy did with it


@dataclass
class FaultProxy:
    upstream: str
    seed: int = 0
    error_rate: float = 0.0      # HTTP 500
    throttle_rate: float = 0.0   # HTTP 429 with Retry-After
    drop_rate: float = 0.0       # close the connection without a response
    delay_rate: float = 0.0      # forward after `delay` seconds
    delay: float = 0.5
    retry_after: str = "1"
    script: list[str] = field(default_factory=list)

    def __post_init__(self):
        for action in self.script:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r}; choose from {ACTIONS}")
        if self.error_rate + self.throttle_rate + self.drop_rate > 1:
            raise ValueError("error_rate + throttle_rate + drop_rate must not exceed 1")
        parts = urlsplit(self.upstream)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._prefix = parts.path.rstrip("/")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.faults: Counter[str] = Counter()      # injected faults by action ("500", "drop", "delay", ...)
        self.log: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self._prefix}"

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    # ---- lifecycle ----

    def start(self) -> str:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self.base_url

    async def _start(self):
        self._client = httpx.AsyncClient(base_url=self._origin, timeout=httpx.Timeout(300.0))
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            current = asyncio.current_task()
            for task in [t for t in asyncio.all_tasks() if t is not current]:
                task.cancel()
            await self._client.aclose()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- one connection, one request ----

    def _choose(self) -> str:
        with self._lock:
            index = self.requests
            self.requests += 1
            if index < len(self.script):
                return self.script[index]
            draw = self._rng.random()
            delayed = self._rng.random() < self.delay_rate
        for action, rate in (("500", self.error_rate), ("429", self.throttle_rate), ("drop", self.drop_rate)):
            if draw < rate:
                return action
            draw -= rate
        return "delay" if delayed else "ok"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))

        action = self._choose()
        with self._lock:
            self.log.append(Seen(time.monotonic(), method, path, headers, action))
            if action != "ok":
                self.faults[action] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if action == "drop":
                writer.transport.abort()          # no response at all
                return
            if action == "500":
                await self._respond(writer, 500, b'{"error": {"message": "injected fault"}}')
            elif action == "429":
                await self._respond(writer, 429, b'{"error": {"message": "slow down"}}',
                                    {"Retry-After": self.retry_after})
            elif action == "401":
                echo = headers.get("authorization", "(none)").replace('"', "'")
                await self._respond(writer, 401, f'{{"error": {{"message": "bad key: {echo}"}}}}'.encode())
            elif action == "malformed":
                await self._respond(writer, 200, b'{"choices": [{"message": ')
            else:
                if action == "delay":
                    await asyncio.sleep(self.delay)
                await self._forward(writer, method, path, headers, body)
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _forward(self, writer, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        sent = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
        try:
            response = await self._client.request(method, path, headers=sent, content=body)
        except httpx.HTTPError as exc:
            await self._respond(writer, 502, f'{{"error": {{"message": "upstream: {type(exc).__name__}"}}}}'.encode())
            return
        extra = {"Content-Type": response.headers.get("content-type", "application/json")}
        if "retry-after" in response.headers:
            extra["Retry-After"] = response.headers["retry-after"]
        await self._respond(writer, response.status_code, response.content, extra)

    @staticmethod
    async def _respond(writer, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
                 f"Content-Length: {len(body)}", "Connection: close"]
        headers = {"Content-Type": "application/json", **(headers or {})}
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        writer.close()
