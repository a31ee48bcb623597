"""The console in a real browser (headless Chromium, Selenium) against a real `codemoat serve`:
sign in, create a token and see it once, acceptance from scripted Tabby events on Overview, a
tampered audit row named on Audit, and the Costs chart following an input. Screenshots of each
page are saved in the test's temp folder and checked not to be blank."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from browser import chromium, distinct_colours, shot
from conftest import create_token, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path):
    d = chromium(tmp_path / "profile")
    yield d
    d.quit()


def click(d, element) -> None:
    """Click a button that submits a form, and wait for the next page to replace this one."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    old = d.find_element("tag name", "html")
    element.click()
    WebDriverWait(d, 60).until(ec.staleness_of(old))


def _sign_in(d, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    d.get(url + "/admin")
    assert d.current_url.endswith("/admin/signin")
    d.find_element(By.ID, "token").send_keys(token)
    click(d, d.find_element(By.ID, "signin"))
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
    assert d.find_element(By.ID, "acceptance").text == "25.0%"
    assert d.find_element(By.ID, "completions").text == "4"
    assert "python" in d.find_element(By.ID, "languages").text
    assert len(d.find_elements(By.CSS_SELECTOR, "svg.chart")) == 3
    shot(d, shots, "overview")
    d.set_window_size(800, 1000)  # readable narrow: nothing wider than the window
    assert d.execute_script("return document.documentElement.scrollWidth") <= 800
    shot(d, shots, "overview-800")
    d.set_window_size(1280, 1000)

    # People: create a token, see it once
    d.get(server.url + "/admin/people")
    d.find_element(By.ID, "token-name").send_keys("bob-laptop")
    d.find_element(By.ID, "token-user").send_keys("bob")
    click(d, d.find_element(By.ID, "create"))
    secret = d.find_element(By.ID, "new-token").text
    assert secret.startswith("cm_")
    assert httpx.get(server.url + "/v1/health", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    shot(d, shots, "people")
    d.get(server.url + "/admin/people")
    assert secret not in d.page_source and "bob-laptop" in d.find_element(By.ID, "tokens").text

    # Model and license, Repositories
    d.get(server.url + "/admin/model")
    assert d.find_element(By.ID, "model-id").text and "no" in d.find_element(By.ID, "sealed").text
    shot(d, shots, "model")
    # Repositories: re-index now, and the job page follows it to the end (it refreshes itself)
    d.get(server.url + "/admin/repositories")
    assert "svc" in d.find_element(By.ID, "repos").text
    shot(d, shots, "repositories")
    (repo / "new.py").write_text("def g():\n    return 1\n")
    click(d, d.find_element(By.ID, "reindex-1"))
    assert "/admin/repositories/jobs/" in d.current_url
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, 120, poll_frequency=0.5).until(lambda drv: drv.find_element(By.ID, "job-state").text.startswith("finished"))
    stats = d.find_element(By.ID, "job-stats").text
    assert "files\n41" in stats and "indexed\n1" in stats, stats
    shot(d, shots, "reindex")

    # Audit: OK, then a tampered row is named
    d.get(server.url + "/admin/audit")
    click(d, d.find_element(By.ID, "verify"))
    assert d.find_element(By.ID, "verify-result").text.startswith("OK")
    db = sqlite3.connect(home / "codemoat.db")
    seq = db.execute("SELECT seq FROM audit_records WHERE route = '/v1/events' ORDER BY seq LIMIT 1").fetchone()[0]
    db.execute("UPDATE audit_records SET status = 500 WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    click(d, d.find_element(By.ID, "verify"))
    assert d.find_element(By.ID, "verify-result").text.startswith(f"FAILED at record {seq}")
    shot(d, shots, "audit")

    # Costs: the chart, and an input that changes it
    d.get(server.url + "/admin/costs")
    chart_before = d.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("innerHTML")
    monthly_before = d.find_element(By.ID, "onprem-monthly").text
    shot(d, shots, "costs")
    box = d.find_element(By.ID, "in-server_price")
    box.clear()
    box.send_keys("90000")
    click(d, d.find_element(By.ID, "recompute"))
    assert "server_price=90000" in d.current_url
    assert d.find_element(By.ID, "onprem-monthly").text != monthly_before
    assert d.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("innerHTML") != chart_before
    shot(d, shots, "costs-changed")

    # sign out: the pages are gone
    click(d, d.find_element(By.CSS_SELECTOR, "form.signout button"))
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
