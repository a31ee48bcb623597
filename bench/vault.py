"""Vault bench: loading a sealed GGUF vs the same file in plaintext, and key server throughput.

    .venv/bin/python bench/vault.py                 # 1 GiB model, 32 clients for 10 s
    .venv/bin/python bench/vault.py --quick         # 64 MiB model, 3 s of leases (a smoke run)
    .venv/bin/python bench/vault.py --shmem-thp advise --parts load   # also with shmem huge pages (root)
    .venv/bin/python bench/vault.py --parts load --model gemma        # the real Gemma 3 270M file → vault-<name>.md

Load: a random llama-shaped F32 GGUF of ~1 GiB is written once; the plaintext file is read once so
the page cache is warm; then, alternating, `LlamaCppEngine.from_path` (llama.cpp maps the file) and
`open_sealed` (manifest + license checks, AES-256-GCM chunk by chunk into a memfd — through its
mapping with 2 MiB pages, else with `pwrite` — seal, load from the memfd) are timed to "engine ready" and to "first token" (which makes llama.cpp touch every weight
page either way). Medians of the runs, side by side, in one process.

Key server: the real `codemoat keyserver` in its own process; 32 client threads, each a different
machine holding one of the license's 32 seats, renew leases back to back (challenge + signed lease
+ answer check + key unwrap, and the outbound log). Leases/s and latency percentiles.
Writes bench/results/vault.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
WORK = Path(os.environ.get("VAULT_BENCH_DIR", "/tmp/codemoat-bench-vault"))
os.environ["CODEMOAT_HOME"] = str(WORK / "home")


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


LOAD_BEFORE = _loadavg()


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def build_model(path: Path, gib: float) -> Path:
    """A llama-shaped F32 GGUF of about `gib` GiB (n_embd 2048, as many layers as it takes)."""
    from tinymodel import build_tiny_gguf

    n_embd = 2048 if gib >= 0.5 else 512
    per_layer = 10 * n_embd * n_embd * 4  # q, k, v, o + gate, up, down (ffn = 2 n_embd), F32
    n_layer = max(1, -(-int(gib * (1 << 30)) // per_layer))  # at least `gib`
    if not path.exists():
        log(f"writing {path.name}: {n_layer} layers of {n_embd}")
        build_tiny_gguf(path, n_layer=n_layer, n_embd=n_embd, n_ctx=256)
    return path


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


class ShmemPolicy:
    """Set the kernel's shmem huge-page policy for a block and put the old one back (needs root)."""

    def __init__(self, mode: str):
        from codemoat.engines.memfd import SHMEM_THP, shmem_thp_mode

        self.path, self.mode, self.old = SHMEM_THP, mode, shmem_thp_mode()

    def __enter__(self) -> ShmemPolicy:
        Path(self.path).write_text(self.mode)
        return self

    def __exit__(self, *exc) -> None:
        Path(self.path).write_text(self.old)


def bench_load(gib: float, runs: int, policies: list[str], real: Path | None = None) -> dict:
    """Plaintext vs sealed, alternating, under each shmem policy in `policies` ("" = as the kernel is);
    on a random F32 model of `gib` GiB, or on the real GGUF `real`."""
    from codemoat.config import load_settings
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.engines.memfd import MemfdBuffer, shmem_thp_mode
    from codemoat.engines.sealed import open_sealed
    from codemoat.vault.container import SealedFile
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor

    model = real or build_model(WORK / f"model-{gib:g}g.gguf", gib)
    size = model.stat().st_size
    vdir = WORK / "vendor"
    vendor = Vendor.open(vdir) if (vdir / "vendor.json").exists() else Vendor.init(vdir)
    machine = MachineKey.load_or_create()
    moat = WORK / (f"{real.stem}.moat" if real else f"model-{gib:g}g.moat")
    t = time.perf_counter()
    sealed = vendor.seal(model, "bench", moat)
    seal_s = time.perf_counter() - t
    doc = vendor.issue_license(
        customer="bench", model=moat, machines=[machine.identity()], expires=int(time.time()) + 86400, watermark=False
    )
    lic = WORK / "bench.lic"
    import json

    lic.write_text(json.dumps(doc))
    # inline and one sequence, as the plaintext side is built: the ratio is the vault's cost alone
    settings = load_settings(
        **{
            "model.n_ctx": 256,
            "model.n_threads": 2,
            "model.isolation": "inline",
            "model.parallel": 1,
            "vault.overlap_load": "off",
        }
    )
    overlapped = {}  # decrypt while llama.cpp loads (engines.overlap), each way
    for mode in ("read", "map"):
        overlapped[mode] = settings.model_copy(deep=True)
        overlapped[mode].vault.overlap_load = mode
    opts = {"n_ctx": 256, "n_threads": 2}
    params = SamplingParams(max_tokens=1, temperature=0.0)
    key = vendor.content_key(sealed.manifest.file_id)
    vendor.close()
    warm(model)
    warm(moat)

    def first_token(eng) -> None:
        asyncio.run(eng.complete("def", params))

    def measure() -> dict:
        # decryption alone, into a buffer whose pages are already there (the AES-GCM ceiling)
        buf = MemfdBuffer(sealed.manifest.plaintext_size)
        SealedFile(moat).decrypt_into(key, buf.view)
        t = time.perf_counter()
        SealedFile(moat).decrypt_into(key, buf.view, threads=1)
        decrypt_s = time.perf_counter() - t
        t = time.perf_counter()
        SealedFile(moat).decrypt_into(key, buf.view)
        decrypt_par_s = time.perf_counter() - t
        buf.close()
        # the floor: filling a fresh memfd with this many bytes (no cryptography), the way the vault does
        zeros = bytes(sealed.manifest.chunk_size)
        fill = []
        for _ in range(2):
            buf = MemfdBuffer(sealed.manifest.plaintext_size)
            huge = buf.hugepages
            t = time.perf_counter()
            for off in range(0, buf.size, len(zeros)):
                piece = zeros[: buf.size - off]
                if huge:
                    buf.view[off : off + len(piece)] = piece
                else:
                    buf.write_at(off, piece)
            fill.append(time.perf_counter() - t)
            buf.close(zero=False)
        rows: dict[str, list[float]] = {
            "plain_ready": [],
            "plain_first": [],
            "sealed_ready": [],
            "sealed_first": [],
            "read_ready": [],
            "read_first": [],
            "map_ready": [],
            "map_first": [],
            "copy_first": [],
        }
        waits: dict[str, list[float]] = {"read": [], "map": []}
        outcomes: list[str] = []
        for i in range(runs):
            t = time.perf_counter()
            eng = LlamaCppEngine.from_path(model, **opts)
            rows["plain_ready"].append(time.perf_counter() - t)
            first_token(eng)
            rows["plain_first"].append(time.perf_counter() - t)
            eng.close()
            t = time.perf_counter()
            holder = open_sealed(moat, lic, settings=settings, watch=False)
            rows["sealed_ready"].append(time.perf_counter() - t)
            first_token(holder.get())
            rows["sealed_first"].append(time.perf_counter() - t)
            holder.close()
            # sealed, decrypted while llama.cpp reads it into its own buffers (read), or maps it (map)
            for mode in ("read", "map"):
                t = time.perf_counter()
                holder = open_sealed(moat, lic, settings=overlapped[mode], watch=False)
                rows[f"{mode}_ready"].append(time.perf_counter() - t)
                first_token(holder.get())
                rows[f"{mode}_first"].append(time.perf_counter() - t)
                buf = holder.get()._memfd
                waits[mode].append(buf.gate_wait_s)
                outcomes.append(f"{mode} {buf.outcome}")
                holder.close()
            # plaintext read into llama.cpp's own buffers (use_mmap off): the copy the overlap adds
            t = time.perf_counter()
            eng = LlamaCppEngine.from_path(model, use_mmap=False, **opts)
            first_token(eng)
            rows["copy_first"].append(time.perf_counter() - t)
            eng.close()
            log(f"run {i}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in rows.items()))
        med = {k: statistics.median(v) for k, v in rows.items()}
        # each alternating pair is its own ratio: their spread says how firm the median ratio is
        pairs = sorted(s / p for s, p in zip(rows["sealed_first"], rows["plain_first"]))
        quart = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else [pairs[0]] * 3
        return {
            "pair_q1": quart[0],
            "pair_q3": quart[2],
            "pair_min": pairs[0],
            "pair_max": pairs[-1],
            "pairs_met": sum(r <= 1.15 for r in pairs),
            "pairs": len(pairs),
            "policy": shmem_thp_mode(),
            "hugepages": huge,
            "decrypt_s": decrypt_s,
            "decrypt_par_s": decrypt_par_s,
            "fill_s": min(fill),
            "load_avg": os.getloadavg()[0],
            **med,
            "ratio_ready": med["sealed_ready"] / med["plain_ready"],
            "ratio_first": med["sealed_first"] / med["plain_first"],
            **{
                f"{m}_vs_sealed": sorted(o / s for o, s in zip(rows[f"{m}_first"], rows["sealed_first"])) for m in ("read", "map")
            },
            **{f"{m}_wait": statistics.median(waits[m]) for m in ("read", "map")},
            "best": {k: min(v) for k, v in rows.items()},
            "overlap_outcomes": ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes))),
        }

    results = []
    for policy in policies:
        if not policy or policy == shmem_thp_mode():
            results.append(measure())
            continue
        try:
            with ShmemPolicy(policy):
                results.append(measure())
        except OSError as e:
            log(f"cannot set shmem policy {policy!r} ({e.strerror}); skipped")
        log(results[-1])
    return {"size": size, "seal_s": seal_s, "runs": runs, "configs": results, "model": model.name if real else None}


def _lease_clients(lic, machines, gate, stop, results) -> None:
    """One client process: a thread per machine renewing its lease back to back until `stop`."""
    from codemoat.vault.lease import LeaseClient

    lat: list[float] = []
    errors: list[str] = []
    local_gate = threading.Barrier(len(machines) + 1)

    def run(m) -> None:
        c = LeaseClient(lic, m, timeout=30)
        c.acquire()  # take the seat (and warm the connection)
        local_gate.wait()
        mine = []
        while not stop.is_set():
            t = time.perf_counter()
            try:
                c.acquire()
                mine.append(time.perf_counter() - t)
            except Exception as e:  # counted, not hidden
                errors.append(f"{type(e).__name__}: {e}")
        lat.extend(mine)
        c.close()

    threads = [threading.Thread(target=run, args=(m,)) for m in machines]
    for t in threads:
        t.start()
    local_gate.wait()
    gate.wait()
    c0 = time.process_time()
    for t in threads:
        t.join()
    results.put((lat, errors, time.process_time() - c0))


def bench_keyserver(clients: int, seconds: float, procs: int = 4) -> dict:
    import httpx

    from codemoat.vault.license import License
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    vdir = WORK / "ks-vendor"
    vendor = Vendor.open(vdir) if (vdir / "vendor.json").exists() else Vendor.init(vdir)
    small = WORK / "small.gguf"
    small.write_bytes(b"GGUF" + os.urandom(4096))
    moat = WORK / "small.moat"
    vendor.seal(small, "ks-bench", moat)
    url = f"http://127.0.0.1:{port}"
    machines = [MachineKey.generate() for _ in range(clients)]
    doc = vendor.issue_license(
        customer="ks-bench",
        model=moat,
        machines=[m.identity() for m in machines],
        expires=int(time.time()) + 86400,
        mode="lease",
        keyserver=url,
        lease_ttl=600,
        grace=60,
        seats=clients,
    )
    lic = License.parse(__import__("json").dumps(doc).encode())
    vendor.close()
    prof = ["-m", "cProfile", "-o", str(WORK / "ks.prof")] if os.environ.get("VAULT_BENCH_PROFILE") else []
    server = subprocess.Popen(
        [sys.executable, *prof, "-m", "codemoat.cli.main", "keyserver", "--vendor", str(vdir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        import multiprocessing as mp

        import psutil

        # A fleet is many machines, each its own process: the clients run in `procs` processes of
        # threads, so that 32 clients do not queue on one interpreter lock, which no key server sees.
        ctx = mp.get_context("fork")
        gate, stop, results = ctx.Barrier(procs + 1), ctx.Event(), ctx.Queue()
        groups = [machines[i::procs] for i in range(procs)]
        workers = [ctx.Process(target=_lease_clients, args=(lic, g, gate, stop, results)) for g in groups]
        for w in workers:
            w.start()
        proc = psutil.Process(server.pid)
        gate.wait(timeout=120)
        t0 = time.perf_counter()
        s0 = sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        stop.set()
        lat: list[float] = []
        errors: list[str] = []
        client_cpu = 0.0
        for _ in workers:
            mine, errs, cpu = results.get(timeout=120)
            lat += mine
            errors += errs
            client_cpu += cpu
        for w in workers:
            w.join(timeout=60)
        wall = time.perf_counter() - t0
        server_cpu = sum(proc.cpu_times()[:2]) - s0
    finally:
        server.send_signal(__import__("signal").SIGINT)
        server.wait(timeout=30)
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "clients": clients,
        "procs": procs,
        "seconds": wall,
        "leases": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "per_s": len(lat) / wall,
        "server_cpu_ms": server_cpu / max(1, len(lat)) * 1000,
        "client_cpu_ms": client_cpu / max(1, len(lat)) * 1000,
        "load_avg": os.getloadavg()[0],
        "p50_ms": pct(0.5) * 1000,
        "p99_ms": pct(0.99) * 1000,
        "max_ms": (lat[-1] * 1000 if lat else float("nan")),
    }


def _terms() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from gemma import TERMS

    return TERMS


def write_md(load: dict | None, ks: dict | None, args) -> Path:
    from codemoat.vault.container import default_threads

    name = (
        "vault-quick.md" if args.quick else f"vault-{Path(load['model']).stem}.md" if load and load.get("model") else "vault.md"
    )
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = " ".join(sys.argv[1:])
    lines = [
        "# Vault bench",
        "",
        f"`.venv/bin/python bench/vault.py{' ' + argv if argv else ''}` on "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The machine is shared "
        "with other work, so absolute times are noisy; the ratios come from alternating runs in one process."
        f" Load average (1, 5, 15 min) before the run: {LOAD_BEFORE}; after: {_loadavg()}.",
        "",
    ]
    if load:
        gib = load["size"] / (1 << 30)
        lines += [
            f"## Loading a sealed {gib:.2f} GiB GGUF vs plaintext (page cache warm, median of {load['runs']})",
            "",
            *(
                [f"The real model `{load['model']}` (bench/gemma.py), not the random F32 stand-in. {_terms()}", ""]
                if load.get("model")
                else []
            ),
            "Each row alternates plaintext and sealed loads in the same process. `shmem_enabled` is the kernel's"
            " huge-page policy for memory files (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`); the first"
            " row is the kernel as it is configured here (the distribution default, `never`), the others were"
            " set by the bench for their rows and put back afterwards. The ratio column divides the medians;"
            " every plaintext load and the sealed load after it also make a pair whose own ratio is counted,"
            " which shows how firm that median ratio is on a noisy machine.",
            "",
            "| shmem_enabled | memfd pages | | plaintext | sealed | ratio | per-pair ratios: quartiles (range) | pairs ≤ 1.15× | target |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in load["configs"]:
            pages = "2 MiB" if c["hugepages"] else "4 KiB"
            lines += [
                f"| `{c['policy']}` | {pages} | engine ready | {c['plain_ready']:.3f} s | {c['sealed_ready']:.3f} s"
                f" | {c['ratio_ready']:.2f}× | | | |",
                f"| `{c['policy']}` | {pages} | **first token** (every weight touched) | {c['plain_first']:.3f} s |"
                f" {c['sealed_first']:.3f} s | **{c['ratio_first']:.2f}×** | {c['pair_q1']:.2f}–{c['pair_q3']:.2f}×"
                f" ({c['pair_min']:.2f}–{c['pair_max']:.2f}×) | {c['pairs_met']} of {c['pairs']} | ≤ 1.15× |",
            ]
        lines += [""]
        for c in load["configs"]:
            verdict = "met" if c["ratio_first"] <= 1.15 else "not met"
            how = "AES-GCM into the mapping" if c["hugepages"] else "AES-GCM into a scratch buffer, then `pwrite`"
            lines += [
                f"- `shmem_enabled={c['policy']}`: target **{verdict}** ({c['ratio_first']:.2f}× to first token)."
                f" Fill path: {how}. AES-256-GCM `decrypt_into` alone (pages already there): {c['decrypt_s']:.3f} s"
                f" = {load['size'] / c['decrypt_s'] / 1e9:.1f} GB/s on one core, {c['decrypt_par_s']:.3f} s ="
                f" {load['size'] / c['decrypt_par_s'] / 1e9:.1f} GB/s with {default_threads()} workers. Filling a fresh memfd of the same"
                f" size without cryptography: {c['fill_s']:.3f} s"
                f" ({load['size'] / c['fill_s'] / 1e9:.1f} GB/s). Those two add up to"
                f" {c['fill_s'] + c['decrypt_par_s']:.3f} s; the sealed load took"
                f" {c['sealed_ready'] - c['plain_ready']:.3f} s longer than the plaintext one to engine ready."
                f" Load average: {c['load_avg']:.1f}."
            ]
        lines += [
            "",
            "### Overlapping decryption with llama.cpp's load (`vault.overlap_load`)",
            "",
            "`read`: chunks are decrypted in llama.cpp's read order by a background thread while llama.cpp"
            " loads with `use_mmap=False`, its progress callback waiting for each group of tensors; `map`:"
            " llama.cpp maps the memfd and parses header and vocabulary while the chunks are decrypted, its"
            " first progress callback waiting for all of them (engines/overlap.py). Either way the memfd is"
            " sealed once complete. Decrypt, then map (`off`) is the sealed column above. Copied: the"
            " plaintext file loaded with `use_mmap=False`, what llama.cpp's own copy of the weights costs"
            " without any decryption. Same runs, same process, medians to first token; the per-pair columns"
            " divide each overlapped load by the decrypt-then-map load of the same run. Wait: how long"
            " llama.cpp's progress callback waited for the decryptor (median per load).",
            "",
            "| shmem_enabled | memfd pages | plaintext (mapped) | sealed: off | sealed: `read` | `read` / off, per pair"
            " | sealed: `map` | `map` / off, per pair | plaintext copied (`use_mmap=False`) | wait `read` / `map`"
            " | best of the runs: plaintext / off / `read` / `map` | loads |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in load["configs"]:
            pages = "2 MiB" if c["hugepages"] else "4 KiB"
            r, m, b = c["read_vs_sealed"], c["map_vs_sealed"], c["best"]
            lines.append(
                f"| `{c['policy']}` | {pages} | {c['plain_first']:.3f} s | {c['sealed_first']:.3f} s |"
                f" {c['read_first']:.3f} s | **{statistics.median(r):.2f}×** ({r[0]:.2f}–{r[-1]:.2f}×) |"
                f" {c['map_first']:.3f} s | **{statistics.median(m):.2f}×** ({m[0]:.2f}–{m[-1]:.2f}×) |"
                f" {c['copy_first']:.3f} s | {c['read_wait']:.3f} / {c['map_wait']:.3f} s |"
                f" {' / '.join(f'{b[k]:.3f}' for k in ('plain_first', 'sealed_first', 'read_first', 'map_first'))} s |"
                f" {c['overlap_outcomes']} |"
            )
        lines += [
            "",
            f"- Sealing (read, encrypt, write, no fingerprint): {load['seal_s']:.2f} s.",
            "- Plaintext: llama.cpp maps the file and faults pages from the page cache on first use; it needs no"
            " new memory at all. Sealed: the manifest and license are checked, every chunk is decrypted and"
            f" authenticated into a fresh memfd ({default_threads()} workers, one contiguous range of chunks each;"
            " AES-GCM releases the GIL), the memfd is sealed and llama.cpp maps it. With 4 KiB pages the"
            " kernel's page allocation (one per 4 KiB, about 3 GB/s) is most of the extra time, not AES-GCM;"
            " with 2 MiB pages the fill runs at about memory speed. docs/operations.md says how to enable it.",
            "",
        ]
    if ks:
        lines += [
            f"## Key server: {ks['clients']} concurrent clients ({ks['procs']} processes) for {ks['seconds']:.1f} s",
            "",
            "| leases/s | p50 | p99 | max | errors | targets |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {ks['per_s']:.0f} | {ks['p50_ms']:.1f} ms | {ks['p99_ms']:.1f} ms | {ks['max_ms']:.1f} ms | "
            f"{ks['errors']} | ≥ 500/s, p99 ≤ 100 ms |",
            "",
            f"**Targets {'met' if ks['per_s'] >= 500 and ks['p99_ms'] <= 100 else 'not met'} on this machine.** "
            f"CPU per lease: key server {ks['server_cpu_ms']:.2f} ms (one core serves ≈ "
            f"{1000 / ks['server_cpu_ms']:.0f} leases/s), clients {ks['client_cpu_ms']:.2f} ms. Load average "
            f"during the run: {ks['load_avg']:.1f} on {os.cpu_count()} cores.",
            "",
            "Each lease here is a renewal, the steady state of a fleet: one round trip on the nonce the previous"
            " answer handed out, the request signed with the machine's Ed25519 key, the seat renewed in a"
            " database transaction, content and watermark keys wrapped (X25519 + HKDF + AES-GCM), the answer"
            " signed; the client checks signature and nonce, unwraps the keys and writes the outbound log."
            f" The key server and the {ks['clients']} clients share the machine's cores, so the clients' CPU"
            " counts against the server's throughput here, unlike a real fleet. The clients run as threads in"
            f" {ks['procs']} processes, as a fleet's machines are separate processes: with all of them in one"
            " Python process, their own interpreter lock queues them and adds to the latency measured"
            " (`--client-procs 1` measures that).",
            "",
        ]
        if ks["first_error"]:
            lines += [f"First error: `{ks['first_error']}`", ""]
    elif out.exists() and "\n## Key server" in (old := out.read_text()):
        # not rerun: the earlier run's key server section stays, saying which run it came from
        head = old.splitlines()[2].split(" on ")[0]
        section = old[old.index("\n## Key server") + 1 :].splitlines()
        lines += [section[0], "", f"Not rerun with the part above: from the earlier run of {head}.", *section[1:]]
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB model, short key server run")
    ap.add_argument("--parts", default="load,keyserver")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="", help="load part on a real GGUF instead of the random one: a path, or `gemma`")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--client-procs", type=int, default=4, help="processes the key server's clients run in")
    ap.add_argument(
        "--shmem-thp",
        default="",
        metavar="MODE",
        help="also measure the load with this shmem huge-page policy (e.g. advise); needs root, restored after",
    )
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    load = ks = None
    if "load" in parts:
        real = None
        if args.model:
            sys.path.insert(0, str(ROOT / "bench"))
            from gemma import gemma_path

            real = gemma_path() if args.model == "gemma" else Path(args.model)
        load = bench_load(
            1 / 16 if args.quick else 1.0, 2 if args.quick else args.runs, ["", *filter(None, [args.shmem_thp])], real
        )
        log(load)
    if "keyserver" in parts:
        ks = bench_keyserver(args.clients, 3.0 if args.quick else args.seconds, args.client_procs)
        log(ks)
    log("wrote", write_md(load, ks, args))


if __name__ == "__main__":
    main()
