"""The console in a real browser (headless Chromium, Selenium) against a real `codemoat serve`:
sign in, create a token and see it once, acceptance from scripted Tabby events on Overview, a
tampered audit row named on Audit, and the Costs chart following an input. Screenshots of each
page are saved in the test's temp folder and checked not to be blank."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
from browser import chromium, distinct_colours, fill, settle, shot, submit, text_of
from conftest import create_token, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path):
    d = chromium(tmp_path / "profile")
    yield d
    d.quit()


def _sign_in(d, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    d.get(url + "/admin")
    assert d.current_url.endswith("/admin/signin")
    fill(d, (By.ID, "token"), token)
    submit(d, (By.ID, "signin"))
    assert d.current_url.endswith("/admin"), d.page_source[:500]


def test_console_in_a_browser(serve_process, tiny_gguf, browser, tmp_path, home):
    from selenium.webdriver.common.by import By

    repo = tmp_path / "svc"
    repo.mkdir()
    for k in range(40):
        (repo / f"m{k}.py").write_text(f"def f{k}(x):\n    return x + {k}\n")
    assert run_cli("index", "add", str(repo), "--name", "svc").returncode == 0
    admin = create_token("--name", "root", "--user", "root", "--scopes", "admin")
    dev = create_token("--name", "ann", "--user", "ann", "--scopes", "complete")
    server = serve_process(["--model", str(tiny_gguf)])
    shots = tmp_path / "shots"
    shots.mkdir()
    # scripted Tabby traffic: 4 completions viewed, 1 selected -> 25% acceptance
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {dev}"}) as c:
        for k in range(4):
            r = c.post(
                "/v1/completions",
                json={"language": "python", "segments": {"prefix": f"def f{k}():\n    return ", "suffix": "\n"}},
            )
            assert r.status_code == 200, r.text
            assert (
                c.post("/v1/events", json={"type": "view", "completion_id": r.json()["id"], "choice_index": 0}).status_code == 200
            )
            if k == 0:
                assert (
                    c.post("/v1/events", json={"type": "select", "completion_id": r.json()["id"], "choice_index": 0}).status_code
                    == 200
                )
    d = browser
    d.get(server.url + "/admin/signin")
    shot(d, shots, "signin")
    _sign_in(d, server.url, admin)
    assert text_of(d, (By.ID, "acceptance")) == "25.0%"
    assert text_of(d, (By.ID, "completions")) == "4"
    assert "python" in text_of(d, (By.ID, "languages"))
    assert len(d.find_elements(By.CSS_SELECTOR, "svg.chart")) == 3
    shot(d, shots, "overview")
    d.set_window_size(800, 1000)  # readable narrow: nothing wider than the window
    assert d.execute_script("return document.documentElement.scrollWidth") <= 800
    shot(d, shots, "overview-800")
    d.set_window_size(1280, 1000)

    # People: create a token, see it once
    d.get(server.url + "/admin/people")
    fill(d, (By.ID, "token-name"), "bob-laptop")
    fill(d, (By.ID, "token-user"), "bob")
    submit(d, (By.ID, "create"))
    secret = text_of(d, (By.ID, "new-token"))
    assert secret.startswith("cm_")
    assert httpx.get(server.url + "/v1/health", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    shot(d, shots, "people")
    d.get(server.url + "/admin/people")
    assert secret not in d.page_source and "bob-laptop" in text_of(d, (By.ID, "tokens"))

    # Model and license, Repositories
    d.get(server.url + "/admin/model")
    assert text_of(d, (By.ID, "model-id")) and "no" in text_of(d, (By.ID, "sealed"))
    shot(d, shots, "model")
    # Repositories: re-index now, and the job page follows it to the end (it refreshes itself)
    d.get(server.url + "/admin/repositories")
    assert "svc" in text_of(d, (By.ID, "repos"))
    shot(d, shots, "repositories")
    (repo / "new.py").write_text("def g():\n    return 1\n")
    submit(d, (By.ID, "reindex-1"))
    assert "/admin/repositories/jobs/" in d.current_url
    # the job page reloads itself every second while running: each read finds the element again
    deadline = time.monotonic() + 120
    while not text_of(d, (By.ID, "job-state")).startswith("finished"):
        assert time.monotonic() < deadline, text_of(d, (By.ID, "job-state"))
        time.sleep(0.5)
    settle(d, time.monotonic() + 60)
    stats = text_of(d, (By.ID, "job-stats"))
    assert "files\n41" in stats and "indexed\n1" in stats, stats
    shot(d, shots, "reindex")

    # Audit: OK, then a tampered row is named
    d.get(server.url + "/admin/audit")
    submit(d, (By.ID, "verify"))
    assert text_of(d, (By.ID, "verify-result")).startswith("OK")
    db = sqlite3.connect(home / "codemoat.db")
    seq = db.execute("SELECT seq FROM audit_records WHERE route = '/v1/events' ORDER BY seq LIMIT 1").fetchone()[0]
    db.execute("UPDATE audit_records SET status = 500 WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    submit(d, (By.ID, "verify"))
    assert text_of(d, (By.ID, "verify-result")).startswith(f"FAILED at record {seq}")
    shot(d, shots, "audit")

    # Costs: the chart, and an input that changes it
    d.get(server.url + "/admin/costs")
    chart_before = d.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("innerHTML")
    monthly_before = text_of(d, (By.ID, "onprem-monthly"))
    shot(d, shots, "costs")
    fill(d, (By.ID, "in-server_price"), "90000")
    submit(d, (By.ID, "recompute"))
    assert "server_price=90000" in d.current_url
    assert text_of(d, (By.ID, "onprem-monthly")) != monthly_before
    assert d.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("innerHTML") != chart_before
    shot(d, shots, "costs-changed")

    # sign out: the pages are gone
    submit(d, (By.CSS_SELECTOR, "form.signout button"))
    d.get(server.url + "/admin/people")
    assert d.current_url.endswith("/admin/signin")
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}.png"
        for n in (
            "signin",
            "overview",
            "overview-800",
            "people",
            "model",
            "repositories",
            "reindex",
            "audit",
            "costs",
            "costs-changed",
        )
    )


def test_blank_detector_sees_a_blank_page(browser, tmp_path):
    """The screenshot check can fail: an empty page is one colour."""
    browser.get("about:blank")
    assert distinct_colours(browser.get_screenshot_as_png()) <= 2


@pytest.fixture
def two_pages():
    """Two pages on 127.0.0.1: /a holds a form that leads to /b."""
    import http.server

    from localhttp import LocalHTTP

    class Pages(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/a"):
                body = b"<html><body><form action='/b'><button id='go'>go</button></form></body></html>"
            else:
                body = b"<html><body><p id='done'>b</p></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with LocalHTTP(Pages) as srv:
        yield srv.url


def _replace_document(d) -> None:
    """Replace the current document with a fresh load of the same page, and wait for it."""
    d.execute_script("location.replace(location.pathname + '?again')")
    deadline = time.monotonic() + 30
    while not d.current_url.endswith("?again"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    settle(d, deadline)


class ReplacedAfterFind:
    """A driver whose first find_element is followed by the document being replaced: the race CI
    met, made to happen every time."""

    def __init__(self, driver):
        self._d, self.finds = driver, 0

    def find_element(self, *locator):
        element = self._d.find_element(*locator)
        self.finds += 1
        if self.finds == 1:
            _replace_document(self._d)
        return element

    def __getattr__(self, name):
        return getattr(self._d, name)


def test_submit_finds_the_button_again_when_the_document_was_replaced(browser, two_pages):
    """A button found, then its document replaced before the click: a plain click on the element
    fails (what the old helper did); `submit` finds it again by its locator and lands on /b."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    d = browser
    d.get(two_pages + "/a")
    old = d.find_element(By.ID, "go")
    _replace_document(d)
    with pytest.raises(WebDriverException):
        old.click()
    d.get(two_pages + "/a")
    racy = ReplacedAfterFind(d)
    submit(racy, (By.ID, "go"))
    assert racy.finds == 2  # the first element was gone: found again, then clicked
    assert d.current_url.startswith(two_pages + "/b")
    assert text_of(d, (By.ID, "done")) == "b"
