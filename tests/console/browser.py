"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, offline: the
flags keep Chromium from reaching the internet; a fresh profile per browser."""

from __future__ import annotations

import shutil
import struct
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
