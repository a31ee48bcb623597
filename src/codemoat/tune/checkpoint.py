"""Resuming `codemoat tune`: the run's state, written every minute to `$CODEMOAT_HOME/tune/`.

A checkpoint holds the LoRA weights, AdamW's moments, the position in the data (epoch and row:
the rows of an epoch are a function of the seed, so they are rebuilt, not stored), the steps,
tokens and training seconds so far, and the base's evaluation. It is keyed by everything that
shapes the run (base digest, repositories, output path, rank, alpha, learning rate, batch, context,
seed, steps or minutes, device), so only the same command picks it up; a run that completes removes
it. The file is private like everything in the data folder (0600 in a 0700 folder) and sealed to this
machine like an adapter (it holds weights trained on the customer's code), written to a temporary
name and renamed, so a kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from ..paths import home, make_private

EVERY_S = 60.0  # seconds of training between checkpoints
KIND = "codemoat-tune-checkpoint"


def key(opts, base_sha256: str, corpus=None) -> str:
    """`corpus` (tune.corpus.TuneCorpus): each repository's root and groups and every file's bytes are
    in the key, so a checkpoint trained on the code once indexed as "payments" is not resumed after
    that name is re-added over other code or given other groups, nor after the code changed."""
    shape = {
        "base": base_sha256,
        "repos": sorted(opts.repos),
        "out": str(Path(opts.out).expanduser().resolve()),
        "rank": opts.rank,
        "alpha": opts.alpha,
        "lr": opts.lr,
        "batch": opts.batch_size,
        "n_ctx": opts.n_ctx,
        "seed": opts.seed,
        "steps": opts.steps,
        "minutes": None if opts.steps else opts.minutes,
        "heldout": opts.heldout_fraction,
        "device": opts.device,
        "replay": opts.replay,
        "validation": [opts.val_fraction, opts.eval_every, opts.max_forgetting],
        "regularise": [opts.lora_dropout, opts.weight_decay, opts.ema, opts.kl],
        # the base's scores are kept in it, its infill score on `infill_lines` held-out lines among them
        "eval": [opts.eval_tokens, opts.old_eval_tokens, opts.infill_lines],
        "data": None if corpus is None else _data_digest(corpus),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:24]


def _data_digest(corpus) -> str:
    h = hashlib.sha256()
    for r in corpus.repos:
        h.update(json.dumps([r.name, str(r.root), sorted(r.groups)]).encode() + b"\0")
    for f in corpus.files:
        h.update(f.path.encode() + b"\0" + hashlib.sha256(f.text.encode()).digest())
    return h.hexdigest()


def path_for(k: str) -> Path:
    return _folder() / f"{k}.ckpt"


def _folder() -> Path:
    d = home() / "tune"
    d.mkdir(mode=0o700, exist_ok=True)
    make_private(d, "the tune checkpoint folder")  # one made before (or by hand) open to others
    return d


@contextmanager
def running(out: Path) -> Iterator[None]:
    """Held while a run writes `out`; a second run onto the same file is refused at once, in one line. Two at
    once (the same command started twice) trained side by side on one checkpoint, and the first to end
    removed it with the other's half-written temporary file, so the other failed when it next saved; the
    last to end replaced the first's adapter. A lock on an open file: a killed run holds it no longer.

    The lock file is removed when the run ends (one was left per `--out` ever tuned). A run that opened it just
    before it went locks a file no longer at that name, so a lock counts only if the name still leads to the
    locked file; otherwise it is taken again on the new one."""
    import fcntl

    k = hashlib.sha256(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:24]
    lock = _folder() / f"out-{k}.lock"
    for _ in range(8):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CodemoatError(f"another codemoat tune is writing {out} now: wait for it, or pass another --out") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # removed by the run that held it, after this one opened it
    else:
        raise CodemoatError(f"could not lock {lock}: it keeps being replaced")
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # while still locked: whoever opens the name next makes a new file
        except FileNotFoundError:
            pass
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def save(path: Path, lora: dict, optim: dict, state: dict[str, Any]) -> None:
    """Sealed to this machine like the adapter it becomes (engines.adapters: encrypted with a key
    wrapped to the machine key, signed), written to a temporary name and renamed."""
    import torch

    from ..engines.adapters import Adapter, seal_adapter

    buf = io.BytesIO()
    torch.save({"lora": lora, "optim": optim, "state": state}, buf)
    meta = {"name": f"tune-checkpoint-{path.stem}", "kind": KIND, "repos": [], "base": {"sha256": None}}
    seal_adapter(Adapter(meta, b"", buf.getvalue(), ""), path)
    os.chmod(path, 0o600)


def load(path: Path) -> dict | None:
    """The checkpoint at `path`, or None (none there, unreadable, not sealed here: the run starts over)."""
    import torch

    from ..engines.adapters import open_adapter

    if not path.is_file():
        return None
    try:
        a = open_adapter(path)
        if a.meta.get("kind") != KIND:
            return None
        return torch.load(io.BytesIO(a.safetensors), weights_only=True)
    except Exception:  # a damaged or foreign file: start over rather than fail
        return None


def remove(path: Path) -> None:
    # the sealer's temporary files: `.NAME.<random>.part` (before session 18: `NAME.part`), left by a killed run
    parts = [p for p in path.parent.glob(f".{path.name}.*.part") if p.is_file() and not p.is_symlink()]
    for p in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".part"), *parts):
        p.unlink(missing_ok=True)
