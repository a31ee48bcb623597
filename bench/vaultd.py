"""vaultd bench: load to first token through `codemoat vaultd` (model already decrypted) vs plaintext vs sealed.

    .venv/bin/python bench/vaultd.py                # 0.25 GiB model, 3 runs each
    .venv/bin/python bench/vaultd.py --gib 1 --runs 5
    .venv/bin/python bench/vaultd.py --model /tmp/models/gemma-3-270m-q4_k_m.gguf --runs 9

One process, alternating runs: `open_model` of the plaintext GGUF (llama.cpp maps the page cache),
of the sealed .moat + .lic (license checks, decryption into a fresh memfd), and with
`vault.socket` set (fetch the memfd that a VaultDaemon in this process decrypted once, over the
real unix socket with SCM_RIGHTS), each to its first generated token, inline engine. Also vaultd's
one-time decryption, and the memory of two real `serve` replicas (sealed: each decrypts; through a
real `codemoat vaultd`: one memfd shared). Writes its sections of bench/results/vaultd.md (one per
model; sections of other models and other authors are kept). Overlapping decryption with
llama.cpp's load (`vault.overlap_load`) is measured by bench/vault.py.
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
from _results import write  # noqa: E402

WORK = Path(os.environ.get("VAULTD_BENCH_DIR", "/tmp/codemoat-bench-vaultd"))
os.environ["VAULT_BENCH_DIR"] = str(WORK)


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of `pid` and all its descendants (PSS splits shared pages between sharers)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


def bench_replicas(moat: Path, lic: Path, model_id: str, label: str) -> list[str]:
    """Two real `codemoat serve` replicas, each after one completion: sealed (each decrypts) vs through vaultd."""
    import subprocess

    import httpx

    from codemoat.engines.loader import open_model  # noqa: F401  (same import cost as the serves)

    cli = [sys.executable, "-m", "codemoat.cli.main"]
    env = dict(os.environ, CODEMOAT_MODEL__N_CTX="256", CODEMOAT_MODEL__N_THREADS="1")
    token = json.loads(
        subprocess.run(
            [*cli, "tokens", "create", "--name", "bench", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )["token"]

    def port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def replicas(args: list[str], extra: list[subprocess.Popen]) -> tuple[int, int]:
        procs = []
        try:
            for _ in range(2):
                p = port()
                procs.append(
                    (
                        subprocess.Popen(
                            [*cli, "serve", *args, "--port", str(p)],
                            env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        ),
                        p,
                    )
                )
            for proc, p in procs:
                for _ in range(600):
                    try:
                        if httpx.get(f"http://127.0.0.1:{p}/health", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                r = httpx.post(
                    f"http://127.0.0.1:{p}/v1/completions",
                    timeout=120,
                    headers={"Authorization": f"Bearer {token}"},
                    json={"model": model_id, "prompt": "def", "max_tokens": 2},
                )
                assert r.status_code == 200, r.text
            totals = [tree_memory(x.pid) for x in [*(q for q, _ in procs), *extra]]
            return sum(t[0] for t in totals), sum(t[1] for t in totals)
        finally:
            for proc, _ in procs:
                proc.terminate()
                proc.wait(timeout=60)

    sealed = replicas(["--model", str(moat), "--license", str(lic)], [])
    sock = WORK / "vaultd-replicas.sock"
    vd = subprocess.Popen(
        [
            *cli,
            "vaultd",
            "--socket",
            f"unix:{sock}",
            "--model",
            str(moat),
            "--license",
            str(lic),
            "--allow-uid",
            str(os.getuid()),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not sock.is_socket():
            time.sleep(0.1)
        vaulted = replicas(["--vault", f"unix:{sock}", "--model", model_id], [vd])
    finally:
        vd.terminate()
        vd.wait(timeout=60)
    g = 1 << 20
    return [
        "",
        f"## Two serve replicas on one host: memory after one completion each ({label})",
        "",
        "| setup | PSS of all processes (MiB) | RSS summed (MiB) |",
        "| --- | --- | --- |",
        f"| 2 x `serve --model X.moat` (each decrypts its own memfd) | {sealed[0] / g:.0f} | {sealed[1] / g:.0f} |",
        f"| vaultd + 2 x `serve --vault` (one memfd, shared) | {vaulted[0] / g:.0f} | {vaulted[1] / g:.0f} |",
        "",
        "PSS counts a shared page once across its sharers; RSS counts it in every process that maps it.",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=0.25, help="size of the synthetic F32 GGUF (without --model)")
    ap.add_argument("--model", type=Path, help="a real GGUF to seal and load instead (e.g. Gemma 3 270M)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1: less swayed by other work on the cores)")
    ap.add_argument("--no-replicas", action="store_true", help="skip the two-replica memory measurement")
    ap.add_argument(
        "--shmem-thp",
        metavar="MODE",
        help="set the kernel's shmem huge-page policy (e.g. advise) for the run, then put it back (root)",
    )
    args = ap.parse_args()
    from vault import ShmemPolicy  # bench/vault.py (sets CODEMOAT_HOME under WORK)

    if args.shmem_thp:
        with ShmemPolicy(args.shmem_thp):
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    from vault import build_model, log, warm

    from codemoat.cli.vaultd_cmd import open_models
    from codemoat.config import load_settings
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.loader import open_model
    from codemoat.engines.memfd import shmem_thp_mode
    from codemoat.vault.daemon import VaultDaemon
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor

    WORK.mkdir(parents=True, exist_ok=True)
    if args.model is not None:
        model = args.model.resolve()
        if not model.is_file():
            raise SystemExit(f"error: --model {args.model}: no such GGUF file")
        label, stem = f"{model.name}, {model.stat().st_size / (1 << 20):.0f} MiB", model.stem
    else:
        model = build_model(WORK / f"model-{args.gib:g}g.gguf", args.gib)
        label, stem = f"{model.stat().st_size / (1 << 30):.2f} GiB F32 GGUF", f"model-{args.gib:g}g"
    what = label  # the model; the heading also names what differs from the defaults
    if args.shmem_thp:
        label += f", shmem_enabled={args.shmem_thp}"
    replicas_label = label  # the replicas run one llama.cpp thread each, whatever --threads says
    if args.threads != 2:
        label += f", {args.threads} llama.cpp thread{'s' if args.threads > 1 else ''}"
    vdir = WORK / "vendor"
    vendor = Vendor.open(vdir) if (vdir / "vendor.json").exists() else Vendor.init(vdir)
    machine = MachineKey.load_or_create()
    moat = WORK / f"{stem}.moat"
    if not moat.exists():
        vendor.seal(model, "bench", moat)
    doc = vendor.issue_license(
        customer="bench", model=moat, machines=[machine.identity()], expires=int(time.time()) + 86400, watermark=False
    )
    lic = WORK / f"{stem}.lic"
    lic.write_text(json.dumps(doc))
    vendor.close()
    warm(model)
    warm(moat)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    base = {"model.n_ctx": 256, "model.n_threads": args.threads, "model.isolation": "inline"}
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
    how = f"--model {args.model}" if args.model is not None else f"--gib {args.gib:g}"
    how += f" --shmem-thp {args.shmem_thp}" if args.shmem_thp else ""
    how += f" --threads {args.threads}" if args.threads != 2 else ""
    lines = [
        f"## Load to first token ({label})",
        "",
        f"`.venv/bin/python bench/vaultd.py {how} --runs {args.runs}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{what}, inline llama.cpp engine, n_threads {args.threads}, shmem_enabled={shmem_thp_mode()}, "
        f"load average {load_before} before, {os.getloadavg()[0]:.1f} after (shared 2-core machine).",
        "",
        "| load | median s | vs plaintext | best s | best vs plaintext's best | median of per-run ratios | runs (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in rows.items():
        m = statistics.median(v)
        paired = statistics.median(x / p for x, p in zip(v, rows["plaintext"]))  # same run, side by side
        lines.append(
            f"| {name} | {m:.3f} | {m / plain:.2f}x | {min(v):.3f} | {min(v) / plain_best:.2f}x | {paired:.2f}x | "
            f"{', '.join(f'{x:.3f}' for x in v)} |"
        )
    lines += [
        "",
        f"vaultd's one-time decryption and license check (before any serve): {vaultd_decrypt_s:.3f} s.",
        "",
        "Through vaultd no serve start decrypts; what remains is llama.cpp mapping the memfd's "
        "pages and running to the first token. Timings on this shared machine swing by several times from run to run "
        "(other work on the 2 cores): read the best column and the per-run ratios (each run loads the three "
        "one after another) beside the median.",
        "",
    ]
    if not args.no_replicas:
        lines += bench_replicas(moat, lic, model_id, replicas_label)
    write(ROOT / "bench" / "results" / "vaultd.md", "\n".join(lines), TITLE)
    print("\n".join(lines))


TITLE = "# vaultd: load to first token through the vault daemon"


if __name__ == "__main__":
    main()
