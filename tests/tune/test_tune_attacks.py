"""An attacker's look at `codemoat tune`'s checkpoint: a pickle planted where the checkpoint goes
runs nothing; a checkpoint trained on the code once indexed under a name is not resumed after that
name is re-added over another team's code; the checkpoint folder is kept private."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from codemoat.index.store import SqliteIndex
from tests.tune.test_resume import Killed, _opts
from tests.tune.test_tune import PAY, _index


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('CODEMOAT_HOME', '/nonexistent')}/pwned",))


def test_a_planted_pickle_checkpoint_runs_no_code(tmp_path, home):
    """torch.load(weights_only=True): a crafted checkpoint (pickle → os.system) is refused as damaged."""
    import torch

    from codemoat.tune import checkpoint

    p = checkpoint.path_for(checkpoint.key(_opts(tmp_path / "pay.moat", tmp_path / "base.gguf"), "ab" * 32))
    torch.save({"lora": {}, "optim": {}, "state": _Boom()}, p)
    assert checkpoint.load(p) is None
    assert not (Path(home) / "pwned").exists()
    with open(p, "wb") as f:  # a bare pickle, not even torch's zip format
        pickle.dump(_Boom(), f)
    assert checkpoint.load(p) is None
    assert not (Path(home) / "pwned").exists()


def test_the_checkpoint_folder_is_made_private(home):
    """A tune/ folder left open to others (made by hand or by an old version) is closed, old checkpoints too."""
    from codemoat.tune import checkpoint

    d = Path(home) / "tune"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    old = d / "old.ckpt"
    old.write_bytes(b"x")
    os.chmod(old, 0o644)
    p = checkpoint.path_for("k" * 24)
    assert p.parent == d
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(old.stat().st_mode) == 0o600


OTHER = {
    "payments/ledger.py": "def post_entry(account: str, cents: int) -> None:\n    LEDGER[account] += cents\n" * 6,
    "payments/audit.py": "def audit_trail(entry_id: int) -> str:\n    return f'entry-{entry_id}'\n" * 6,
    "payments/rates.py": "RATE_TABLE = {'eur': 0.92, 'gbp': 0.79}\n" * 8,
}


@pytest.mark.slow
def test_a_checkpoint_is_not_resumed_over_other_code_under_the_same_name(tmp_path, tiny_gguf, home):
    """Weights trained on team A's "payments" must not end up in an adapter recorded as trained on
    the "payments" re-added over team B's code (and served by B's groups): the key holds the data."""
    from codemoat.tune.trainer import tune

    a = tmp_path / "a"
    a.mkdir()
    _index(a, "payments", PAY, ["team-a"])

    def kill_at_4(ev: dict) -> None:
        if ev["kind"] == "step" and ev["step"] == 4:
            raise Killed

    out = tmp_path / "pay.moat"
    with pytest.raises(Killed):
        tune(_opts(out, tiny_gguf), kill_at_4)
    assert len(list((Path(home) / "tune").glob("*.ckpt"))) == 1

    store = SqliteIndex()
    store.remove_repo("payments")
    store.close()
    b = tmp_path / "b"
    b.mkdir()
    _index(b, "payments", OTHER, ["team-b"])
    stages: list[str] = []
    res = tune(_opts(out, tiny_gguf), lambda ev: stages.append(ev.get("stage", "")))
    assert not any(s.startswith("resuming") for s in stages), stages
    assert res.meta["train"]["resumed_from_step"] is None
    assert res.meta["repos"] == [{"name": "payments", "groups": ["team-b"]}]

    # the positive side: the same data resumes (tests/tune/test_resume.py covers the whole run)
    from codemoat.tune import checkpoint
    from codemoat.tune.corpus import load_corpus

    o, c = _opts(out, tiny_gguf), load_corpus(["payments"])
    assert checkpoint.key(o, "ab" * 32, c) == checkpoint.key(o, "ab" * 32, load_corpus(["payments"]))


def test_the_checkpoint_is_sealed_to_this_machine(tmp_path, home, monkeypatch):
    """Weights trained on a team's code are not readable from the checkpoint file (a backup, a copied
    disk): it is encrypted like the adapter; one sealed elsewhere, or an adapter put in its place, is ignored."""
    import torch

    from codemoat.engines.adapters import seal_adapter
    from codemoat.tune import checkpoint
    from codemoat.vault.machine import MachineKey
    from tests.tune.test_seal import _adapter

    marker = torch.full((64,), 1234.5678)
    p = checkpoint.path_for("s" * 24)
    checkpoint.save(p, {"w": marker}, {}, {"step": 3})
    raw = p.read_bytes()
    assert marker.numpy().tobytes() not in raw and b"step" not in raw
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    got = checkpoint.load(p)
    assert got["state"]["step"] == 3 and torch.equal(got["lora"]["w"], marker)

    other = MachineKey.generate(facts={})
    with monkeypatch.context() as m:
        m.setattr(MachineKey, "load_or_create", lambda *a, **k: other)
        checkpoint.save(p, {"w": marker}, {}, {"step": 3})  # sealed with another machine's key
    assert checkpoint.load(p) is None
    seal_adapter(_adapter(), p)  # a real adapter of this machine is not a checkpoint
    assert checkpoint.load(p) is None
