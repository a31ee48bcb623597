"""vaultd bench: load to first token through `codemoat vaultd` (model already decrypted) vs plaintext vs sealed.

    .venv/bin/python bench/vaultd.py                # 0.25 GiB model, 3 runs each
    .venv/bin/python bench/vaultd.py --gib 1 --runs 5

One process, alternating runs: `open_model` of the plaintext GGUF (llama.cpp maps the page cache),
of the sealed .moat + .lic (license checks, decryption into a fresh memfd), and with
`vault.socket` set (fetch the memfd that a VaultDaemon in this process decrypted once, over the
real unix socket with SCM_RIGHTS), each to its first generated token, inline engine. Also vaultd's
one-time decryption. Medians side by side; writes bench/results/vaultd.md. Not measured here: two
replicas' resident memory, overlapping decryption with llama.cpp's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))  # before tests/: bench/vault.py, not the tests/vault package
WORK = Path(os.environ.get("VAULTD_BENCH_DIR", "/tmp/codemoat-bench-vaultd"))
os.environ["VAULT_BENCH_DIR"] = str(WORK)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from vault import build_model, log, warm  # bench/vault.py (sets CODEMOAT_HOME under WORK)

    from codemoat.cli.vaultd_cmd import open_models
    from codemoat.config import load_settings
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.loader import open_model
    from codemoat.engines.memfd import shmem_thp_mode
    from codemoat.vault.daemon import VaultDaemon
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor

    WORK.mkdir(parents=True, exist_ok=True)
    model = build_model(WORK / f"model-{args.gib:g}g.gguf", args.gib)
    vdir = WORK / "vendor"
    vendor = Vendor.open(vdir) if (vdir / "vendor.json").exists() else Vendor.init(vdir)
    machine = MachineKey.load_or_create()
    moat = WORK / f"model-{args.gib:g}g.moat"
    if not moat.exists():
        vendor.seal(model, "bench", moat)
    doc = vendor.issue_license(customer="bench", model=moat, machines=[machine.identity()],
                               expires=int(time.time()) + 86400, watermark=False)
    lic = WORK / "bench.lic"
    lic.write_text(json.dumps(doc))
    vendor.close()
    warm(model)
    warm(moat)
    base = {"model.n_ctx": 256, "model.n_threads": 2, "model.isolation": "inline"}
    params = SamplingParams(max_tokens=1, temperature=0.0)

    daemon = VaultDaemon(WORK / "vault.sock", allow_uids={os.getuid()})
    t = time.perf_counter()
    holders = open_models([moat], [lic], daemon, load_settings(**base))
    vaultd_decrypt_s = time.perf_counter() - t
    daemon.start()
    model_id = holders[0].model_id
    kinds = {
        "plaintext": load_settings(**base, **{"model.path": str(model)}),
        "sealed (serve decrypts)": load_settings(**base, **{"model.path": str(moat), "model.license": str(lic)}),
        "through vaultd": load_settings(**base, **{"vault.socket": f"unix:{daemon.path}", "model.id": model_id}),
    }
    rows: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.runs):
        for name, settings in kinds.items():
            t = time.perf_counter()
            holder = open_model(settings)
            asyncio.run(holder.get().complete("def", params))
            rows[name].append(time.perf_counter() - t)
            holder.close()
        log(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()))
    for h in holders:
        h.close()
    daemon.close()

    plain, plain_best = statistics.median(rows["plaintext"]), min(rows["plaintext"])
    size = model.stat().st_size
    lines = [
        "# vaultd: load to first token through the vault daemon",
        "",
        f"`.venv/bin/python bench/vaultd.py --gib {args.gib:g} --runs {args.runs}` on {time.strftime('%Y-%m-%d')}: "
        f"{size / (1 << 30):.2f} GiB F32 GGUF, inline llama.cpp engine, n_threads 2, shmem_enabled={shmem_thp_mode()}, "
        f"load average {os.getloadavg()[0]:.1f} (shared 2-core machine).",
        "",
        "| load | median s | vs plaintext | best s | best vs plaintext's best | runs (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in rows.items():
        m = statistics.median(v)
        lines.append(f"| {name} | {m:.3f} | {m / plain:.2f}x | {min(v):.3f} | {min(v) / plain_best:.2f}x | "
                     f"{', '.join(f'{x:.3f}' for x in v)} |")
    lines += ["", f"vaultd's one-time decryption and license check (before any serve): {vaultd_decrypt_s:.3f} s.",
              "", "Through vaultd no serve start decrypts; what remains is llama.cpp faulting in the memfd's "
              "pages to the first token. Timings on this shared machine swing by several times from run to run "
              "(other work on the 2 cores): read the best column beside the median.", ""]
    out = ROOT / "bench" / "results" / "vaultd.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
