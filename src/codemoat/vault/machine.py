"""This machine's identity: an X25519 + Ed25519 key pair made here, and hashed hardware facts.

The private keys never leave the machine (`$CODEMOAT_HOME/machine.key`, mode 0600). The public
identity (`codemoat machine-id`) carries the public keys and salted SHA-256 hashes of hardware
facts, so it reveals no serial number. A license matches facts with a policy named after
Keygen's machine-fingerprint match strategies: all, most (more than half), two, any.

With a TPM (`codemoat machine-id --tpm`), the identity also carries the chip's public keys (an
ECC P-256 unwrap key under a PCR policy, an attestation key, the endorsement key and its
certificate) and the PCR policy as it stands; their private parts never leave the chip
(`codemoat.attest.tpm`). `$CODEMOAT_HOME/tpm.json` names the TPM (its TCTI) and that block; the
software keys stay, for the clock record and as the binding of licenses issued without a TPM.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .. import paths
from .codec import VaultError, b64d, b64e, ed_private_raw, public_raw, write_secret, x_private_raw

KEY_FILE = "machine.key"
TPM_FILE = "tpm.json"
TCTI_ENV = "CODEMOAT_TPM_TCTI"  # overrides the TCTI in tpm.json (tests, a moved device node)
POLICIES = ("all", "most", "two", "any")
# Fact groups: a group with several values (network cards, GPUs) matches when any one value does.
MAX_DOC = 1 << 20  # a machine identity (with its TPM block) is a few KB
GROUPS = ("machine_id", "product_uuid", "cpu", "macs", "gpus")


def _h(kind: str, value: str) -> str:
    return hashlib.sha256(f"codemoat-fact-v1:{kind}:{value.strip().lower()}".encode()).hexdigest()[:32]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        return text or None
    except OSError:
        return None


def collect_facts(root: str = "/") -> dict[str, Any]:
    """Hashed hardware facts of the machine whose /etc, /proc and /sys are under `root`."""
    r = Path(root)
    facts: dict[str, Any] = {}
    mid = _read(str(r / "etc/machine-id")) or _read(str(r / "var/lib/dbus/machine-id"))
    if mid:
        facts["machine_id"] = _h("machine_id", mid)
    uuid_ = _read(str(r / "sys/class/dmi/id/product_uuid"))
    if uuid_:
        facts["product_uuid"] = _h("product_uuid", uuid_)
    cpuinfo = _read(str(r / "proc/cpuinfo")) or ""
    for line in cpuinfo.splitlines():
        if line.lower().startswith("model name") and ":" in line:
            facts["cpu"] = _h("cpu", line.split(":", 1)[1])
            break
    macs = []
    for dev in sorted(glob.glob(str(r / "sys/class/net/*"))):
        # Only network cards backed by a device: bridges, tunnels and veths change with containers.
        if not os.path.exists(os.path.join(dev, "device")):
            continue
        mac = _read(os.path.join(dev, "address"))
        if mac and mac != "00:00:00:00:00:00":
            macs.append(_h("mac", mac))
    if macs:
        facts["macs"] = sorted(set(macs))
    gpus = []
    for info in sorted(glob.glob(str(r / "proc/driver/nvidia/gpus/*/information"))):
        for line in (_read(info) or "").splitlines():
            if line.startswith("GPU UUID") and ":" in line:
                gpus.append(_h("gpu", line.split(":", 1)[1]))
    if gpus:
        facts["gpus"] = sorted(set(gpus))
    return facts


def match_facts(licensed: dict[str, Any], present: dict[str, Any], policy: str) -> tuple[bool, int, int]:
    """(ok, groups matched, groups recorded) for the facts a license recorded against this machine's."""
    if policy not in POLICIES:
        raise VaultError(f"unknown hardware match policy {policy!r}")
    total = matched = 0
    for g in GROUPS:
        want = licensed.get(g)
        if not want:
            continue
        total += 1
        have = present.get(g)
        want_set = set(want) if isinstance(want, list) else {want}
        have_set = set(have) if isinstance(have, list) else ({have} if have else set())
        if want_set & have_set:
            matched += 1
    if total == 0:
        return True, 0, 0
    need = {"all": total, "most": total // 2 + 1, "two": min(2, total), "any": 1}[policy]
    return matched >= need, matched, total


@dataclass
class MachineKey:
    """The machine's private keys (X25519 to receive wrapped keys, Ed25519 to prove itself to a key server)."""

    x25519: X25519PrivateKey
    ed25519: Ed25519PrivateKey
    facts: dict[str, Any] = field(default_factory=dict)
    tpm: dict[str, Any] | None = None  # {"tcti": str, "identity": {...}} from tpm.json, or None

    @classmethod
    def generate(cls, facts: dict[str, Any] | None = None) -> MachineKey:
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate(), facts if facts is not None else collect_facts())

    @classmethod
    def path(cls) -> Path:
        return paths.home() / KEY_FILE

    @classmethod
    def load(cls) -> MachineKey:
        """The key made by `codemoat machine-id`; an error if this machine has none."""
        p = cls.path()
        try:
            st = p.stat()
        except FileNotFoundError:
            raise VaultError(f"this machine has no identity yet ({p} is missing): run `codemoat machine-id`") from None
        if st.st_mode & 0o077:
            raise VaultError(f"{p} is readable by other users (mode {st.st_mode & 0o777:o}); chmod 600 it")
        raw = paths.read_own(p, "machine key", error=VaultError)  # a FIFO or a link put there: one line
        try:
            d = json.loads(raw)
            key = cls(
                X25519PrivateKey.from_private_bytes(b64d(d["x25519"])),
                Ed25519PrivateKey.from_private_bytes(b64d(d["ed25519"])),
                collect_facts(),
            )
        except (KeyError, TypeError, ValueError, VaultError):
            raise VaultError(f"machine key file {p} is damaged") from None
        key.tpm = _load_tpm(paths.home() / TPM_FILE)
        return key

    @classmethod
    def load_or_create(cls) -> MachineKey:
        p = cls.path()
        if p.exists():
            return cls.load()
        key = cls.generate()
        # Created whole under a private name, then linked into place: link() fails if the key exists, so
        # two processes (or threads) starting at once on a fresh home agree on one key, and no reader
        # ever sees a half-written file. The loser loads the winner's key.
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        write_secret(
            tmp, json.dumps({"x25519": b64e(x_private_raw(key.x25519)), "ed25519": b64e(ed_private_raw(key.ed25519))}).encode()
        )
        try:
            os.link(tmp, p)
        except FileExistsError:
            return cls.load()
        finally:
            tmp.unlink(missing_ok=True)
        from .clock import ClockGuard

        ClockGuard(key).start_record()
        return key

    @property
    def x25519_public(self) -> bytes:
        return public_raw(self.x25519.public_key())

    @property
    def ed25519_public(self) -> bytes:
        return public_raw(self.ed25519.public_key())

    @property
    def id(self) -> str:
        return machine_id_of(self.x25519_public, self.ed25519_public)

    def identity(self) -> dict[str, Any]:
        """The public identity to send to the vendor: public keys and hashed facts, nothing secret."""
        d = {
            "kind": "codemoat-machine",
            "version": 1,
            "id": self.id,
            "x25519": b64e(self.x25519_public),
            "ed25519": b64e(self.ed25519_public),
            "facts": self.facts,
        }
        if self.tpm:
            d["tpm"] = self.tpm["identity"]
        return d

    def attestor(self) -> Any:
        """The TPM this machine's TPM-bound licenses need (`codemoat.attest.tpm.TpmAttestor`, not yet open)."""
        from ..attest.tpm import TpmAttestor

        return TpmAttestor(self._tcti())

    def start_chip(self) -> Any:
        """The same TPM for an offline start's part of it alone (`codemoat.attest.tpmraw.StartChip`, not yet open)."""
        from ..attest.tpmraw import StartChip

        return StartChip(self._tcti())

    def _tcti(self) -> str:
        if not self.tpm:
            raise VaultError("this license is bound to a TPM, but this machine has none set up (run `codemoat machine-id --tpm`)")
        return os.environ.get(TCTI_ENV) or self.tpm["tcti"]

    def enable_tpm(self, tcti: str, pcrs: list[int]) -> dict[str, Any]:
        """Make (or re-derive) the TPM keys, record the current PCR policy in tpm.json, and return the block."""
        from ..attest.tpm import TpmAttestor

        with TpmAttestor(tcti) as a:
            fresh = a.crl_count() is None
            block = a.identity(pcrs)  # defines the CRL counter when it is not yet
        if fresh:  # the clock record starts at the count the vendor will sign (vault.crl)
            from .clock import ClockGuard

            ClockGuard(self).record_tpm_provisioned(block["crl"]["count"])
        self.tpm = {"tcti": tcti, "identity": block}
        write_secret(paths.home() / TPM_FILE, json.dumps(self.tpm).encode())
        return block


def _load_tpm(p: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(paths.read_own(p, "TPM settings file", error=VaultError))
    except FileNotFoundError:
        return None
    except VaultError:
        raise
    except (OSError, ValueError):
        raise VaultError(f"TPM settings {p} are damaged: run `codemoat machine-id --tpm` again") from None
    if not isinstance(d, dict) or not isinstance(d.get("tcti"), str) or not isinstance(d.get("identity"), dict):
        raise VaultError(f"TPM settings {p} are damaged: run `codemoat machine-id --tpm` again")
    return d


def _latch_ok(latch: Any) -> bool:
    """An NV counter a TPM block names (the policy's tamper latch, the CRL counter): an NV index in the owner range
    and its count."""
    return (
        isinstance(latch, dict)
        and set(latch) == {"index", "count"}
        and all(isinstance(latch[k], int) and not isinstance(latch[k], bool) for k in ("index", "count"))
        and 0x01000000 <= latch["index"] <= 0x01FFFFFF
        and 0 <= latch["count"] < 1 << 64
    )


def check_tpm_block(t: Any) -> dict[str, Any]:
    """A machine identity's "tpm" block, checked for shape: P-256 keys and a SHA-256 PCR policy."""
    from .tpmwrap import p256_public

    if not isinstance(t, dict) or t.get("kind") != "tpm2":
        raise VaultError("machine identity's TPM block is malformed")
    p256_public(t.get("ak"), "machine TPM attestation key")
    p256_public(t.get("unwrap"), "machine TPM unwrap key")
    pol = t.get("policy")
    ok = (
        isinstance(pol, dict)
        and pol.get("bank") == "sha256"
        and isinstance(pol.get("pcrs"), list)
        and pol["pcrs"]
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 24 for x in pol["pcrs"])
        and isinstance(pol.get("digest"), str)
        and len(pol["digest"]) == 64
        and (pol.get("latch") is None or _latch_ok(pol["latch"]))
        and (t.get("crl") is None or _latch_ok(t["crl"]))
    )
    for k in ("unwrap_certify", "crl_certify", "latch_certify"):
        uc = t.get(k)
        ok = ok and (uc is None or (isinstance(uc, dict) and all(isinstance(uc.get(f), str) for f in ("attest", "r", "s"))))
    if not ok or not all(t.get(k) is None or isinstance(t.get(k), str) for k in ("ek", "ek_cert", "ak_public", "unwrap_public")):
        raise VaultError("machine identity's TPM policy is malformed")
    out = {k: t.get(k) for k in ("kind", "ak", "unwrap", "ek", "ek_cert", "policy")}
    if t.get("ak_public") is not None:  # the AK's TPMT_PUBLIC: its TPM name, for the vendor's credential (tpmbind)
        out["ak_public"] = t["ak_public"]
    for k in ("unwrap_public", "unwrap_certify"):  # the unwrap key's area and the AK's TPM2_Certify of it (tpmbind)
        if t.get(k) is not None:
            out[k] = t[k]
    if t.get("crl") is not None:  # the CRL counter and its count at provisioning (vault.crl; none in older identities)
        out["crl"] = t["crl"]
    for k in ("crl_certify", "latch_certify"):  # the AK's TPM2_NV_Certify of those counts (tpmbind)
        if t.get(k) is not None:
            out[k] = t[k]
    return out


#: a fact as `_h` makes it: the first 32 hex digits of a SHA-256
_FACT_HASH = re.compile(r"[0-9a-f]{32}")
#: the groups `collect_facts` records as a list (a machine has several network cards, GPUs); the others are one hash
LISTED = ("macs", "gpus")


def check_facts(facts: Any, *, chip_bound: bool, allow_none: bool = False) -> dict[str, Any]:
    """A machine identity's hardware facts, checked as `collect_facts` makes them: known groups, each a hash
    (or, for network cards and GPUs, a list of them). An identity with its facts deleted, `{}`, or of the wrong
    type (`"macs": 5`) was licensed with `facts: {}`, which `match_facts` matches on any machine: the license
    was bound to nothing but a key file that copies anywhere. None at all is allowed when a chip binds the license
    instead (`chip_bound`: a TPM, whose unwrap key never leaves it, or an SEV-SNP guest's lease), or when the
    vendor says so (`allow_none`: `license issue --allow-no-hardware-facts`): `collect_facts` finds none on some
    machines (an arm64 CPU names no model, a container has no machine-id, product_uuid is root's only)."""
    if facts is None:
        raise VaultError(
            "machine identity has no hardware facts ('facts' is missing): send `codemoat machine-id --json` unchanged"
        )
    if not isinstance(facts, dict):
        raise VaultError(f"machine identity's hardware facts are malformed ('facts' is a {type(facts).__name__}, not an object)")
    for group, value in facts.items():
        if group not in GROUPS:
            raise VaultError(f"machine identity names an unknown hardware fact {group[:40]!r} (known: {', '.join(GROUPS)})")
        if group in LISTED:
            ok = isinstance(value, list) and value and all(isinstance(v, str) and _FACT_HASH.fullmatch(v) for v in value)
        else:
            ok = isinstance(value, str) and _FACT_HASH.fullmatch(value)
        if not ok:
            want = "a list of 32-hex-digit hashes" if group in LISTED else "a 32-hex-digit hash"
            raise VaultError(f"machine identity's hardware fact {group!r} is malformed: {want}, not {str(value)[:40]!r}")
    if not facts and not chip_bound and not allow_none:
        raise VaultError(
            "machine identity holds no hardware facts, so a license would bind it to no hardware: run "
            "`codemoat machine-id --json` on the machine itself (or `--tpm` to bind it to its TPM), or pass "
            "--allow-no-hardware-facts if this machine has none to give"
        )
    return facts


def machine_id_of(x_pub: bytes, ed_pub: bytes) -> str:
    return "m_" + hashlib.sha256(b"codemoat-machine-v1\x00" + x_pub + ed_pub).hexdigest()[:24]


def parse_identity(text_or_path: str | dict) -> dict[str, Any]:
    """A machine identity from a file, a JSON string or a dict; checked for shape and self-consistency."""
    if isinstance(text_or_path, dict):
        d: Any = text_or_path
    else:
        src = text_or_path.strip()
        if not src.startswith("{"):
            if os.path.isdir(src):
                raise VaultError(f"machine identity {text_or_path} is a folder: name the identity file")
            if not os.path.lexists(src):
                raise VaultError(f"machine identity {text_or_path!r} is neither a file nor JSON")
            try:  # only a regular file, up to MAX_DOC: a FIFO or /dev/zero is refused, not read for good
                src = paths.read_regular(src, "machine identity file", MAX_DOC, VaultError).decode("utf-8")
            except UnicodeDecodeError:
                raise VaultError(f"machine identity file {text_or_path} is not text (not UTF-8)") from None
        try:
            d = json.loads(src)
        except ValueError:
            raise VaultError("machine identity is not valid JSON") from None
    if not isinstance(d, dict) or d.get("kind") != "codemoat-machine":
        raise VaultError("machine identity is not a codemoat machine identity (run `codemoat machine-id --json`)")
    x = b64d(d.get("x25519"), "machine x25519 key")
    e = b64d(d.get("ed25519"), "machine ed25519 key")
    if len(x) != 32 or len(e) != 32:
        raise VaultError("machine identity keys are malformed")
    if d.get("id") != machine_id_of(x, e):
        raise VaultError("machine identity id does not match its keys")
    facts = check_facts(d.get("facts"), chip_bound=d.get("tpm") is not None, allow_none=True)  # none: at `license issue`
    out = {"id": d["id"], "x25519": d["x25519"], "ed25519": d["ed25519"], "facts": facts}
    if d.get("tpm") is not None:
        out["tpm"] = check_tpm_block(d["tpm"])
    return out
