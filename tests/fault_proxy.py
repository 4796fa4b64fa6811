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
forwarding uses httpx.

`FakeOpenAI` is the other half: a fake OpenAI-compatible server with no model behind it, whose
every reply a test scripts (`chat_reply` makes a chat completion to answer with, `stream_reply`
the chunks of a streamed one, reasoning apart or not)."""

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


# ---- a fake server ----------------------------------------------------------------------------

DROP = object()       # a `respond` result: close the connection without any reply


class FakeOpenAI:
    """A local OpenAI-compatible HTTP server on a thread, no model behind it.

    `respond(body, n)` (n counts POSTs from 0) returns (status, payload) for each POST: a dict
    payload is sent as JSON, a str as it is, a list as a server-sent event stream (one `data:`
    event per item, then `data: [DONE]`); or DROP, to close the connection unanswered.
    `models` is what `GET /models` answers: a list of ids (a 200 listing them), or an HTTP
    status (404, 405, 401, …) to answer with instead; `models_respond(n)` overrides it with
    (status, payload) or DROP. `bodies` holds the POST bodies, `gets` counts the GETs,
    `max_in_flight` is the most POSTs it held at once, and `requests` is (method, path with its
    query, Authorization header or None) of every request, in order of arrival."""

    def __init__(self, respond, models: list[str] | int = 404, models_respond=None):
        import json as _json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.respond, self.bodies = respond, []
        self.models, self.models_respond = models, models_respond
        self.gets = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with fake._lock:
                    fake.requests.append(("GET", self.path, self.headers.get("authorization")))
                    n = fake.gets
                    fake.gets += 1
                if fake.models_respond is not None:
                    self._send(fake.models_respond(n))
                elif isinstance(fake.models, int):
                    self._send((fake.models, {"error": {"message": "Not Found"}}))
                else:
                    self._send((200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]}))

            def do_POST(self):
                body = _json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake._lock:
                    fake.requests.append(("POST", self.path, self.headers.get("authorization")))
                    n = len(fake.bodies)
                    fake.bodies.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    result = fake.respond(body, n)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1
                self._send(result)

            def _send(self, result):
                if result is DROP:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = result
                kind = "application/json"
                if isinstance(payload, list):
                    kind = "text/event-stream"
                    payload = "".join(f"data: {_json.dumps(chunk)}\n\n" for chunk in payload) + "data: [DONE]\n\n"
                data = (_json.dumps(payload) if isinstance(payload, dict) else payload).encode()
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def chat_reply(text: str | None = "Hello.", finish_reason: str = "stop", **message) -> dict:
    """A chat completion whose message content is `text` (None: null), with `message`'s extra fields."""
    return {"id": "x", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": text, **message}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


def stream_reply(content: list[str], reasoning: list[str] = (), field: str = "reasoning_content",
                 finish_reason: str = "stop") -> list[dict]:
    """The chunks of a streamed chat completion: a role delta, a delta per piece of `reasoning`
    (under `field`), one per piece of `content`, then the finish reason, and usage last."""
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return {"id": "x", "object": "chat.completion.chunk", "model": "fake", "choices": choices,
                **({"usage": usage} if usage else {})}

    return ([chunk({"role": "assistant", "content": ""})] + [chunk({field: r}) for r in reasoning]
            + [chunk({"content": c}) for c in content] + [chunk({}, finish_reason)]
            + [chunk({}, usage={"prompt_tokens": 10, "completion_tokens": len(content) + len(reasoning),
                                "total_tokens": 10 + len(content) + len(reasoning)})])
