"""`cai review` in a real browser: Debian's Chromium driven by Playwright (never `playwright
install`: the browser is the system's). The server runs as `cai review` does, in its own
process, so it can be killed mid-review. Under CI (CI set) a missing browser or Playwright fails
these tests rather than skipping them: a skip there would test nothing.

CAI_REVIEW_SCREENSHOTS=DIR also saves the pair view and the list view there (docs/ holds them)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl
from reviewdata import HOSTILE, HOSTILE_ID, make_pairs, records

pytestmark = pytest.mark.browser      # Chromium through Playwright: left out by `make test-quick`

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAST = {"accept": "accepted", "reject": "rejected", "swap": "swapped", "tie": "tie", "skip": "skipped", "edit": "edited"}


def _need(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need {what}; .ci/run installs it")
    pytest.skip(f"needs {what}")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright (pip install -e '.[dev]')")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        _need("Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _sigint_at_its_default() -> None:
    """The server starts with SIGINT at its default, as from a terminal, even when the tests run as
    a background job (whose shell hands its children SIGINT ignored: `stop` would then wait on a
    server that never hears it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Served:
    """`cai review PAIRS --no-browser` in its own process, and the address it printed."""

    def __init__(self, pairs: Path, reviewer: str = "ana"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "COLUMNS": "400"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cai", "review", pairs.name, "--no-browser", "--port", "0",
                                      "--reviewer", reviewer], stderr=subprocess.PIPE, text=True, env=env, cwd=pairs.parent,
                                     preexec_fn=_sigint_at_its_default)
        self.lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"open (http://127\.0\.0\.1:\d+/\?token=[\w-]+)", line)
            if found:
                self.url = found[1]
                return
        self.proc.kill()
        raise AssertionError("cai review printed no address: " + "".join(self.lines))

    @property
    def base(self) -> str:
        return self.url.split("/?")[0]

    def kill(self) -> None:
        self.proc.kill()                # SIGKILL: no cleanup at all
        self.proc.wait(timeout=30)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, rest = self.proc.communicate(timeout=30)
        return rest


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    return page


def current_id(page) -> str:
    page.wait_for_selector("#pair-id")
    return page.text_content("#pair-id")


def press_and_advance(page, key: str) -> str:
    """Press a decision key on the pair shown; wait for the page to move on; the pair's id."""
    from playwright.sync_api import expect

    before = current_id(page)
    page.keyboard.press(key)
    expect(page.locator("#pair-id")).not_to_have_text(before)     # (the page's CSP forbids wait_for_function's eval)
    return before


def screenshot(page, name: str) -> None:
    folder = os.environ.get("CAI_REVIEW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def test_review_with_the_keyboard_reload_kill_resume_then_export(browser, tmp_path):
    from playwright.sync_api import expect

    pairs = make_pairs(tmp_path)
    decisions_file = Path(f"{pairs}.review.jsonl")
    served = Served(pairs)
    try:
        page = open_page(browser, served.url)
        assert page.text_content("#progress-text").startswith("0 / 10")
        decided = {}
        for key, kind in (("a", "accept"), ("r", "reject"), ("s", "swap"), ("t", "tie"), ("k", "skip")):
            if kind == "reject":            # a rationale first: c, type, Enter, then the decision's key
                page.keyboard.press("c")
                page.keyboard.type("too preachy")
                page.keyboard.press("Enter")
            decided[press_and_advance(page, key)] = kind
        # edit the chosen text: e opens the editor, Ctrl+Enter saves
        edited = current_id(page)
        page.keyboard.press("e")
        page.wait_for_selector("#edit-text")
        page.fill("#edit-text", "A kinder answer, edited in the browser.")
        page.keyboard.press("Control+Enter")
        expect(page.locator("#pair-id")).not_to_have_text(edited)
        decided[edited] = "edit"
        lines = read_jsonl(decisions_file)
        assert [(line["id"], line["decision"]) for line in lines] == list(decided.items())
        assert all(line["reviewer"] == "ana" for line in lines)
        assert next(line for line in lines if line["decision"] == "reject")["rationale"] == "too preachy"
        assert next(line for line in lines if line["decision"] == "edit")["chosen"] == "A kinder answer, edited in the browser."
        assert page.text_content("#progress-text").startswith("6 / 10")
        screenshot(page, "review-pair.png")

        # reload: the same pair, and every decision still there
        here = current_id(page)
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert current_id(page) == here
        page.keyboard.press("l")
        page.wait_for_selector("#list tbody tr")
        shown = {row.query_selector("td:nth-child(2)").text_content(): row.query_selector("td:nth-child(9)").text_content()
                 for row in page.query_selector_all("#list tbody tr")}
        assert {pair_id: shown[pair_id] for pair_id in decided} == {k: PAST[v] for k, v in decided.items()}
        assert sum(1 for text in shown.values() if text != "–") == 6
        screenshot(page, "review-list.png")
        page.click(f"#list tbody tr[data-n] >> text={edited}")
        page.wait_for_selector("#chosen-text")
        assert page.text_content("#chosen-text") == "A kinder answer, edited in the browser."
        assert "edited by ana" in page.text_content("#decision-badge")

        # one more decision, then the server is killed mid-review
        page.keyboard.press("ArrowRight")
        accepted = press_and_advance(page, "a")
        decided[accepted] = "accept"
        assert len(read_jsonl(decisions_file)) == 7
        served.kill()
        page.keyboard.press("a")
        expect(page.locator("#toast")).to_have_text(re.compile("^not saved"))
        assert len(read_jsonl(decisions_file)) == 7, "nothing claimed that was not written"
    finally:
        if served.proc.poll() is None:
            served.kill()

    # resume: a new server (new port, new token) opens at the first pair not reviewed
    served = Served(pairs, reviewer="bo")
    try:
        page = open_page(browser, served.url)
        assert page.text_content("#progress-text").startswith("7 / 10")
        order = [r["id"] for r in records(pairs)] + [r["id"] for r in records(f"{pairs}.filtered.jsonl")]
        assert current_id(page) == next(pair_id for pair_id in order if pair_id not in decided)
        assert page.dialogs == []
    finally:
        rest = served.stop()
    assert served.proc.returncode == 0, rest
    assert "7 decisions in" in rest
    assert not Path(f"{pairs}.lock").exists(), "the lock goes with the server"

    # export reflects every decision
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "cai", "export", str(pairs), "-f", "conversational", "-o", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 rejected and 1 tied dropped, 1 swapped, 1 edited, 2 accepted, 1 skipped" in proc.stderr
    before = {r["id"]: r for r in records(pairs)}
    after = {r["id"]: r for r in read_jsonl(out)}
    for pair_id, kind in decided.items():
        if kind in ("reject", "tie"):
            assert pair_id not in after
            continue
        record = after[pair_id]
        assert record["meta"]["review"]["decision"] == kind
        if kind == "swap":
            assert record["chosen"][0]["content"] == before[pair_id]["rejected"][0]["content"]
            assert record["rejected"][0]["content"] == before[pair_id]["chosen"][0]["content"]
        elif kind == "edit":
            assert record["chosen"][0]["content"] == "A kinder answer, edited in the browser."
        else:
            assert record["chosen"] == before[pair_id]["chosen"]
    assert set(after) == set(before) - {k for k, v in decided.items() if v in ("reject", "tie")}


def test_a_hostile_pair_renders_as_plain_text(browser, tmp_path):
    from playwright.sync_api import expect

    pairs = make_pairs(tmp_path)
    served = Served(pairs)
    try:
        n = [r["id"] for r in records(pairs)].index(HOSTILE_ID)
        page = open_page(browser, f"{served.url}#view=pair&n={n}")
        assert current_id(page) == HOSTILE_ID
        assert HOSTILE in page.text_content("#chosen")
        assert "Say </script> please" in page.text_content(".prompt")
        assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
        assert page.locator("script").count() == 1, "only the page's own script file"
        # the search box finds it by its text, and the list shows it as text too
        page.keyboard.press("/")
        page.keyboard.type("onerror")
        page.keyboard.press("Enter")
        page.keyboard.press("l")
        expect(page.locator("#list tbody tr")).to_have_count(1)
        assert page.text_content("#list tbody tr td:nth-child(2)") == HOSTILE_ID
        page.keyboard.press("Enter")
        page.wait_for_selector("#chosen")
        assert HOSTILE in page.text_content("#chosen")
        assert page.dialogs == [], "no script of the pair ran"
        assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    finally:
        served.stop()


def test_requests_without_the_token_are_refused(browser, tmp_path):
    pairs = make_pairs(tmp_path, hostile=False)
    served = Served(pairs)
    try:
        page = browser.new_page()
        for url in (f"{served.base}/", f"{served.base}/?token=wrong", f"{served.base}/api/summary",
                    f"{served.base}/static/app.js", f"{served.url.replace('token=', 'token=x')}"):
            response = page.goto(url)
            assert response.status == 403, url
            assert "forbidden" in page.text_content("body")
        status = page.evaluate("""async () => (await fetch('/api/decision', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({id: 'tea-0', decision: 'reject'})})).status""")
        assert status == 403
        assert not Path(f"{pairs}.review.jsonl").exists()
    finally:
        served.stop()
