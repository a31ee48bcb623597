"""bench/attest.py's offline part: a sealed start with the TPM unwrap vs the software key, and what the CRL
check costs. The two bindings are the same machine (same clock record and id), one license each; the
runs alternate A B, then B A, so neither side always goes first, and each round gives one paired ratio.
A CRL is installed first (100 machines revoked, none of them this one): every start then reads and
verifies it, and on the TPM machine its install counter in the chip."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

REVOKED = 100


def _q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def _summary(pairs: list[tuple[float, float]]) -> dict:
    """Medians (ms) of each side, the ratio of the medians, and the spread of the paired ratios (p25-p75)."""
    soft, tpm = [a for a, _ in pairs], [b for _, b in pairs]
    ratios = [b / a for a, b in pairs]
    ms, mt = statistics.median(soft) * 1000, statistics.median(tpm) * 1000
    return {
        "software_ms": ms,
        "tpm_ms": mt,
        "ratio": mt / ms,
        "ratio_p25": _q(ratios, 0.25),
        "ratio_p50": statistics.median(ratios),
        "ratio_p75": _q(ratios, 0.75),
    }


def bench_offline(mib: int, runs: int, vendor, tcti: str, work: Path, tpm_machine, mark_bound) -> dict:
    from codemoat.engines.sealed import open_sealed
    from codemoat.vault import crl, vendor_crl
    from codemoat.vault.clock import ClockGuard
    from codemoat.vault.container import SealedFile
    from codemoat.vault.license import License, check
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.verify import verify_bundle

    model = work / "offline.gguf"
    with open(model, "wb") as f:
        f.write(b"GGUF")
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    moat = work / "offline.moat"
    vendor.seal(model, "attest-offline", moat)
    soft, tpm = MachineKey.load_or_create(), tpm_machine(tcti, vendor)
    tpm.x25519, tpm.ed25519 = soft.x25519, soft.ed25519  # same machine (clock record), two bindings
    mark_bound(vendor, tpm)  # under that machine's id
    # what `machine-id --tpm` does once it has defined the CRL counter: the clock record follows it from there
    ClockGuard(tpm).record_tpm_provisioned(tpm.tpm["identity"]["crl"]["count"])
    lics = {}
    for kind, m in (("software", soft), ("tpm", tpm)):
        doc = vendor.issue_license(
            customer="attest-offline", model=moat, machines=[m.identity()], expires=int(time.time()) + 86400
        )
        p = work / f"offline-{kind}.lic"
        p.write_text(json.dumps(doc))
        lics[kind] = (p, m)
    verify_bundle(moat, lics["software"][0], machine=soft)  # trusts the vendor, as a customer's first start does
    if not vendor_crl.revoke(vendor, machines=[f"bench-other-{i}" for i in range(REVOKED)], reason="bench"):
        raise SystemExit("no CRL to install")
    crl.install(json.dumps(vendor_crl.build(vendor)).encode(), ClockGuard(tpm))  # counted in the chip too

    class Held:  # what the holder serves: the sealed memfd itself (as `codemoat tune` opens a sealed base)
        in_flight = 0

        def __init__(self, buf) -> None:
            self.buf = buf

        def close(self) -> None:
            self.buf.close(zero=True)

    sealed = SealedFile(moat)
    phases = ("start", "verify", "check", "crl")
    got: dict[str, dict[str, list[float]]] = {ph: {"software": [], "tpm": []} for ph in phases}
    for i in range(runs):
        for kind in ("software", "tpm") if i % 2 == 0 else ("tpm", "software"):
            p, m = lics[kind]
            t = time.perf_counter()  # serve's start without the engine: checks, unwrap, decrypt into a sealed memfd
            holder = open_sealed(moat, p, machine=m, watch=False, build=lambda _s, buf, _id, _p: Held(buf))
            got["start"][kind].append(time.perf_counter() - t)
            holder.close()
            t = time.perf_counter()
            verify_bundle(moat, p, machine=m)
            got["verify"][kind].append(time.perf_counter() - t)
            lic = License.load(p)
            t = time.perf_counter()
            check(lic, sealed, m, ClockGuard(m))  # the license checks and the key unwraps alone
            got["check"][kind].append(time.perf_counter() - t)
            guard = ClockGuard(m)
            t = time.perf_counter()  # the CRL check alone (on the TPM machine: its own connection to read the counter)
            crl.check_revoked(lic.body, m.id, guard)
            got["crl"][kind].append(time.perf_counter() - t)
    out: dict = {"mib": mib, "runs": runs, "revoked": REVOKED}
    for ph in phases:
        out[ph] = _summary(list(zip(got[ph]["software"], got[ph]["tpm"])))
    return out


def offline_md(offs: list[dict]) -> list[str]:
    """The results file's offline sections."""
    off = offs[0]

    def row(o: dict, ph: str) -> str:
        s = o[ph]
        return (
            f"| {o['mib']} MiB | {s['software_ms']:.1f} ms | {s['tpm_ms']:.1f} ms | **{s['ratio']:.3f}** | "
            f"{s['ratio_p50']:.3f} ({s['ratio_p25']:.3f}–{s['ratio_p75']:.3f}) |"
        )

    c, r = off["check"], off["crl"]
    return [
        "## Offline sealed start: serve's start to a sealed memfd (`open_sealed`: checks, unwrap, decrypt)",
        "",
        "| model | software X25519 key | TPM P-256 key (ECDH in the chip) | ratio of medians (target ≤ 1.05×) "
        "| paired ratios: median (p25–p75) |",
        "| --- | --- | --- | --- | --- |",
        *[row(o, "start") for o in offs],
        "",
        "**Target ≤ 1.05× (ratio of medians): "
        + "; ".join(f"{o['mib']} MiB {'met' if o['start']['ratio'] <= 1.05 else 'not met'}" for o in offs)
        + " in this run.**",
        "",
        f"Medians of {off['runs']} rounds per size; each round runs both bindings back to back, software first in even "
        "rounds and TPM first in odd ones, and gives one paired ratio (TPM ÷ software, taken seconds apart, so "
        "under the same load): their median and p25–p75 say how much the load moved them. `open_sealed` as `codemoat serve` and `vaultd` start a sealed model, without the engine "
        "(the build step keeps the memfd): header and manifest, license checks, the content and watermark keys "
        "unwrapped, every chunk decrypted and authenticated into a sealed memfd, then zeroed and closed (not timed). "
        f"A CRL revoking {off['revoked']} other machines is installed, so both starts read and verify it. On the TPM "
        "machine the chip's part runs in one thread (`vault.tpmstart`, started right after the license is read): "
        "the CRL install counter as the AK certifies it (TPM2_NV_Certify), the unwrap key (TPM2_ReadPublic of the "
        "key `machine-id --tpm` made persistent), the policy session and its PolicyPCR and PolicyNV while the other "
        "checks run and `engines.memfd.Prefault` allocates the memfd's pages; the content key (one ECDH_ZGen) once "
        "every check passed; the watermark key from the same Z (the vendor wraps both keys to one ephemeral point, "
        "each under its own context: no second ZGen) while the model is decrypted. Those TPM commands are "
        "marshalled by `attest.tpmcmd` and sent by `attest.tpmraw.StartChip` (no ESAPI; on swtpm one TCP connection "
        "per burst of commands, `attest.tpmsock`, where tpm2-tss's swtpm TCTI connects per command).",
        "",
        "## `codemoat verify` (`verify_bundle`: checks, unwrap, every chunk decrypted into a scratch buffer and hashed)",
        "",
        "| model | software X25519 key | TPM P-256 key | ratio of medians | paired ratios: median (p25–p75) |",
        "| --- | --- | --- | --- | --- |",
        *[row(o, "verify") for o in offs],
        "",
        f"The license check with both key unwraps alone ({off['mib']} MiB run): software {c['software_ms']:.1f} ms, "
        f"TPM {c['tpm_ms']:.1f} ms: a fixed cost of {c['tpm_ms'] - c['software_ms']:.1f} ms (7 TPM commands: the CRL "
        "counter's TPM2_NV_Certify by the persistent AK (its signature checked here), the tamper latch's "
        "NV_ReadPublic, ReadPublic of the persistent unwrap key, one policy session with its TPM2_PolicyPCR and "
        "TPM2_PolicyNV, one ECDH_ZGen for both keys, which also ends the policy session (no FlushContext since d28507b); swtpm's CPU is mostly the NV_Certify and "
        "the ECDH_ZGen, about 0.4 ms each) that does not grow with the model. `verify` has no "
        "memfd to allocate while the chip works, so it pays that cost in full.",
        "",
        f"**The CRL check alone** (`crl.check_revoked`, {off['revoked']} revocations installed): software machine "
        f"{r['software_ms']:.2f} ms (read the CRL, verify its Ed25519 signature, the clock record), TPM machine "
        f"{r['tpm_ms']:.2f} ms, which adds its own ESAPI connection to the chip and the CRL counter's TPM2_NV_Certify "
        f"({r['tpm_ms'] - r['software_ms']:.2f} ms more). In a start that TPM read rides on the unwrap's "
        "connection and thread, so the start pays the software part only.",
        "",
    ]
