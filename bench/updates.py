"""What installing an update costs: `update verify` + `update apply` of a model bundle vs a plain copy, one run.

A GGUF-shaped file of --size-mib random bytes (incompressible, like quantised weights) is sealed and
released as a model bundle; then, alternating round by round so that other work on the machine
hits all alike (all from the page cache, as the bundle is after being copied off the media):
- copy: `shutil.copyfile` of the bundle (sendfile in the kernel: the floor);
- apply: `UpdateStore.apply` (signature, license, support window and version checks, the payload
  copied in the kernel and fsynced, the copy's license checked and every chunk's AES-GCM tag checked
  under its content key, the rename-based switch), then uninstalled again for the next round;
- verify+apply: `UpdateStore.verify` (the same license and GCM checks on the bundle) and then `apply`;
- both again on the same bundle written as before 2026-12-04 20:30 UTC, its payload wherever the manifest
  ends (now `vendor release` pads the manifest so the payload starts on a 4096-byte boundary).
With --swap: a real `codemoat serve` on a sealed model, 16 clients streaming completions in a loop,
`codemoat update apply v2.moatpkg` run as an operator runs it (it installs v2 and hands it to the
serve, which swaps it in): failed requests (target 0), p99 latency during the swap window vs before,
and the time from starting `update apply` to v2 serving (apply's return: the serve answered "swapped").
With --adapter-swap (alone): the same for a vendor adapter (`model.adapters = ["update:fee"]`, v1
installed before the server starts, v2 applied with `update apply`).
Results go to bench/results/updates.md (target: verify+apply / copy <= 1.5).
Usage: .venv/bin/python bench/updates.py [--size-mib 1024] [--rounds 3] [--swap] [--skip-copy] [--adapter-swap]
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

from _results import write_in_place  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swap", action="store_true", help="also measure the swap under 16 streaming clients")
    ap.add_argument("--skip-copy", action="store_true", help="only the swap (keeps the copy table already written)")
    ap.add_argument("--adapter-swap", action="store_true", help="only a vendor adapter's swap under 16 streaming clients")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / "updates.md"
    # each mode replaces its own sections where they stand (the copy table under the title, "## Swap under
    # load", "## Adapter swap under load"); the others stay
    if args.adapter_swap:
        lines = swap_bench(kind="adapter")
        write_in_place(out, "\n".join(lines))
        print("\n".join(lines))
        return
    swap_lines = swap_bench() if args.swap else []
    if args.skip_copy:
        write_in_place(out, "\n".join(swap_lines))
        print("\n".join(swap_lines))
        return
    load_before, started = loadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
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
        from codemoat.updates import bundle as fmt

        before = work / "v2-unaligned.moatpkg"  # the same bundle as made before the payload was page-aligned
        opened = fmt.Bundle(bundle)
        fmt.write(before, opened.manifest, v.signing_key, opened.pieces(), align=False)
        v.close()
        model.unlink()
        moat.unlink()
        size = bundle.stat().st_size
        offsets = {"": opened.payload_offset, " (unaligned, before)": fmt.Bundle(before).payload_offset}
        times: dict[str, list[float]] = {
            "copy": [],
            "apply": [],
            "verify+apply": [],
            "apply (unaligned, before)": [],
            "verify+apply (unaligned, before)": [],
        }
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
                    path = before if mode.endswith("(unaligned, before)") else bundle
                    if mode.startswith("verify+apply"):
                        store.verify(path, lic)
                    store.apply(path, lic)
                times[mode].append(time.perf_counter() - t)
                (work / "copy.moatpkg").unlink(missing_ok=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        lines = [
            "# Update install cost: verify + apply of a model bundle vs a plain copy",
            "",
            f"`flock /tmp/s8/bench.lock timeout 900 .venv/bin/python bench/updates.py --size-mib {args.size_mib} "
            f"--rounds {args.rounds}` on {started}, {os.cpu_count()} CPUs (shared), load average {load_before} before and "
            f"{loadavg()} after; one run, modes interleaved; bundle {size / 2**30:.2f} GiB, page cache warm; payload at "
            + ", ".join(f"offset {o} ({'a multiple of 4096' if o % 4096 == 0 else 'unaligned'})" for o in offsets.values())
            + ".",
            "",
            "| mode | median s | GiB/s | vs copy |",
            "| --- | --- | --- | --- |",
        ]
        for k, s in med.items():
            lines.append(f"| {k} | {s:.2f} | {size / 2**30 / s:.2f} | {s / med['copy']:.2f}x |")
        lines += [
            "",
            f"All rounds (s): {', '.join(f'{k}: ' + ' '.join(f'{x:.2f}' for x in v) for k, v in times.items())}.",
            f"Vendor side, for reference: `vendor release` (seal + license + bundle) took {t_release:.1f} s.",
            "",
            "Bundle format 2: a model's payload (a sealed model) is authenticated by itself. apply copies it in the",
            "kernel (sendfile, as the copy does), fsyncs it, then checks the copy: its license (carried in the signed",
            "manifest, naming the .moat's signed header) and every chunk's AES-GCM tag under the content key, on all",
            "usable cores (AES-GCM with AES-NI/VAES is several times faster than SHA-256 here); verify makes the",
            "same checks on the bundle without copying. `update apply` alone makes every check `update verify`",
            "makes, so running verify first is optional. The target is verify+apply / copy <= 1.5.",
            "",
            "The payload starts on a 4096-byte boundary (the manifest's `pad`), so apply's sendfile copies page to page",
            "as the plain copy does; the '(unaligned, before)' rows install the same bundle written without `pad`, as",
            "every bundle was before (the kernel then assembles each page of the copy from two of the bundle's).",
        ]
        write_in_place(out, "\n".join(lines + ([""] + swap_lines if swap_lines else [])))
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def swap_bench(clients: int = 16, kind: str = "model") -> list[str]:
    """16 streaming clients against a real server while v2 (of the model, or of a vendor adapter) is applied and swapped in."""
    import json
    import subprocess
    import threading

    import httpx

    load_before, started = loadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    env = dict(os.environ, CODEMOAT_HOME=str(work / "home"))
    os.environ["CODEMOAT_HOME"] = env["CODEMOAT_HOME"]
    from codemoat.updates.release import release
    from codemoat.updates.store import UpdateStore
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor

    sys.path.insert(0, str(ROOT / "tests"))
    from tinymodel import build_tiny_gguf

    model = ROOT / "models" / "codemoat-tiny.gguf"
    if not model.is_file():
        model = build_tiny_gguf(work / "tiny.gguf")
    cli = [sys.executable, "-m", "codemoat.cli.main"]
    machine = MachineKey.load_or_create()
    v = Vendor.init(work / "vendor")
    moat = work / "v1.moat"
    v.seal(model, "acme", moat)
    doc = v.issue_license(customer="acme", model=moat, machines=[machine.identity()], expires=int(time.time()) + 86400)
    lic = work / "acme.lic"
    lic.write_text(json.dumps(doc))
    bundle = work / "v2.moatpkg"
    if kind == "adapter":
        from tune.loras import random_lora_gguf  # tests/tune: a random LoRA for the model, no torch

        for version, seed in (("1", 0), ("2", 1)):
            lora = work / "fee.gguf"
            lora.write_bytes(random_lora_gguf(model, seed=seed))
            out = bundle if version == "2" else work / "fee-1.moatpkg"
            release(v, customer="acme", kind="adapter", source=lora, version=version, out=out)
        UpdateStore(machine=machine, models=[moat]).apply(work / "fee-1.moatpkg", lic)
        env["CODEMOAT_MODEL__ADAPTERS"] = json.dumps(["update:fee"])
        env["CODEMOAT_MODEL__PATH"] = str(moat)  # the model the adapter is for, as `update apply` checks it
    else:
        release(v, customer="acme", kind="model", source=model, version="2", out=bundle)
    v.close()

    def token(*extra: str) -> str:
        r = subprocess.run([*cli, "tokens", "create", "--json", *extra], env=env, capture_output=True, text=True, check=True)
        return json.loads(r.stdout)["token"]

    user, admin = token("--name", "dev"), token("--name", "ops", "--scopes", "admin")
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    srv = subprocess.Popen(
        [*cli, "serve", "--model", str(moat), "--license", str(lic), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        model_id = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {admin}"}).json()["model"]
        stop, lock = threading.Event(), threading.Lock()
        rows: list[tuple[float, float, bool]] = []  # (start, latency, ok)

        def run() -> None:
            body = {"model": model_id, "prompt": "def fibonacci(n):\n", "max_tokens": 16, "temperature": 0.0, "stream": True}
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    t = time.monotonic()
                    try:
                        with c.stream(
                            "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {user}"}
                        ) as r:
                            text = "".join(r.iter_text())
                        ok = r.status_code == 200 and "[DONE]" in text and '"error"' not in text
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        rows.append((t, time.monotonic() - t, ok))

        threads = [threading.Thread(target=run) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(10)
        t_apply = time.monotonic()
        r = subprocess.run(
            [*cli, "update", "apply", str(bundle), "--license", str(lic), "--json"], env=env, capture_output=True, text=True
        )
        t_done = time.monotonic()
        served = json.loads(r.stdout).get("served") if r.returncode == 0 else None
        if not served or not served[0].get("swapped"):
            raise SystemExit(f"update apply did not swap: {r.stdout} {r.stderr}")
        t_swap = t_done - float(served[0]["seconds"])  # the serve's own swap time, from its answer
        time.sleep(10)
        stop.set()
        for t in threads:
            t.join()
    finally:
        srv.terminate()
        srv.wait(30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)

    def p99(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")

    before = [lat for t, lat, _ in rows if t + lat < t_apply]
    during = [lat for t, lat, _ in rows if t < t_done and t + lat > t_swap]
    after = [lat for t, lat, _ in rows if t > t_done]
    failed = sum(1 for *_, ok in rows if not ok)
    table = [
        "| requests | failed | p99 before (s) | p99 during the swap (s) | p99 after (s) | `update apply` until v2 serves (s) | of which the serve's swap (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {len(rows)} | {failed} | {p99(before):.2f} | {p99(during):.2f} | {p99(after):.2f} | {t_done - t_apply:.2f} "
        f"| {t_done - t_swap:.2f} |",
    ]
    when = f"on {started}, load average {load_before} before and {loadavg()} after (2 shared CPUs)"
    if kind == "adapter":
        return [
            "## Adapter swap under load",
            "",
            f"`flock /tmp/s6/bench.lock timeout 600 .venv/bin/python bench/updates.py --adapter-swap` {when}: a real "
            f'`codemoat serve` (sealed bundled model, `model.adapters = ["update:fee"]`, v1 installed), {clients} clients '
            "(everyone is served with the adapter) streaming 16-token completions in a loop; after 10 s "
            "`codemoat update apply fee-2.moatpkg` installs adapter v2 and hands it to the serve, which swaps it in; 10 s more.",
            "",
            *table,
            "",
            "The swap builds a second engine over the same base (a sealed base is decrypted again) with adapter v2,",
            "checks a fixed prompt with and without it, and swaps engines as for a model; in-flight streams finish",
            "on the old engine with adapter v1.",
        ]
    return [
        "## Swap under load",
        "",
        f"`flock /tmp/s6/bench.lock timeout 600 .venv/bin/python bench/updates.py --swap --skip-copy` {when}: a real "
        f"`codemoat serve` (sealed bundled model, default engine isolation), {clients} clients streaming 16-token "
        "completions in a loop; after 10 s `codemoat update apply v2.moatpkg` installs model v2 and hands it to the "
        "serve (its socket in $CODEMOAT_HOME/run), which swaps it in; 10 s more.",
        "",
        *table,
        "",
        "`update apply` returns once the serve has loaded v2 beside v1, v2 has answered the health-check prompt and",
        "takes new requests (the CLI's own start, the install and the hand-off are the difference between the two",
        "times); v1 finishes its in-flight streams and is closed after them. The window 'during the swap' is the",
        "serve's swap; 'before' ends when `update apply` starts.",
    ]


if __name__ == "__main__":
    sys.exit(main())
