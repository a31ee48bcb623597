"""TPM bench: attested leases at the key server, a client's lease with and without a quote, and an
offline sealed start with the TPM unwrap vs the software key. Software TPMs (swtpm) on 127.0.0.1.

    .venv/bin/python bench/attest.py            # 32 machines x 20 leases each; 64 MiB sealed start
    .venv/bin/python bench/attest.py --quick    # 8 x 10; 8 MiB

Key server: the real `codemoat keyserver` in its own process; one lease license with 32 seats and
32 machines, each with its own swtpm. Each machine's requests are made first (challenge, signed
request, TPM2_Quote over the nonce: the slow, per-machine part that a real fleet does in parallel
on its own chips), then 32 client threads in 4 processes send them back to back (each machine in
order, so its TPM clock only moves forward) and the server verifies quote, nonce, PCR digest and
reset count and wraps the keys to each chip. The same harness with software-key machines (no
quote) runs beside it. Leases/s, p50/p99, and the server's CPU per lease.

Client: `LeaseClient.acquire()` (challenge, quote, lease, unwrap by ECDH in the chip) vs the same
with a software key, alternating; medians and p99.

Offline start: `verify_bundle` (license checks, content-key unwrap, every chunk decrypted and
hashed) for a TPM-bound license vs a software-bound one, alternating; medians and their ratio.
Writes bench/results/attest.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WORK = Path(os.environ.get("ATTEST_BENCH_DIR", "/tmp/codemoat-bench-attest"))
os.environ["CODEMOAT_HOME"] = str(WORK / "home")

from attest_swtpm import Tpms, free_pair, mark_bound, tpm_machine  # noqa: E402  (bench/ is the script's folder)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def _sender(bodies_by_machine: list[list[str]], url: str, gate, results) -> None:
    import httpx

    lat, errors = [], []

    def run(bodies: list[str]) -> None:
        with httpx.Client(timeout=30, trust_env=False) as c:
            for b in bodies:
                t = time.perf_counter()
                r = c.post(url + "/v1/lease", content=b, headers={"content-type": "application/json"})
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(r.json().get("error", {}).get("code", r.status_code))

    gate.wait(timeout=120)
    ts = [threading.Thread(target=run, args=(b,)) for b in bodies_by_machine]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    results.put((lat, errors))


def bench_keyserver(n: int, per: int, tpms: Tpms | None, vendor, url: str, server_pid: int, moat: Path) -> dict:
    import httpx
    import psutil

    from codemoat.vault.keyserver import REQUEST_DOMAIN
    from codemoat.vault.lease import LeaseClient
    from codemoat.vault.license import License
    from codemoat.vault.machine import MachineKey

    kind = "tpm" if tpms else "software"
    machines = [tpm_machine(t, vendor) for t in tpms.tctis] if tpms else [MachineKey.generate(facts={}) for _ in range(n)]
    doc = vendor.issue_license(
        customer="attest-bench",
        model=moat,
        machines=[m.identity() for m in machines],
        expires=int(time.time()) + 86400,
        mode="lease",
        keyserver=url,
        lease_ttl=600,
        grace=60,
        seats=n,
    )
    lic = License.parse(json.dumps(doc).encode())
    t0 = time.perf_counter()
    bodies: list[list[str]] = [[] for _ in machines]

    def prepare(i: int) -> None:
        client = LeaseClient(lic, machines[i])
        with httpx.Client(timeout=30, trust_env=False) as c:
            for _ in range(per):
                nonce = c.post(url + "/v1/lease/challenge", json={"license_id": lic.id}).json()["nonce"]
                bodies[i].append(json.dumps(client._signed_request(nonce, REQUEST_DOMAIN), separators=(",", ":")))
        client.close()

    ts = [threading.Thread(target=prepare, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    prep = time.perf_counter() - t0
    log(f"  {kind}: {n * per} requests prepared in {prep:.1f} s")
    procs = 4
    ctx = mp.get_context("spawn")  # not fork: the parent holds TSS and httpx threads' locks
    gate, results = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=_sender, args=(bodies[i::procs], url, gate, results)) for i in range(procs)]
    for w in workers:
        w.start()
    sp = psutil.Process(server_pid)
    cpu0 = sum(sp.cpu_times()[:2])
    gate.wait(timeout=120)
    t = time.perf_counter()
    lat, errors = [], []
    for _ in workers:
        a, b = results.get(timeout=300)
        lat += a
        errors += b
    wall = time.perf_counter() - t
    cpu = sum(sp.cpu_times()[:2]) - cpu0
    for w in workers:
        w.join()
    return {
        "kind": kind,
        "clients": n,
        "leases": len(lat),
        "errors": len(errors),
        "error_codes": sorted(set(map(str, errors))),
        "per_s": len(lat) / wall,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "server_cpu_ms": cpu / max(1, len(lat)) * 1000,
        "prep_s": prep,
    }


def bench_core(n: int, per: int, tpms: Tpms, vendor, moat: Path, profile: bool) -> dict:
    """One core: `KeyServer.lease` in this process, one thread, on prepared requests (no HTTP, no
    clients competing for the CPU): CPU seconds per lease by `time.thread_time`, so the figure holds
    on a shared machine. TPM and software machines alternate in rounds of one request per machine."""
    import cProfile
    import pstats

    from codemoat.vault.keyserver import REQUEST_DOMAIN, KeyServer
    from codemoat.vault.lease import LeaseClient
    from codemoat.vault.license import License
    from codemoat.vault.machine import MachineKey

    ks = KeyServer(vendor)
    reqs: dict[str, list[list[dict]]] = {}
    for kind in ("software", "tpm"):
        machines = (
            [tpm_machine(t, vendor) for t in tpms.tctis] if kind == "tpm" else [MachineKey.generate(facts={}) for _ in range(n)]
        )
        doc = vendor.issue_license(
            customer="attest-bench",
            model=moat,
            machines=[m.identity() for m in machines],
            expires=int(time.time()) + 86400,
            mode="lease",
            keyserver="http://127.0.0.1:9",
            lease_ttl=600,
            grace=60,
            seats=n,
        )
        lic = License.parse(json.dumps(doc).encode())
        rounds = []
        clients = [LeaseClient(lic, m) for m in machines]
        for _ in range(per):
            rounds.append([c._signed_request(ks.challenge(lic.id)["nonce"], REQUEST_DOMAIN) for c in clients])
        for c in clients:
            c.close()
        reqs[kind] = rounds
    cpu = {"software": 0.0, "tpm": 0.0}
    count = {"software": 0, "tpm": 0}
    prof = cProfile.Profile() if profile else None
    for i in range(per):
        for kind in ("software", "tpm"):
            if prof is not None and kind == "tpm":
                prof.enable()
            t = time.thread_time()
            for r in reqs[kind][i]:
                ks.lease(r)
            cpu[kind] += time.thread_time() - t
            if prof is not None:
                prof.disable()
            count[kind] += len(reqs[kind][i])
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    return {k: {"leases": count[k], "cpu_ms": cpu[k] / count[k] * 1000, "per_cpu_s": count[k] / cpu[k]} for k in cpu}


def bench_client(runs: int, vendor, url: str, moat: Path, tcti: str) -> dict:
    from codemoat.vault.lease import LeaseClient
    from codemoat.vault.license import License
    from codemoat.vault.machine import MachineKey

    out = {}
    clients = {}
    for kind in ("software", "tpm"):
        m = tpm_machine(tcti, vendor) if kind == "tpm" else MachineKey.generate(facts={})
        doc = vendor.issue_license(
            customer="attest-bench",
            model=moat,
            machines=[m.identity()],
            expires=int(time.time()) + 86400,
            mode="lease",
            keyserver=url,
            lease_ttl=600,
            grace=60,
        )
        clients[kind] = LeaseClient(License.parse(json.dumps(doc).encode()), m)
        clients[kind].acquire()  # the seat taken; the rest are renewals
        out[kind] = []
    for _ in range(runs):
        for kind, c in clients.items():
            t = time.perf_counter()
            c.acquire()
            out[kind].append(time.perf_counter() - t)
    for c in clients.values():
        c.close()
    return {k: {"p50_ms": statistics.median(v) * 1000, "p99_ms": pct(v, 0.99) * 1000} for k, v in out.items()}


def bench_offline(mib: int, runs: int, vendor, tcti: str) -> dict:
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.verify import verify_bundle

    model = WORK / "offline.gguf"
    with open(model, "wb") as f:
        f.write(b"GGUF")
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    moat = WORK / "offline.moat"
    vendor.seal(model, "attest-offline", moat)
    soft, tpm = MachineKey.load_or_create(), tpm_machine(tcti, vendor)
    tpm.x25519, tpm.ed25519 = soft.x25519, soft.ed25519  # same machine (clock record), two bindings
    mark_bound(vendor, tpm)  # under that machine's id
    lics = {}
    for kind, m in (("software", MachineKey.generate(facts={})), ("tpm", tpm)):
        if kind == "software":
            m = soft
        doc = vendor.issue_license(
            customer="attest-offline", model=moat, machines=[m.identity()], expires=int(time.time()) + 86400
        )
        p = WORK / f"offline-{kind}.lic"
        p.write_text(json.dumps(doc))
        lics[kind] = (p, m)
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.container import SealedFile
    from codemoat.vault.license import License, check

    times = {"software": [], "tpm": []}
    checks = {"software": [], "tpm": []}
    sealed = SealedFile(moat)
    for _ in range(runs):
        for kind, (p, m) in lics.items():
            t = time.perf_counter()
            verify_bundle(moat, p, machine=m)
            times[kind].append(time.perf_counter() - t)
            t = time.perf_counter()
            check(License.load(p), sealed, m, ClockGuard(m))  # the license checks and the key unwrap alone
            checks[kind].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    chk = {k: statistics.median(v) * 1000 for k, v in checks.items()}
    return {
        "mib": mib,
        "runs": runs,
        "software_ms": med["software"],
        "tpm_ms": med["tpm"],
        "ratio": med["tpm"] / med["software"],
        "check_software_ms": chk["software"],
        "check_tpm_ms": chk["tpm"],
    }


def write_md(ks: list[dict], core: dict, client: dict, off: dict, args) -> Path:
    out = ROOT / "bench" / "results" / "attest.md"
    lines = [
        "# TPM attestation: key server, client lease, offline sealed start",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/attest.py', *sys.argv[1:]])}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; software TPMs (swtpm) "
        "on 127.0.0.1, so TPM times are a software chip's, not a hardware one's (a discrete TPM is slower: tens of ms per quote). "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs shared with other work: "
        "repeated runs here differ by up to 2× in every row; compare rows of one run, not runs.",
        "",
        f"## Key server: attested vs plain leases, {ks[0]['clients']} machines at once (4 client processes)",
        "",
        "| machines | leases | leases/s | p50 | p99 | server CPU / lease | errors | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ks:
        lines.append(
            f"| {r['kind']} | {r['leases']} | {r['per_s']:.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
            f"{r['server_cpu_ms']:.2f} ms | {r['errors']} {' '.join(r['error_codes'])} | "
            f"{'≥ 1,000/s, p99 ≤ 100 ms' if r['kind'] == 'tpm' else '(reference)'} |"
        )
    t = next(r for r in ks if r["kind"] == "tpm")
    s = next(r for r in ks if r["kind"] == "software")
    met = t["per_s"] >= 1000 and t["p99_ms"] <= 100
    lines += [
        "",
        f"**Targets {'met' if met else 'not met'} here.** The quote costs the server "
        f"{t['server_cpu_ms'] - s['server_cpu_ms']:+.2f} ms of CPU per lease (one ECDSA P-256 verify, the TPMS_ATTEST "
        "parse, and a P-256 instead of an X25519 wrap); one core would verify ≈ "
        f"{1000 / t['server_cpu_ms']:.0f} attested leases/s. Clients and server share the machine's CPUs here, so the "
        "leases/s is a floor for the server alone. Requests were prepared before timing (challenge + quote per lease: "
        f"{t['prep_s']:.1f} s for {t['leases']} quotes on {t['clients']} software TPMs).",
        "",
        "## One core: the key server's lease path in one thread (no HTTP, no competing clients)",
        "",
        "| machines | leases | CPU / lease | leases per CPU-second |",
        "| --- | --- | --- | --- |",
        *[
            f"| {k} | {core[k]['leases']} | {core[k]['cpu_ms']:.2f} ms | {core[k]['per_cpu_s']:.0f} |"
            for k in ("software", "tpm")
        ],
        "",
        "`KeyServer.lease` on prepared requests, measured by `time.thread_time` (CPU of that thread only), TPM and "
        "software machines alternating by round. Per attested lease: the request's Ed25519 signatures (machine and "
        "instance), one ECDSA P-256 verify of the quote, the TPM clock floor as one compare-and-set UPDATE inside the "
        "seat transaction (one commit per lease), a P-256 ephemeral key + ECDH + HKDF + AES-GCM wrap, and the Ed25519 "
        "signature of the answer; parsed public keys are cached. The target's 1,000 leases/s needs about "
        f"{1000 / core['tpm']['per_cpu_s']:.1f} such cores, before HTTP. Through HTTP (the table above, same run) the "
        f"server process spent {t['server_cpu_ms']:.2f} ms per attested lease: uvicorn, the JSON and the rest add "
        f"≈ {t['server_cpu_ms'] - core['tpm']['cpu_ms']:.1f} ms to the lease path's {core['tpm']['cpu_ms']:.2f} ms.",
        "",
        "## Client: one lease renewal (challenge, lease, unwrap), with a quote vs without",
        "",
        "| machine | p50 | p99 |",
        "| --- | --- | --- |",
        f"| software key | {client['software']['p50_ms']:.1f} ms | {client['software']['p99_ms']:.1f} ms |",
        f"| TPM (quote + ECDH in the chip) | {client['tpm']['p50_ms']:.1f} ms | {client['tpm']['p99_ms']:.1f} ms |",
        "",
        "Each TPM renewal opens the chip, re-derives the AK (for the quote) and the unwrap key (for ECDH_ZGen): "
        "primary keys are recreated from the seed rather than stored. A renewal happens every TTL / 2, so this is "
        "off any request's path.",
        "",
        f"## Offline sealed start: {off['mib']} MiB model, `verify_bundle` (checks, unwrap, every chunk decrypted and hashed)",
        "",
        "| binding | median | ratio | target |",
        "| --- | --- | --- | --- |",
        f"| software X25519 key | {off['software_ms']:.1f} ms | 1.00 | |",
        f"| TPM P-256 key (ECDH in the chip, PCR policy session) | {off['tpm_ms']:.1f} ms | {off['ratio']:.3f} | ≤ 1.05× |",
        "",
        f"Medians of {off['runs']} alternating runs. The license check with the key unwrap alone: software "
        f"{off['check_software_ms']:.1f} ms, TPM {off['check_tpm_ms']:.1f} ms — a fixed cost (connect, a trial policy "
        "session, one primary-key derivation, a policy session with TPM2_PolicyPCR, ECDH_ZGen) of "
        f"{off['check_tpm_ms'] - off['check_software_ms']:.0f} ms that does not grow with the model. On this "
        f"{off['mib']} MiB file that is {'within' if off['ratio'] <= 1.05 else 'over'} the 1.05× target; the software "
        f"start here decrypts ≈ {off['mib'] / (off['software_ms'] / 1000):.0f} MiB/s, so the fixed cost is ≤ 5 % for a "
        f"model of ≥ {(off['check_tpm_ms'] - off['check_software_ms']) / 0.05 / 1000 * off['mib'] / (off['software_ms'] / 1000):.0f} MiB "
        "(extrapolated, not measured). A hardware TPM's ECDH and policy session take longer than swtpm's.",
        "",
    ]
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the one-core TPM pass (to stderr; its CPU figure then includes the profiler)",
    )
    args = ap.parse_args()
    n, per, mib, runs = (8, 10, 8, 3) if args.quick else (32, 20, 64, 9)
    if shutil.which("swtpm") is None:
        sys.exit("swtpm is not installed (apt-get install swtpm swtpm-tools)")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    import httpx

    from codemoat.vault.vendor import Vendor

    vdir = WORK / "vendor"
    vendor = Vendor.init(vdir)
    small = WORK / "small.gguf"
    small.write_bytes(b"GGUF" + os.urandom(4096))
    moat = WORK / "small.moat"
    vendor.seal(small, "attest-bench", moat)
    vendor.seal(small, "attest-offline", WORK / "unused.moat")
    port = free_pair()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "codemoat.cli.main", "keyserver", "--vendor", str(vdir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tpms = Tpms(n, WORK)
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        log("key server: software machines, then TPM machines")
        ks = [
            bench_keyserver(n, per, None, vendor, url, server.pid, moat),
            bench_keyserver(n, per, tpms, vendor, url, server.pid, moat),
        ]
        log("one core: the key server's lease path in this process")
        core = bench_core(n, min(per, 10), tpms, vendor, moat, args.profile)
        log("client lease with and without a quote")
        client = bench_client(runs * 6, vendor, url, moat, tpms.tctis[0])
        log("offline sealed start")
        off = bench_offline(mib, runs, vendor, tpms.tctis[1])
    finally:
        server.terminate()
        server.wait(timeout=10)
        tpms.close()
        vendor.close()
    print(json.dumps({"keyserver": ks, "core": core, "client": client, "offline": off}, indent=1))
    log(f"wrote {write_md(ks, core, client, off, args)}")


if __name__ == "__main__":
    main()
