"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, offline: the
flags keep Chromium from reaching the internet; a fresh profile per browser."""

from __future__ import annotations

import secrets
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
)


def chromium(profile: Path, width: int = 1280, height: int = 1000):
    """A Selenium driver for the system Chromium; the test is skipped (with the reason) only when it is not installed."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium and chromium-driver are not installed (Debian packages; .ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    d = webdriver.Chrome(options=opts, service=Service(driver))
    d.set_page_load_timeout(60)
    return d


def distinct_colours(png: bytes, limit: int = 10_000) -> int:
    """How many different pixel values a PNG holds (8-bit RGB/RGBA, as Chromium writes): 1 for a blank page."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, ctype = 8, b"", 0, 6
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos : pos + 8])
        body = png[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, ctype = struct.unpack(">I", body[:4])[0], body[9]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 4 if ctype == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    seen: set[bytes] = set()
    for y in range(len(raw) // (stride + 1)):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG filter (RFC 2083, 6.2-6.6)
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if y % 8 == 0:
            seen.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 4))
            if len(seen) >= limit:
                break
        prev = line
    return len(seen)


def shot(driver, folder: Path, name: str) -> Path:
    """Save a screenshot and check it is not blank."""
    p = folder / f"{name}.png"
    png = driver.get_screenshot_as_png()
    p.write_bytes(png)
    assert distinct_colours(png) > 20, f"{p} looks blank"
    return p


# Chromium answers these when an element found a moment ago belongs to a document that has since
# been replaced (a navigation still finishing, a refresh): nothing was clicked or typed, so find
# the element again by its locator and retry, until a deadline.
_GONE = ("does not belong to the document", "stale element", "not attached to the page", "no such element")


def _gone(exc: Exception) -> bool:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    return isinstance(exc, StaleElementReferenceException | NoSuchElementException) or any(s in str(exc).lower() for s in _GONE)


def settle(driver, deadline: float) -> None:
    """Wait until the current document has finished loading."""
    from selenium.common.exceptions import WebDriverException

    while True:
        try:
            if driver.execute_script("return document.readyState") == "complete":
                return
        except WebDriverException:  # between two documents
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{driver.current_url} did not finish loading")
        time.sleep(0.1)


def _retry(driver, action, timeout: float):
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        settle(driver, deadline)
        try:
            return action()
        except WebDriverException as e:
            if not _gone(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def fill(driver, locator: tuple[str, str], text: str, timeout: float = 60) -> None:
    """Type into a field found by locator (found again if the page was replaced meanwhile)."""

    def act():
        box = driver.find_element(*locator)
        box.clear()
        box.send_keys(text)

    _retry(driver, act, timeout)


def submit(driver, locator: tuple[str, str], timeout: float = 60) -> None:
    """Click the button at locator, which submits a form, and wait until the page it leads to has
    loaded. The current document is marked first; the wait ends when a loaded document without the
    mark is there, so a page replaced before the click is neither mistaken for the answer nor
    clicked in (the element is found again and clicked then)."""
    from selenium.common.exceptions import WebDriverException

    mark = secrets.token_hex(8)

    def act():
        button = driver.find_element(*locator)
        # marked after the find: a document replaced in between makes the click fail, and retry
        driver.execute_script("window.__codemoatMark = arguments[0]", mark)
        button.click()

    _retry(driver, act, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if driver.execute_script("return document.readyState === 'complete' && window.__codemoatMark !== arguments[0]", mark):
                return
        except WebDriverException:  # between two documents
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"clicking {locator} on {driver.current_url} led to no new page")
        time.sleep(0.1)


def text_of(driver, locator: tuple[str, str], timeout: float = 60) -> str:
    """The text of an element found by locator (found again if the page refreshed meanwhile)."""
    return _retry(driver, lambda: driver.find_element(*locator).text, timeout)
