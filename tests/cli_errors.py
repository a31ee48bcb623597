"""`one_line_error(p)`: what a user-caused CLI failure must look like (CONTRIBUTING: one line, exit 1, no traceback).
Every test folder can import it (`tests/` is on the path)."""

from __future__ import annotations

import subprocess


def one_line_error(p: subprocess.CompletedProcess, needle: str = "", code: int = 1) -> str:
    """Assert a clean CLI failure: exit `code`, one line on stderr starting "error:" and holding `needle`, no
    traceback or rich panel; returns that line."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout and "╭" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    return lines[0]
