"""The update store's tidy-up (updates.store: `reconcile`, and each operation after its switch): staging
leftovers and bundles no state names are deleted, and the index's knowledge packs brought in line with the
state. Only what the state does not name goes: a crash at any step leaves a state that names complete
bundles only, so what is left beside it is a crash's, or a version no longer kept."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CodemoatError
from ..paths import fsync_dir
from . import packs

#: the state's SHA-256 of the license its last install switched in (license.lic.tmp of that digest is renamed in)
LICENSE_KEY = "license_sha256"

if TYPE_CHECKING:
    from .store import UpdateStore


def tidy(store: UpdateStore) -> list[str]:
    """Delete staging leftovers and bundles no state names, and index the packs the state names;
    returns what it did."""
    root = store.root
    did = []
    (root / "state.json.tmp").unlink(missing_ok=True)
    if _license_left(store):
        did.append("installed the license its switched install had not yet renamed in")
    staging = root / "staging"
    if staging.is_symlink():  # never emptied where it points (it was: every folder there deleted); only scratch
        staging.unlink()
        did.append("removed a link in place of the staging folder")
    elif staging.is_dir():
        for p in staging.iterdir():
            remove(p)
            did.append(f"removed unfinished install {p.name}")
    s = store.state()
    keep = {b for ch in s["channels"].values() for b in [ch.get("current"), *ch.get("history", [])] if b}
    bdir = root / "bundles"
    if bdir.is_symlink():  # its installed versions: not removed, and what it names is not emptied either
        raise CodemoatError(
            f"{bdir} is a symbolic link: codemoat keeps its installed bundles in that folder itself "
            "(and deletes what its state does not name there); put the folder back in its place"
        )
    if bdir.is_dir():
        for p in bdir.iterdir():
            if p.name not in keep:
                remove(p)
                did.append(f"removed bundle {p.name} no state names")
    for chan, ch in s["channels"].items():
        if not chan.startswith("knowledge-pack:"):
            continue
        name, cur = chan.split(":", 1)[1], ch.get("current")
        want = packs.source_root(s["bundles"][cur]) if cur else None
        if packs.indexed_root(name) != want:
            if cur:
                info = s["bundles"][cur]
                store._index_pack(cur, info, info.get("groups") or ["everyone"])
                did.append(f"re-indexed knowledge pack {name} {info['version']}")
            else:
                packs.remove_pack(name)
                did.append(f"removed knowledge pack {name} from the index")
    return did


def _license_left(store: UpdateStore) -> bool:
    """license.lic.tmp: renamed over license.lic when it is the license the state switched to (a crash between the
    state's rename and the license's: dropped, the new version served under the license before, which may not cover
    it); else deleted (an install that did not switch). True when renamed in."""
    tmp, lic = store.root / "license.lic.tmp", store.license_path
    if not tmp.is_file() or tmp.is_symlink():
        tmp.unlink(missing_ok=True)
        return False
    want = store.state().get(LICENSE_KEY)
    if want and hashlib.sha256(tmp.read_bytes()).hexdigest() == want:
        if lic.is_file() and not lic.is_symlink() and hashlib.sha256(lic.read_bytes()).hexdigest() == want:
            tmp.unlink()
            return False
        os.replace(tmp, lic)
        fsync_dir(store.root)
        return True
    tmp.unlink()
    return False


def remove(p: Path) -> None:
    """A staging or bundle folder's entry removed; a link (or a file) put there goes itself, what it names stays
    (rmtree refused the link silently, and `apply` then wrote the payload through it, outside the store)."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)
