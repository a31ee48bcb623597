"""What trace needs from the vendor directory: customers' secrets and the unfingerprinted originals.

Secrets come from `codemoat.vault.vendor.Vendor`. Originals are the `source` paths that
`Vendor.seal` records for every fingerprinted model; `--original` overrides them. The suspect is
compared with the recorded original whose tensors (names and shapes) it shares most.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CodemoatError


def open_vendor(root: str | Path):
    from ..vault.vendor import Vendor

    return Vendor.open(root)


def fingerprint_secrets(vendor, customer: str | None = None) -> dict[str, bytes]:
    """Customer name → fingerprint secret (one customer when `customer` is given)."""
    return _secrets(vendor, customer, "fingerprint_secret")


def watermark_secrets(vendor, customer: str | None = None) -> dict[str, bytes]:
    """Customer name → watermark secret (one customer when `customer` is given)."""
    return _secrets(vendor, customer, "watermark_secret")


def _secrets(vendor, customer: str | None, attr: str) -> dict[str, bytes]:
    if customer is not None:
        c = vendor.find_customer(customer)
        if c is None:
            raise CodemoatError(f"no customer named {customer!r} in this vendor directory")
        return {c.name: getattr(c, attr)}
    out = {c.name: getattr(c, attr) for c in vendor.customers()}
    if not out:
        raise CodemoatError("this vendor has no customers yet: seal a model for one first")
    return out


def recorded_originals(vendor) -> list[Path]:
    """Source paths of every model this vendor sealed with a fingerprint, most recent first."""
    return vendor.originals()


def weights_path(path: str | Path) -> Path:
    """The weights file of a model: a .gguf, a .safetensors, or a folder holding one .safetensors."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise CodemoatError(f"{p} must hold exactly one .safetensors file (found {len(found)})")
        return found[0]
    if not p.is_file():
        raise CodemoatError(f"model not found: {p}")
    return p


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and numpy-order shapes of a model's tensors, from its header only."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        from .gguf_stream import GGUFFile

        with GGUFFile(path) as g:  # the header only: no vocabulary decoded, no tensor read
            return {t.name: t.shape for t in g.tensors}
    from . import st_io

    try:
        header = st_io.read_header(path)
    except (CodemoatError, OSError) as e:
        raise not_a_model(path, e) from None
    return {k: tuple(v["shape"]) for k, v in header.items()}


def not_a_model(path, why: Exception) -> CodemoatError:
    """A file that is not a GGUF and fails as a safetensors file: which check it failed, in one line."""
    return CodemoatError(f"{path}: {why} (nor a GGUF; a sealed .moat must be unsealed first: codemoat vendor unseal)")


def pick_original(suspect: Path, candidates: list[Path]) -> Path:
    """The candidate sharing the most weights (same name and shape) with `suspect`."""
    want = tensor_shapes(suspect)
    best, best_n = None, 0
    for c in candidates:
        try:
            w = weights_path(c)
            have = tensor_shapes(w)
        except CodemoatError:
            continue  # an original moved away or damaged: others may still match
        n = sum(int(_prod(s)) for k, s in have.items() if want.get(k) == s and len(s) >= 2)
        if n > best_n:
            best, best_n = w, n
    if best is None:
        if not candidates:
            raise CodemoatError("no original recorded for this vendor: pass --original PATH (the unfingerprinted model)")
        raise CodemoatError("the suspect shares no weight matrix with any recorded original: pass --original PATH")
    return best


def _prod(s: tuple[int, ...]) -> int:
    out = 1
    for d in s:
        out *= d
    return out
