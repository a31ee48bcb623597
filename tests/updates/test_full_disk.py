"""`update apply --license NEW` on a full disk. Before, the new state was switched in first and the license
written after it: a disk that filled up between the two left the new version current (pending, handed to no
serve) under the license before, while `apply` reported a failure. Now the license is written (the part that
needs space) before the switch and renamed in after it, and a full disk before the switch installs nothing:
one line, the version before current, its license kept, no leftovers. The full disk is the kernel's:
RLIMIT_FSIZE in a child process (writes past it fail with EFBIG), above the model's size, below the license's."""

from __future__ import annotations

import json
import subprocess
import sys

APPLY = """
import resource, signal, sys
from pathlib import Path
from codemoat.errors import CodemoatError
from codemoat.updates.store import UpdateStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal that ends the process
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    UpdateStore().apply(Path(sys.argv[1]), Path(sys.argv[2]))
except CodemoatError as e:
    print(e)
    sys.exit(1)
"""


def _apply_with_room(bundle, lic, room: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", APPLY, str(bundle), str(lic), str(room)], capture_output=True, text=True, timeout=300
    )


def test_a_full_disk_while_recording_the_license_installs_nothing(shop, store, tmp_path):
    lic1 = shop.license()
    v1 = store.apply(shop.release("1"), lic1)
    before = store.license_path.read_bytes()
    bundle = shop.release("2")
    doc = json.loads(shop.license().read_text())
    big = tmp_path / "padded.lic"  # the same license, padded with whitespace past the child's file-size limit
    big.write_text(json.dumps(doc) + " " * (3 << 20))
    room = 2 << 20
    assert (store.root / "bundles" / v1["bundle_id"] / "model.moat").stat().st_size < room  # the model fits

    r = _apply_with_room(bundle, big, room)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "File too large" in r.stdout and "nothing was installed" in r.stdout, r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
    cur = store.current("model")
    assert cur["bundle_id"] == v1["bundle_id"] and cur["version"] == "1"  # not switched
    assert store.license_path.read_bytes() == before
    assert not (store.root / "license.lic.tmp").exists()
    assert [p.name for p in (store.root / "bundles").iterdir()] == [v1["bundle_id"]]  # its space freed
    assert store.reconcile() == []  # nothing left to repair

    # the positive: with room, the same apply installs 2 and records its license
    r = _apply_with_room(bundle, big, 64 << 20)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert store.current("model")["version"] == "2"
    assert store.license_path.read_bytes() == big.read_bytes()
