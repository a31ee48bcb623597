"""A micro model for tests: a tokenizer and a few training steps on a few stdlib modules, in seconds.

from codemoat.train.micro import build_micro_gguf
path = build_micro_gguf(tmp_path)          # tmp_path/micro.gguf, and tmp_path/micro.hf/
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def micro_corpus(out_dir: Path) -> Path:
    """A small corpus folder (json + a few stdlib modules) copied under `out_dir`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = Path(out_dir) / "micro-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for rel in (
        "json/__init__.py",
        "json/decoder.py",
        "json/encoder.py",
        "json/scanner.py",
        "textwrap.py",
        "colorsys.py",
        "bisect.py",
        "heapq.py",
    ):
        src = stdlib / rel
        if src.exists():
            dst = corpus / rel.replace("/", "_")
            dst.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return corpus


def build_micro_gguf(out_dir: Path, seed: int = 0, *, steps: int = 30, ftype: str = "f32", threads: int = 1) -> Path:
    """Train a micro tokenizer and model for `steps` steps; return the GGUF path (HF folder beside it)."""
    from .trainer import TrainOptions, train

    out_dir = Path(out_dir)
    opts = TrainOptions(
        corpus=[micro_corpus(out_dir)],
        out=out_dir / "micro.gguf",
        size="micro",
        steps=steps,
        seed=seed,
        lr=3e-3,
        warmup_steps=5,
        heldout_fraction=0.0,
        threads=threads,
        precision="fp32",
        checkpoint_minutes=1e9,
        name="codemoat-micro",
        ftype=ftype,
    )
    return train(opts).gguf
