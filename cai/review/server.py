"""The review page's server: the standard library's threading HTTP server, on 127.0.0.1 by
default, over one pairs file (and its file of dropped pairs) and its decisions file.

Every request needs the random token of the printed address (compared in constant time): the
page and its two static files take it as `?token=`, the API as the `X-Cai-Token` header. The
only files it reads are the pairs file, its file of dropped pairs and its own static files (a
fixed list served from memory; no path from a request ever reaches the file system). Model text
goes to the page as JSON data, which the page puts into the document as text, never as HTML; a
strict Content-Security-Policy (scripts and styles from this server only, no inline script, no
other origin) backs that up. A POST body is at most MAX_BODY bytes of JSON, and a decision is
checked field by field before it is written."""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import secrets
import threading
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from cai.errors import CaiError, OptionError
from cai.review.decisions import DECISIONS, ReviewLog, decision, problem
from cai.review.index import DROPPED, KEPT, PairsIndex

DEFAULT_PORT = 8765
MAX_BODY = 2 << 20
MAX_PAGE = 500                  # rows of one list request
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SORTS = ("file", "edit", "-edit", "margin", "-margin", "preference", "-preference", "principle")
DIFF_WORDS = 20_000             # past this many words a side, the pair is shown without a word diff


def _static(name: str) -> bytes:
    return resources.files("cai.review").joinpath("static", name).read_bytes()


class Review:
    """A review's state: the index, the decisions, the reviewer; what the API answers. Safe to
    call from the server's threads."""

    def __init__(self, pairs: str, *, filtered: str | None = None, reviewer: str | None = None, lock: bool = True):
        self.pairs = pairs
        self.reviewer = reviewer
        self.log = ReviewLog(pairs, lock=lock)
        self.log.open()                 # the lock first: another review of this file stops here
        try:
            self.index = PairsIndex(pairs, filtered).build()
        except BaseException:
            self.log.close()
            raise
        self._tags: dict[str, list[str]] | None = None
        self._orders: dict[tuple, list[int]] = {}       # filters → the pairs they leave, in order
        self._version = 0                               # decisions made: a cached order that reads them is stale
        self._fixed: dict | None = None                 # the summary's figures no decision changes
        self._mutex = threading.Lock()

    def close(self) -> None:
        self.log.close()
        self.index.close()

    # --- reads -----------------------------------------------------------------------------------

    def decided(self, entry) -> dict | None:
        return self.log.latest.get(entry.id)

    @property
    def tags(self) -> dict[str, list[str]]:
        """principle → tags (after the index's second pass, which finds the constitution)."""
        if self._tags is None:
            self.index.wait()
            self._tags = self.index.tags()
        return self._tags

    def start(self) -> dict:
        """What the page needs to show its first pair, before the index's figures are in."""
        entries = self.index.entries
        return {"pairs": self.pairs, "reviewer": self.reviewer, "decisions_file": self.log.path, "total": len(entries),
                "reviewed": self.reviewed()[0],
                "first_unreviewed": next((e.n for e in entries if e.id not in self.log.latest), None)}

    def _static(self) -> dict:
        """The figures that no decision changes, computed once."""
        entries = self.index.entries
        per: dict[str, dict] = {}
        reasons: Counter[str] = Counter()
        for e in entries:
            p = per.get(e.principle)
            if p is None:
                p = per[e.principle] = {"name": e.principle, "kept": 0, "dropped": 0, "judged": 0, "agreeing": 0,
                                        "edit_sum": 0.0, "edits": 0}
            p[e.status] += 1
            if e.reasons:
                reasons.update(e.reasons)
            if e.agree is not None:
                p["judged"] += 1
                p["agreeing"] += e.agree
            if e.edit is not None and e.status == KEPT:
                p["edit_sum"] += e.edit
                p["edits"] += 1
        principles = []
        for p in sorted(per.values(), key=lambda p: p["name"]):
            total = p["kept"] + p["dropped"]
            principles.append({"name": p["name"], "kept": p["kept"], "dropped": p["dropped"], "total": total,
                               "tags": self.tags.get(p["name"], []),
                               "kept_rate": round(p["kept"] / total, 4) if total else None,
                               "agreement": round(p["agreeing"] / p["judged"], 4) if p["judged"] else None,
                               "edit_mean": round(p["edit_sum"] / p["edits"], 4) if p["edits"] else None})
        kept = sum(p["kept"] for p in per.values())
        return {"principles": principles, "kept": kept, "dropped": len(entries) - kept,
                "reasons": dict(reasons.most_common()), "judged": any(p["judged"] for p in per.values())}

    def reviewed(self) -> tuple[int, Counter, Counter]:
        """(pairs with a decision, decisions by kind, reviewed pairs by principle), read from the
        decisions (few), not from every pair."""
        entries, by_id = self.index.entries, self.index.by_id
        count, kinds, principles = 0, Counter(), Counter()
        for pair_id, line in list(self.log.latest.items()):
            for n in by_id.get(pair_id, ()):
                count += 1
                kinds[line["decision"]] += 1
                principles[entries[n].principle] += 1
        return count, kinds, principles

    def summary(self) -> dict:
        entries = self.index.entries
        self.index.wait()
        if self._fixed is None:
            self._fixed = self._static()
        fixed = self._fixed
        reviewed, kinds, per = self.reviewed()
        first_open = next((e.n for e in entries if e.id not in self.log.latest), None)
        return {"pairs": self.pairs, "filtered": self.index.filtered, "decisions_file": self.log.path,
                "reviewer": self.reviewer, "total": len(entries), "kept": fixed["kept"], "dropped": fixed["dropped"],
                "reviewed": reviewed, "decisions": {d: kinds[d] for d in DECISIONS}, "first_unreviewed": first_open,
                "principles": [{**p, "reviewed": per[p["name"]]} for p in fixed["principles"]],
                "tags": sorted({t for tags in self.tags.values() for t in tags}), "reasons": fixed["reasons"],
                "judged": fixed["judged"], "torn": self.index.torn}

    def order(self, query: dict[str, str]) -> list[int]:
        """The pairs the filters of `query` leave, in its sort order (cached per filters until a
        decision changes what `reviewed`/`decision` filters see)."""
        key = tuple(sorted((k, v) for k, v in query.items() if k in FILTERS and v != "" and (k, v) != ("sort", "file")))
        if not key:                     # the file's order: no figure needed, so no wait for them
            return list(range(len(self.index.entries)))
        self.index.wait()
        uses_decisions = any(k in ("reviewed", "decision") for k, _ in key)
        with self._mutex:
            cached = self._orders.get(key)
            if cached is not None and (not uses_decisions or cached[0] == self._version):
                return cached[1]
            version = self._version
        found = [e.n for e in self._filtered(dict(key))]
        with self._mutex:
            if len(self._orders) > 32:
                self._orders.clear()
            self._orders[key] = (version, found)
        return found

    def _filtered(self, q: dict[str, str]):
        entries = self.index.entries
        if q.get("principle"):
            entries = [e for e in entries if e.principle == q["principle"]]
        if q.get("tag"):
            entries = [e for e in entries if q["tag"] in self.tags.get(e.principle, ())]
        if q.get("status") in (KEPT, DROPPED):
            entries = [e for e in entries if e.status == q["status"]]
        if q.get("reason"):
            entries = [e for e in entries if q["reason"] in e.reasons]
        if q.get("agree") == "yes":
            entries = [e for e in entries if e.agree is True]
        elif q.get("agree") == "no":
            entries = [e for e in entries if e.agree is False]
        elif q.get("agree") == "unjudged":
            entries = [e for e in entries if e.preference is None]
        for name, attr, bound in (("margin_min", "margin", min), ("margin_max", "margin", max),
                                  ("edit_min", "edit", min), ("edit_max", "edit", max)):
            if q.get(name):
                limit = _float(name, q[name])
                if bound is min:
                    entries = [e for e in entries if getattr(e, attr) is not None and getattr(e, attr) >= limit]
                else:
                    entries = [e for e in entries if getattr(e, attr) is not None and getattr(e, attr) <= limit]
        if q.get("reviewed") == "yes":
            entries = [e for e in entries if self.decided(e)]
        elif q.get("reviewed") == "no":
            entries = [e for e in entries if not self.decided(e)]
        if q.get("decision") in DECISIONS:
            entries = [e for e in entries if (self.decided(e) or {}).get("decision") == q["decision"]]
        if q.get("q", "").strip():
            entries = self.index.search(q["q"].strip(), list(entries))
        sort = q.get("sort", "file")
        if sort not in SORTS:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"sort: one of {', '.join(SORTS)}")
        if sort != "file":
            attr = sort.lstrip("-")
            if attr == "principle":
                entries = sorted(entries, key=lambda e: (e.principle, e.n))
            else:
                missing = [e for e in entries if getattr(e, attr) is None]
                present = sorted((e for e in entries if getattr(e, attr) is not None),
                                 key=lambda e: getattr(e, attr), reverse=sort.startswith("-"))
                entries = present + missing
        return entries

    def row(self, n: int) -> dict:
        self.index.wait()
        e = self.index.entries[n]
        d = self.decided(e)
        return {"n": e.n, "id": e.id, "principle": e.principle, "status": e.status, "reasons": list(e.reasons),
                "preference": e.preference, "agree": e.agree, "margin": e.margin, "edit": e.edit,
                "whole": e.whole, "decision": d["decision"] if d else None, "swapped": e.swapped,
                "prompt": _snippet(self.index.read(n))}

    def pair(self, n: int) -> dict:
        from cai.messages import text_of
        from cai.records import conversation_of
        from cai.run.preview import word_diff

        from cai.review.index import _entry

        at = self.index.entries[n]
        record = self.index.read(n)
        e = _entry(n, at.source, at.offset, at.length, record)        # its figures, whether the index has them yet
        out = {"n": n, "total": len(self.index.entries), "id": e.id, "principle": e.principle, "status": e.status,
               "reasons": list(e.reasons), "tags": self._tags.get(e.principle, []) if self._tags else [], "whole": e.whole,
               "decision": self.decided(e), "record": record, "edit": e.edit, "margin": e.margin}
        if e.whole:
            try:
                system, history, prompt = conversation_of(record)
                out["conversation"] = [*([{"role": "system", "content": system}] if system else []), *history,
                                       {"role": "user", "content": prompt}]
                rejected, chosen = text_of(record["rejected"]), text_of(record["chosen"])
                out["rejected"], out["chosen"] = rejected, chosen
                if max(len(rejected.split()), len(chosen.split())) <= DIFF_WORDS:
                    out["diff"] = word_diff(rejected, chosen)
            except (ValueError, KeyError, TypeError, AttributeError):
                out["whole"] = False
        return out

    # --- writes ----------------------------------------------------------------------------------

    def decide(self, body: dict) -> dict:
        why = problem(body)
        if why:
            raise ApiError(HTTPStatus.BAD_REQUEST, why)
        if set(body) - {"id", "decision", "chosen", "rationale"}:
            raise ApiError(HTTPStatus.BAD_REQUEST, "only id, decision, chosen and rationale are sent")
        if body["id"] not in self.index.by_id:
            raise ApiError(HTTPStatus.BAD_REQUEST, "id: no pair of this file has it")
        line = self.log.append(decision(body, self.reviewer))
        with self._mutex:
            self._version += 1
        return {"decision": line, "reviewed": self.reviewed()[0], "total": len(self.index.entries)}


FILTERS = ("principle", "tag", "status", "reason", "agree", "margin_min", "margin_max", "edit_min", "edit_max",
           "reviewed", "decision", "q", "sort")


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}: not a number") from None


def _snippet(record: dict, width: int = 140) -> str:
    from cai.messages import text_of

    try:
        text = text_of(record.get("prompt")) if "prompt" in record else ""
    except ValueError:
        text = ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Handler(BaseHTTPRequestHandler):
    server: ReviewHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "cai-review"
    sys_version = ""

    def log_message(self, format, *args) -> None:       # noqa: A002  (the base class's name)
        pass                                             # no access log on the reviewer's terminal

    # --- the gate --------------------------------------------------------------------------------

    def _allowed(self, url) -> bool:
        """The token, from the query (page, static files) or the header (API), in constant time;
        and, on a loopback address, a Host header naming a loopback address (no DNS rebinding)."""
        token = self.headers.get("X-Cai-Token")
        if token is None:
            token = (parse_qs(url.query).get("token") or [""])[0]
        good = hmac.compare_digest(token.encode("utf-8", "replace"), self.server.token.encode())
        return good and self._host_ok()

    def _host_ok(self) -> bool:
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False, allow_nan=False).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # --- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:               # noqa: N802
        url = urlsplit(self.path)
        if not self._allowed(url):
            self._send(HTTPStatus.FORBIDDEN, b"forbidden: open the address cai review printed (with its token)\n",
                       "text/plain; charset=utf-8")
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        review = self.server.review
        try:
            if url.path == "/":
                page = _static("index.html").decode().replace("{{token}}", html.escape(self.server.token, quote=True))
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            elif url.path.startswith("/static/") and url.path[len("/static/"):] in STATIC:
                name = url.path[len("/static/"):]
                self._send(HTTPStatus.OK, _static(name), STATIC[name])
            elif url.path == "/api/start":
                self._json(HTTPStatus.OK, review.start())
            elif url.path == "/api/summary":
                self._json(HTTPStatus.OK, review.summary())
            elif url.path == "/api/order":
                self._json(HTTPStatus.OK, {"order": review.order(query)})
            elif url.path == "/api/list":
                order = review.order(query)
                start = _int(query.get("offset", "0"), "offset")
                limit = min(_int(query.get("limit", "100"), "limit"), MAX_PAGE)
                self._json(HTTPStatus.OK, {"total": len(order), "offset": start,
                                           "rows": [review.row(n) for n in order[start:start + limit]]})
            elif url.path == "/api/pair":
                n = _int(query.get("n", ""), "n")
                if not 0 <= n < len(review.index.entries):
                    raise ApiError(HTTPStatus.NOT_FOUND, "n: no such pair")
                self._json(HTTPStatus.OK, review.pair(n))
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except ApiError as exc:
            self._error(exc.status, exc.message)
        except CaiError as exc:             # a line of the pairs file the index's second pass could not read
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))

    do_HEAD = do_GET

    def do_POST(self) -> None:              # noqa: N802
        url = urlsplit(self.path)
        if not self._allowed(url):
            self._send(HTTPStatus.FORBIDDEN, b"forbidden\n", "text/plain; charset=utf-8")
            self.close_connection = True
            return
        if url.path != "/api/decision":
            self.close_connection = True
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length needed")
            return
        if int(length) > MAX_BODY:
            self.close_connection = True            # the body is not read
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a decision is at most {MAX_BODY} bytes")
            return
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self.close_connection = True
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
            return
        data = self.rfile.read(int(length))
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            self._error(HTTPStatus.BAD_REQUEST, "not JSON")
            return
        try:
            self._json(HTTPStatus.OK, self.server.review.decide(body))
        except ApiError as exc:
            self._error(exc.status, exc.message)
        except Exception as exc:            # the disk: the page shows it, the decision is not taken
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))

    def _refuse(self) -> None:
        self.close_connection = True
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse


def _int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}: not a whole number") from None
    if number < 0:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}: negative")
    return number


class ReviewHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, review: Review, token: str):
        self.review, self.token = review, token
        family_host = address[0]
        import socket

        if ":" in family_host:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        try:
            self.loopback = ipaddress.ip_address(family_host).is_loopback
        except ValueError:
            self.loopback = family_host == "localhost"


class ReviewServer:
    """A review of `pairs` served at `url` until `close`: `start()` serves from a thread (tests,
    notebooks); `serve_forever()` in the calling thread (the CLI)."""

    def __init__(self, pairs: str, *, filtered: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, reviewer: str | None = None, lock: bool = True, token: str | None = None):
        if port is not None and not 0 <= port <= 65535:
            raise OptionError("port", f"must be 0-65535 (got {port})")
        self.review = Review(pairs, filtered=filtered, reviewer=reviewer, lock=lock)
        self.token = token or secrets.token_urlsafe(24)
        try:
            self.httpd = self._bind(host, port)
        except BaseException:
            self.review.close()
            raise
        self.host = host
        self._thread: threading.Thread | None = None

    def _bind(self, host: str, port: int | None) -> ReviewHTTPServer:
        tries = [port] if port is not None else [DEFAULT_PORT, 0]     # the default port, else a free one
        for i, p in enumerate(tries):
            try:
                return ReviewHTTPServer((host, p), self.review, self.token)
            except OSError as exc:
                if i + 1 < len(tries):
                    continue
                raise OptionError("port" if port is not None else "host",
                                  f"cannot listen on {host}:{p}: {exc.strerror or exc}") from None
        raise AssertionError

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}/?token={self.token}"

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cai-review", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.review.close()

    def __enter__(self) -> ReviewServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
