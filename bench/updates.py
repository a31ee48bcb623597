"""What installing an update costs: `update verify` + `update apply` of a model bundle vs a plain copy, one run.

A GGUF-shaped file of --size-mib random bytes (incompressible, like quantised weights) is sealed and
released as a model bundle; then, alternating round by round so that other work on the machine
hits all alike (all from the page cache, as the bundle is after being copied off the media):
- copy: `shutil.copyfile` of the bundle (sendfile in the kernel: the floor);
- apply: `UpdateStore.apply` (signature, license, support window and version checks, the payload
  copied and SHA-256-hashed in one pass, fsynced, the installed model's license checked, the
  rename-based switch), then uninstalled again for the next round;
- verify+apply: `UpdateStore.verify` (a full read and hash) and then `apply`.
Results go to bench/results/updates.md (target: verify+apply / copy <= 1.5).
Usage: .venv/bin/python bench/updates.py [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-updates-"))
    os.environ["CODEMOAT_HOME"] = str(work / "home")
    from codemoat.updates.release import release
    from codemoat.updates.store import UpdateStore
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor

    try:
        model = work / "big.gguf"
        with open(model, "wb") as f:
            f.write(b"GGUF")
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        machine = MachineKey.load_or_create()
        v = Vendor.init(work / "vendor")
        moat = work / "v1.moat"
        v.seal(model, "acme", moat)
        doc = v.issue_license(customer="acme", model=moat, machines=[machine.identity()], expires=int(time.time()) + 86400)
        lic = work / "acme.lic"
        import json

        lic.write_text(json.dumps(doc))
        t = time.perf_counter()
        bundle = work / "v2.moatpkg"
        release(v, customer="acme", kind="model", source=model, version="2", out=bundle)
        t_release = time.perf_counter() - t
        v.close()
        model.unlink()
        moat.unlink()
        size = bundle.stat().st_size
        times: dict[str, list[float]] = {"copy": [], "apply": [], "verify+apply": []}
        for _ in range(args.rounds):
            for mode in times:
                store = UpdateStore(machine=machine)
                if store.state_path.exists():
                    shutil.rmtree(store.root)
                    store = UpdateStore(machine=machine)
                t = time.perf_counter()
                if mode == "copy":
                    shutil.copyfile(bundle, work / "copy.moatpkg")
                    with open(work / "copy.moatpkg", "rb+") as f:
                        os.fsync(f.fileno())  # apply fsyncs what it writes; so does the copy
                else:
                    if mode == "verify+apply":
                        store.verify(bundle, lic)
                    store.apply(bundle, lic)
                times[mode].append(time.perf_counter() - t)
                (work / "copy.moatpkg").unlink(missing_ok=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        lines = [
            "# Update install cost: verify + apply of a model bundle vs a plain copy",
            "",
            f"`.venv/bin/python bench/updates.py --size-mib {args.size_mib} --rounds {args.rounds}` on "
            f"{os.cpu_count()} CPUs (shared), one run, modes interleaved; bundle {size / 2**30:.2f} GiB, page cache warm.",
            "",
            "| mode | median s | GiB/s | vs copy |",
            "| --- | --- | --- | --- |",
        ]
        for k, s in med.items():
            lines.append(f"| {k} | {s:.2f} | {size / 2**30 / s:.2f} | {s / med['copy']:.2f}x |")
        lines += ["", f"All rounds (s): {', '.join(f'{k}: ' + ' '.join(f'{x:.2f}' for x in v) for k, v in times.items())}.",
                  f"Vendor side, for reference: `vendor release` (seal + license + bundle) took {t_release:.1f} s.",
                  "",
                  "apply reads the bundle once: the payload is written to the store while a second thread hashes",
                  "the block just read (SHA-256 against the signed digest), then fsynced; verify is a separate full",
                  "read and hash. The target is verify+apply / copy <= 1.5."]
        out = ROOT / "bench" / "results" / "updates.md"
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
