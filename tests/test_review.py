"""`cai review` without a browser: the server's gate (token, host, paths, methods, body size),
its API over a pairs file and its dropped pairs, the decisions file (appended, fsynced, resumed,
under the pairs file's lock), and what downstream does with the decisions (export, merge, stats,
--to argilla)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from cai.errors import InputError, OutputError
from cai.review.decisions import ReviewLog, apply, load, review_path
from cai.review.server import CSP, ReviewServer
from conftest import read_jsonl
from reviewdata import HOSTILE, HOSTILE_ID, make_pairs, records


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(tmp_path)


@pytest.fixture
def server(pairs):
    srv = ReviewServer(str(pairs), port=0, reviewer="ana").start()
    yield srv
    srv.close()


def request(srv, path, *, token=True, body=None, headers=None, method=None):
    """(status, headers, body bytes) of one request to the server."""
    url = f"http://127.0.0.1:{srv.port}{path}"
    hdrs = dict(headers or {})
    if token is True:
        hdrs.setdefault("X-Cai-Token", srv.token)
    elif isinstance(token, str):
        hdrs["X-Cai-Token"] = token
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def api(srv, path, body=None):
    status, _, data = request(srv, path, body=body)
    assert status == 200, data
    return json.loads(data)


def n_of(srv, pair_id):
    return srv.review.index.by_id[pair_id][0]


# --- the gate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/app.css", "/api/summary", "/api/order",
                                  "/api/list", "/api/pair?n=0", "/nothing-here", "/static/../../etc/passwd"])
def test_every_request_without_the_token_is_refused(server, path):
    for token in (None, "", "wrong-token", server.token[:-1]):
        status, headers, body = request(server, path, token=token)
        assert status == 403, (path, token)
        assert b"forbidden" in body and b"tea" not in body
        assert headers["Content-Security-Policy"] == CSP
    status, _, _ = request(server, "/api/decision", token=None, body={"id": "tea-0", "decision": "accept"})
    assert status == 403
    assert not os.path.exists(review_path(server.review.pairs)), "a refused request writes nothing"


def test_the_token_opens_page_static_files_and_api(server):
    status, headers, page = request(server, f"/?token={server.token}", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert f'src="/static/app.js?token={server.token}"'.encode() in page
    assert b"<script>" not in page, "no inline script: the page's script is a file"
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        status, headers, _ = request(server, f"/static/{name}?token={server.token}", token=None)
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert headers["X-Content-Type-Options"] == "nosniff"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "http" not in csp, "no other origin"
    summary = api(server, "/api/summary")
    assert (summary["kept"], summary["dropped"], summary["total"]) == (9, 1, 10)
    assert summary["reviewer"] == "ana" and summary["judged"]


def test_binds_loopback_by_default_and_refuses_other_host_headers(pairs):
    srv = ReviewServer(str(pairs), port=0).start()
    try:
        assert srv.httpd.server_address[0] == "127.0.0.1"
        assert srv.url.startswith(f"http://127.0.0.1:{srv.port}/?token=")
        status, _, _ = request(srv, "/api/summary", headers={"Host": f"evil.example:{srv.port}"})
        assert status == 403, "a DNS-rebound name is refused even with the token"
        assert request(srv, "/api/summary", headers={"Host": f"localhost:{srv.port}"})[0] == 200
    finally:
        srv.close()


@pytest.mark.parametrize("path", ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
                                  "/static/index.html", "/static/", "/etc/passwd", "/api/pair?path=/etc/passwd",
                                  "/api/pair?n=-1", "/api/pair?n=99999", "/api/pair?n=../../etc/passwd",
                                  "/pairs.jsonl", "/api/file?name=pairs.jsonl.lock", "//etc/passwd"])
def test_no_path_reaches_the_file_system(server, path):
    status, _, body = request(server, path)
    assert status in (400, 404), (path, status)
    assert b"root:" not in body


def test_methods_and_bodies_are_checked(server):
    assert request(server, "/api/summary", method="PUT", body={})[0] == 405
    assert request(server, "/api/summary", method="DELETE")[0] == 405
    assert request(server, "/api/other", body={"id": "tea-0", "decision": "accept"})[0] == 404
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:     # refused before it is read
        sock.sendall(f"POST /api/decision HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Cai-Token: {server.token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {3 << 20}\r\n\r\n{{\"id\": ".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    assert request(server, "/api/decision", body=b"id=tea-0&decision=accept",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert request(server, "/api/decision", body=b"{not json")[0] == 400
    for bad in ({"id": "nobody", "decision": "accept"}, {"id": "tea-0", "decision": "maybe"},
                {"id": "tea-0", "decision": "edit"}, {"id": "tea-0", "decision": "edit", "chosen": "  "},
                {"id": "tea-0", "decision": "accept", "chosen": "text"}, {"id": "tea-0", "decision": "accept", "x": 1},
                {"id": "tea-0", "decision": "accept", "reviewer": "mallory"}, {"id": "tea-0", "decision": "accept",
                                                                               "rationale": 5}, ["tea-0", "accept"]):
        status, _, body = request(server, "/api/decision", body=bad)
        assert status == 400, bad
        assert "error" in json.loads(body)
    assert not os.path.exists(review_path(server.review.pairs))


# --- the API -------------------------------------------------------------------------------------

def test_hostile_text_is_returned_as_data(server):
    n = n_of(server, HOSTILE_ID)
    status, headers, body = request(server, f"/api/pair?n={n}")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert headers["Content-Security-Policy"] == CSP
    pair = json.loads(body)
    assert pair["chosen"] == HOSTILE and pair["record"]["chosen"][0]["content"] == HOSTILE
    assert pair["conversation"][-1]["content"] == "Say </script> please"
    row = api(server, "/api/list?q=onerror")["rows"]
    assert [r["id"] for r in row] == [HOSTILE_ID]


def test_pair_view_data(server):
    chat = api(server, f"/api/pair?n={n_of(server, 'chat-1')}")
    assert [m["role"] for m in chat["conversation"]] == ["system", "user", "assistant", "user"]
    assert chat["record"]["judge"]["orders"] and chat["diff"]
    assert {op for op, _ in chat["diff"]} <= {"equal", "insert", "delete"}
    dropped = api(server, "/api/list?status=dropped")["rows"]
    assert [(r["id"], r["reasons"]) for r in dropped] == [("tea-1", ["unchanged"])]
    pair = api(server, f"/api/pair?n={dropped[0]['n']}")
    assert pair["status"] == "dropped" and pair["whole"] and pair["record"]["meta"]["repairs"]


def test_filters_sorting_and_search(server):
    everything = api(server, "/api/order")["order"]
    assert everything == list(range(10))
    summary = api(server, "/api/summary")
    principle = summary["principles"][0]["name"]
    rows = api(server, f"/api/list?principle={principle}")["rows"]
    assert rows and all(r["principle"] == principle for r in rows)
    assert api(server, "/api/list?agree=no")["total"] == 9, "the scripted judge's orders always disagree"
    assert api(server, "/api/list?agree=unjudged")["total"] == 1
    by_edit = api(server, "/api/list?sort=-edit&status=kept")["rows"]
    edits = [r["edit"] for r in by_edit]
    assert edits == sorted(edits, reverse=True)
    assert api(server, "/api/list?edit_max=0.05")["total"] == 1
    assert api(server, "/api/list?q=GREEN%20TEA")["rows"][0]["id"] == "chat-1"
    assert api(server, "/api/list?q=scripted")["total"] == 0, "search reads texts, not meta"
    assert api(server, "/api/list?reviewed=yes")["total"] == 0
    if summary["tags"]:
        tag = summary["tags"][0]
        assert api(server, f"/api/list?tag={tag}")["total"] >= 1
    assert request(server, "/api/list?sort=sideways")[0] == 400
    assert request(server, "/api/list?margin_min=abc")[0] == 400


# --- decisions -----------------------------------------------------------------------------------

def test_decisions_are_appended_fsynced_and_resumed(pairs):
    srv = ReviewServer(str(pairs), port=0, reviewer="ana").start()
    try:
        for pair_id, kind in (("tea-0", "accept"), ("tea-2", "reject"), ("tea-0", "swap")):
            result = api(srv, "/api/decision", {"id": pair_id, "decision": kind, "rationale": "why not"})
            assert result["decision"]["reviewer"] == "ana" and result["decision"]["rationale"] == "why not"
        edit = api(srv, "/api/decision", {"id": "tea-3", "decision": "edit", "chosen": "Better tea."})
        assert edit["reviewed"] == 3
        lines = read_jsonl(review_path(str(pairs)))
        assert [(line["id"], line["decision"]) for line in lines] == [
            ("tea-0", "accept"), ("tea-2", "reject"), ("tea-0", "swap"), ("tea-3", "edit")]
        assert set(lines[0]) == {"id", "decision", "chosen", "rationale", "reviewer", "time"}
        assert lines[3]["chosen"] == "Better tea." and lines[0]["chosen"] is None
        assert api(srv, "/api/list?reviewed=yes")["total"] == 3
        assert api(srv, "/api/list?decision=swap")["rows"][0]["id"] == "tea-0", "the latest decision wins"
    finally:
        srv.close()
    # a server killed mid-write leaves a torn last line: the next review cuts it off and goes on
    with open(review_path(str(pairs)), "ab") as fp:
        fp.write(b'{"id": "tea-4", "decis')
    srv = ReviewServer(str(pairs), port=0, reviewer="bo").start()
    try:
        assert srv.review.log.torn
        summary = api(srv, "/api/summary")
        assert summary["reviewed"] == 3
        first = next(e.n for e in srv.review.index.entries if e.id not in ("tea-0", "tea-2", "tea-3"))
        assert summary["first_unreviewed"] == first, "resumes at the first pair not reviewed"
        assert api(srv, f"/api/pair?n={n_of(srv, 'tea-0')}")["decision"]["decision"] == "swap"
        api(srv, "/api/decision", {"id": "tea-4", "decision": "tie"})
    finally:
        srv.close()
    lines = read_jsonl(review_path(str(pairs)))
    assert len(lines) == 5 and lines[-1]["reviewer"] == "bo"
    assert load(review_path(str(pairs)))["tea-0"]["decision"] == "swap"


def test_the_decisions_file_is_under_the_pairs_files_lock(pairs, tmp_path):
    from cai.locks import Locks

    srv = ReviewServer(str(pairs), port=0)
    try:
        assert os.path.exists(f"{pairs}.lock")
        with pytest.raises(OutputError, match="another cai run is writing it"):
            ReviewServer(str(pairs), port=0)
        with pytest.raises(OutputError, match="another cai run is writing it"):
            Locks([str(pairs)]).__enter__()            # cai generate resuming into PAIRS waits for the review
    finally:
        srv.close()
    assert not os.path.exists(f"{pairs}.lock")
    with ReviewLog(str(pairs)) as log:
        log.append({"id": "tea-0", "decision": "accept", "chosen": None, "rationale": None, "reviewer": None,
                    "time": "2026-01-01T00:00:00+00:00"})
    assert len(read_jsonl(review_path(str(pairs)))) == 1


def test_a_bad_decisions_file_is_one_error_line(pairs):
    from typer.testing import CliRunner

    from cai.cli import app

    with open(review_path(str(pairs)), "w") as fp:
        fp.write('{"id": "tea-0", "decision": "accept"}\n{"id": "tea-1", "decision": "love"}\n{"id": "tea-2"}\n')
    with pytest.raises(InputError, match=r"review\.jsonl:2: not a cai review decision"):
        ReviewServer(str(pairs), port=0)
    result = CliRunner().invoke(app, ["review", str(pairs), "--no-browser", "--port", "0"])
    assert result.exit_code == 2
    assert "review.jsonl:2: not a cai review decision" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["review", str(pairs) + ".missing", "--no-browser"])
    assert result.exit_code == 2 and "no such file" in result.output


def test_a_compressed_pairs_file_is_reviewed(tmp_path):
    plain = make_pairs(tmp_path, hostile=False)
    packed = tmp_path / "packed.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    srv = ReviewServer(str(packed), port=0).start()
    try:
        assert api(srv, "/api/summary")["kept"] == 8
        assert api(srv, "/api/pair?n=3")["id"] == records(plain)[3]["id"]
        api(srv, "/api/decision", {"id": "tea-0", "decision": "reject"})
    finally:
        srv.close()
    assert read_jsonl(f"{packed}.review.jsonl")[0]["decision"] == "reject"


# --- downstream ----------------------------------------------------------------------------------

DECIDED = {"tea-0": "accept", "tea-2": "reject", "tea-3": "swap", "tea-4": "tie", "tea-5": "skip", "tea-6": "edit",
           "tea-1": "accept"}        # tea-1 is a dropped pair: not in the pairs file, not exported


def decide_all(pairs, reviewer="ana"):
    with ReviewLog(str(pairs)) as log:
        for pair_id, kind in DECIDED.items():
            log.append({"id": pair_id, "decision": kind, "chosen": "Edited by a person." if kind == "edit" else None,
                        "rationale": f"because {kind}", "reviewer": reviewer, "time": "2026-01-01T00:00:00+00:00"})


def check_reviewed(before: dict, after: list[dict]) -> None:
    from cai.messages import text_of

    got = {r["id"]: r for r in after}
    assert "tea-2" not in got and "tea-4" not in got, "rejected and tied pairs are left out"
    assert text_of(got["tea-3"]["chosen"]) == text_of(before["tea-3"]["rejected"])
    assert text_of(got["tea-3"]["rejected"]) == text_of(before["tea-3"]["chosen"])
    assert got["tea-3"]["meta"]["review"]["decision"] == "swap"
    assert text_of(got["tea-6"]["chosen"]) == "Edited by a person."
    assert got["tea-6"]["meta"]["review"]["chosen_before"] == text_of(before["tea-6"]["chosen"])
    assert got["tea-6"]["meta"]["review"]["rationale"] == "because edit"
    assert "judge" not in got["tea-6"], "the judge judged the text before the edit"
    assert got["tea-0"]["meta"]["review"]["reviewer"] == "ana"
    assert got["tea-7"] == {**before["tea-7"], **{k: v for k, v in got["tea-7"].items() if k in ("prompt", "chosen", "rejected")}}


def test_export_applies_the_decisions(pairs, tmp_path):
    from cai.run.export import export

    decide_all(pairs)
    before = {r["id"]: r for r in records(pairs)}
    out = tmp_path / "out.jsonl"
    summary = export(str(pairs), str(out), format="conversational")
    assert summary.review == {"file": review_path(str(pairs)), "accept": 1, "reject": 1, "swap": 1, "tie": 1,
                              "skip": 1, "edit": 1, "dropped": 2, "not_in_file": 1}
    check_reviewed(before, read_jsonl(out))
    assert len(read_jsonl(out)) == len(before) - 2
    plain = export(str(pairs), str(tmp_path / "plain.jsonl"), format="conversational", review=False)
    assert plain.review is None and len(read_jsonl(tmp_path / "plain.jsonl")) == len(before)


def test_export_cli_says_what_the_review_did(pairs, tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    decide_all(pairs)
    result = CliRunner().invoke(app, ["export", str(pairs), "-f", "conversational", "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0, result.output
    assert "1 rejected and 1 tied dropped, 1 swapped, 1 edited, 1 accepted, 1 skipped" in result.output
    result = CliRunner().invoke(app, ["export", str(pairs), "--to", "trl", str(tmp_path / "trl")])
    assert result.exit_code == 0, result.output
    assert "1 swapped" in result.output
    rows = read_jsonl(tmp_path / "trl" / "data" / "train.jsonl")
    assert len(rows) == len(records(pairs)) - 2
    assert any(row["chosen"][0]["content"] == "Edited by a person." for row in rows)


def test_merge_applies_each_inputs_decisions(pairs, tmp_path):
    from cai.run.merge import merge

    decide_all(pairs)
    before = {r["id"]: r for r in records(pairs)}
    out = tmp_path / "merged.jsonl"
    summary = merge(str(out), [str(pairs)])
    assert summary.review["dropped"] == 2 and summary.review["swap"] == 1 and summary.review["edit"] == 1
    check_reviewed(before, read_jsonl(out))
    dropped = {line["id"]: line for line in read_jsonl(f"{out}.filtered.jsonl")}
    assert dropped["tea-2"]["filter"] == {"reasons": ["review"], "review": "reject"}
    assert dropped["tea-4"]["filter"]["review"] == "tie" and "tea-1" in dropped


def test_stats_counts_decisions_and_agreement_with_the_judge(pairs):
    from cai import stats

    decide_all(pairs)
    report, _ = stats.collect(str(pairs))
    review = report["review"]
    assert review["reviewed"] == 7 and review["of"] == 10
    assert review["decisions"] == {"accept": 2, "reject": 1, "swap": 1, "tie": 1, "skip": 1, "edit": 1}
    assert review["reviewers"] == {"ana": 7}
    # the scripted judge's preference is 0.5 exactly: neither an accept nor a swap agrees with it
    assert review["judge_compared"] == 2 and review["judge_agreement"] == 0
    os.remove(review_path(str(pairs)))
    assert stats.collect(str(pairs))[0]["review"] is None


def test_apply_keeps_the_judge_label_on_the_chosen_side():
    record = {"id": "x", "prompt": "p", "chosen": "new", "rejected": "old", "meta": {},
              "judge": {"preference": 0.8, "label": 0.8, "swapped": False}}
    out, applied = apply([record], {"x": {"id": "x", "decision": "swap", "reviewer": "a", "time": "t"}})
    assert out[0]["chosen"] == "old" and out[0]["judge"]["label"] == pytest.approx(0.2) and out[0]["judge"]["swapped"]
    assert applied.counts["swap"] == 1


# --- Argilla -------------------------------------------------------------------------------------

def fake_argilla(monkeypatch):
    """An in-process stand-in for an Argilla server (the few endpoints rg.Dataset.from_disk
    calls), answering through httpx's MockTransport; returns what it was sent."""
    import uuid

    httpx = pytest.importorskip("httpx")
    argilla_client = pytest.importorskip("argilla._api._client")
    now = "2026-01-01T00:00:00"
    ws, ds = str(uuid.uuid4()), str(uuid.uuid4())
    store = {"fields": [], "questions": [], "metadata": [], "records": [], "unhandled": []}

    def made(body):
        return {**body, "id": str(uuid.uuid4()), "inserted_at": now, "updated_at": now}

    def handler(req):
        path, method = req.url.path, req.method
        body = json.loads(req.content) if req.content else None
        if path == "/api/v1/me":
            return httpx.Response(200, json={"id": str(uuid.uuid4()), "username": "u", "role": "owner", "first_name": "u",
                                             "last_name": None, "inserted_at": now, "updated_at": now})
        if path in ("/api/v1/me/workspaces", "/api/v1/workspaces"):
            return httpx.Response(200, json={"items": [{"id": ws, "name": "default", "inserted_at": now, "updated_at": now}]})
        if path == f"/api/v1/workspaces/{ws}":
            return httpx.Response(200, json={"id": ws, "name": "default", "inserted_at": now, "updated_at": now})
        if path == "/api/v1/me/datasets":
            return httpx.Response(200, json={"items": []})
        if path == "/api/v1/datasets" and method == "POST":
            store["dataset"] = {**body, "id": ds, "inserted_at": now, "updated_at": now, "status": "draft",
                                "last_activity_at": now}
            return httpx.Response(201, json=store["dataset"])
        for kind, name in (("fields", "fields"), ("questions", "questions"), ("metadata", "metadata-properties"),
                           ("vectors", "vectors-settings")):
            if path in (f"/api/v1/datasets/{ds}/{name}", f"/api/v1/me/datasets/{ds}/{name}"):
                if method == "POST":
                    item = made({**body, "dataset_id": ds})
                    store[kind].append(item)
                    return httpx.Response(201, json=item)
                return httpx.Response(200, json={"items": store.get(kind, [])})
        if path == f"/api/v1/datasets/{ds}/publish":
            store["dataset"]["status"] = "ready"
            return httpx.Response(200, json=store["dataset"])
        if path == f"/api/v1/datasets/{ds}":
            return httpx.Response(200, json=store["dataset"])
        if path == f"/api/v1/datasets/{ds}/records/bulk":
            store["records"] += body["items"]
            return httpx.Response(200, json={"items": [made({**r, "dataset_id": ds}) for r in body["items"]]})
        store["unhandled"].append((method, path))
        return httpx.Response(404, json={"detail": "not in the fake"})

    monkeypatch.setattr(argilla_client, "create_http_client", lambda api_url, api_key, timeout, retries, **kw: httpx.Client(
        base_url=api_url, headers={"X-Argilla-Api-Key": api_key}, transport=httpx.MockTransport(handler)))
    return store


def test_export_to_argilla_loads_with_the_argilla_package(pairs, tmp_path, monkeypatch):
    import warnings

    from cai.run.export import export_for

    decide_all(pairs)
    folder = tmp_path / "argilla"
    result = export_for(str(pairs), "argilla", str(folder))
    assert sorted(result.files) == [".argilla/dataset.json", ".argilla/settings.json", "README.md", "records.json"]
    assert result.records == {"records": len(records(pairs)) - 2} and result.review["swap"] == 1
    rows = json.loads((folder / "records.json").read_text())
    hostile = next(r for r in rows if r["id"] == HOSTILE_ID)
    assert hostile["fields"]["response1"] == HOSTILE
    chat = next(r for r in rows if r["id"] == "chat-1")
    assert [m["role"] for m in chat["fields"]["prompt"]] == ["system", "user", "assistant", "user"]
    assert chat["suggestions"]["ranking"]["agent"] == "scripted"

    rg = pytest.importorskip("argilla")
    store = fake_argilla(monkeypatch)
    client = rg.Argilla(api_url="http://argilla.invalid", api_key="key")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = rg.Dataset.from_disk(str(folder), client=client)
    assert not store["unhandled"], store["unhandled"]
    assert [f["name"] for f in store["fields"]] == ["prompt", "response1", "response2", "critique"]
    assert [q["settings"]["type"] for q in store["questions"]] == ["ranking"]
    assert len(store["records"]) == len(rows)
    sent = next(r for r in store["records"] if r["external_id"] == "chat-1")
    suggestion = sent["suggestions"][0]
    assert [v["value"] for v in suggestion["value"]] in (["response1", "response2"], ["response2", "response1"])
    assert suggestion["agent"] == "scripted" and 0.5 <= suggestion["score"] <= 1
    assert dataset.name.startswith("cai-")
    shutil.rmtree(folder)
