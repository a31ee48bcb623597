"""Sealing a model file for one customer: read (or stream) it, fingerprint it, encrypt it.

A GGUF file is streamed tensor by tensor (read twice: hash, then encrypt), so a model larger than
memory seals; a safetensors model (file or folder) is packed in memory with its config and tokenizer files.
Every file is opened with `paths.open_regular` (no size limit: models are large by design), so a
FIFO or a device named as the model is refused in one line instead of waited on or sealed empty.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import CodemoatError, NotFound
from ..paths import open_regular, read_regular
from .container import SealedFile
from .sealer import seal_bytes, seal_stream

Fingerprinter = Callable[[bytes, str, bytes], bytes]


def read_model(path: Path) -> tuple[str, str, bytearray, list[dict[str, Any]]]:
    """(model id, format, plaintext, parts) of a .gguf file or a safetensors model (file or folder).

    A safetensors model is packed as its weights followed by the folder's other model files
    (config.json, tokenizer.json, merges.txt, ...: `folder_files`), each a named part in the manifest."""
    if not path.exists():
        raise NotFound(f"model not found: {path}")
    if path.suffix == ".gguf" and not path.is_dir():
        _, size, header_size = _whole_gguf(path, "model")
        with _open(path) as f:  # read into the one buffer: the model is held once
            data = bytearray(size)
            got = f.readinto(data)
            more = f.read(1)
        if got != size or more:
            raise CodemoatError(f"{path}: changed while it was read ({size} bytes, then {'more' if more else got})")
        with memoryview(data) as view:  # what is read is what was checked, not what the path holds later
            _same_gguf(path, view[:header_size], size, header_size)
        return path.stem, "gguf", data, [{"name": path.name, "offset": 0, "size": len(data)}]
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        files = folder_files(folder)
    elif path.suffix == ".safetensors":
        os.close(open_regular(path, "model")[0])
        files = folder_files(folder, path)
    else:
        raise CodemoatError(f"{path.name}: a model is a .gguf file, a .safetensors file or a folder holding one")
    wpath = files[0]
    blobs = [read_regular(p, "model", None) for p in files]
    check_safetensors(wpath, blobs[0])
    data = bytearray(b"".join(blobs))
    parts, off = [], 0
    for p, b in zip(files, blobs):
        parts.append({"name": p.name, "offset": off, "size": len(b)})
        off += len(b)
    model_id = folder.name if path.is_dir() else wpath.stem
    return model_id, "safetensors", data, parts


def check_safetensors(path: Path, data: bytes) -> None:
    """Refuse, in one line naming `path`, weights whose safetensors header is not one (a customer's
    file sealed or imported, or one swapped on disk): checked here, so a hostile header never reaches
    a sealed file and the engines' loaders, and costs a bounded memory to refuse (`trace.st_io`)."""
    from ..trace import st_io

    try:
        st_io.buffer_header(memoryview(data))
    except CodemoatError as e:
        raise CodemoatError(f"{path}: {e}") from None


def check_gguf(path: Path, what: str = "model") -> dict:
    """Refuse, in one line naming `path`, a GGUF that does not parse whole: its header, every tensor's
    info, and a data section long enough for every tensor (`trace.gguf_stream` checks each one's end).
    Only the magic was checked, so `vendor seal --no-fingerprint` sealed the magic followed by garbage, or
    a model cut to its first megabyte, and the customer learned it at load time. Returns the scalar metadata."""
    return _whole_gguf(path, what)[0]


def checked_gguf_size(path: Path) -> int:
    """The size of the GGUF model at `path`, once found whole (`check_gguf`): what is sealed must be that
    many bytes (`seal_stream` refuses more or fewer), so a file cut or grown after the check is not sealed."""
    return _whole_gguf(path, "model")[1]


def _whole_gguf(path: Path, what: str) -> tuple[dict, int, int]:
    """(scalar metadata, file size, header size) of a GGUF that parses whole."""
    from ..trace.gguf_stream import GGUFFile

    try:
        g = GGUFFile(path, name=str(path))
    except CodemoatError:
        if _big_endian(path):
            raise CodemoatError(f"{path}: big-endian GGUF is not supported (convert it to little-endian)") from None
        raise
    with g:
        if not g.tensors:
            raise CodemoatError(f"{path}: a GGUF {what} holds tensors, this one none")
        return g.metadata, g.file_size, g.header_size


def _big_endian(path: Path) -> bool:
    """Whether `path` starts as a big-endian GGUF does (llama.cpp's `gguf-py` tells them apart the same way: its
    version's low 16 bits are 0 read little-endian). They were refused as "truncated or not a valid GGUF file"."""
    try:
        fd = open_regular(path, "model")[0]
    except CodemoatError:
        return False
    try:
        head = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    version = int.from_bytes(head[4:8], "little")
    return len(head) == 8 and head[:4] == b"GGUF" and version & 0xFFFF == 0 and version != 0


def _same_gguf(path: Path, header: memoryview, size: int, header_size: int) -> None:
    """Refuse, as changed while it was read, bytes read from `path` that are not the GGUF model it was checked as:
    their own header (`header_size` bytes, the checked file's) must parse whole for a file of `size` bytes, and end
    where the checked one did (so the parse read none past it). The file was checked, then opened again and read:
    one swapped for another of the same size in between was sealed unchecked. The header is checked from a memfd of
    it, its tensors' bytes left a hole (never in memory twice), so no model is read a second time."""
    from ..trace.gguf_stream import GGUFFile

    fd = os.memfd_create("codemoat-gguf-header", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb", buffering=0) as w:
            w.write(header)
        os.ftruncate(fd, size)
        with GGUFFile(f"/proc/self/fd/{fd}", name=str(path)) as g:
            same = bool(g.tensors) and g.header_size == header_size and g.file_size == size
    except CodemoatError:
        same = False
    finally:
        os.close(fd)
    if not same:
        raise CodemoatError(f"{path}: changed while it was read (the bytes read are not the GGUF model checked)")


def check_model(path: Path) -> None:
    """Refuse, in one line naming the file, a model that `seal_model` would seal broken: a GGUF that does not
    parse whole (`check_gguf`), or safetensors weights whose header does not parse, or names no tensor or one
    past the file's end or of the wrong size (`trace.st_io`). Only the magic was checked, so `Vendor.seal`
    sealed a truncated model or random bytes and the customer learned it at load time, from a file nobody
    could inspect. Cheap (headers only), so a caller checks before it records anything (`Vendor.seal`)."""
    if not path.exists():
        raise NotFound(f"model not found: {path}")
    if path.suffix == ".gguf" and not path.is_dir():
        checked_gguf_size(path)
        return
    from ..trace import st_io

    files = folder_files(path) if path.is_dir() else folder_files(path.parent, path) if path.suffix == ".safetensors" else None
    if files is None:
        raise CodemoatError(f"{path.name}: a model is a .gguf file, a .safetensors file or a folder holding one")
    weights = files[0]
    os.close(open_regular(weights, "model")[0])  # a FIFO is refused, not waited on (st_io opens it plainly)
    try:
        tensors = st_io.read_header(weights)
    except CodemoatError as e:
        raise CodemoatError(f"{weights}: {e}") from None
    if not tensors:
        raise CodemoatError(f"{weights}: a safetensors model holds tensors, this one none")


def check_lora_adapter(path: Path) -> None:
    """Refuse a file that is not a LoRA adapter: a GGUF must parse whole (`check_gguf`) and say
    `general.type = adapter`, `adapter.type = lora`, as llama.cpp's converter and `tune.lora` write it;
    a safetensors file must name peft's lora_A/lora_B tensors. Random bytes, or a whole base model,
    were released as an adapter (llama.cpp refused it on the customer's machine, or served the base twice)."""
    if path.suffix == ".gguf":
        meta = check_gguf(path, "LoRA adapter")
        kind = (meta.get("general.type"), meta.get("adapter.type"))
        if kind != ("adapter", "lora"):
            raise CodemoatError(
                f"{path} is not a LoRA adapter: its GGUF metadata says general.type={kind[0]!r}, "
                f"adapter.type={kind[1]!r} (an adapter says 'adapter' and 'lora')"
            )
        return
    if path.suffix == ".safetensors":
        from ..trace import st_io

        os.close(open_regular(path, "adapter")[0])  # a FIFO is refused, not waited on (st_io opens it plainly)
        try:
            names = list(st_io.read_header(path))
        except CodemoatError as e:
            raise CodemoatError(f"{path}: {e}") from None
        if not any(".lora_A." in n or ".lora_B." in n for n in names):
            raise CodemoatError(f"{path} is not a LoRA adapter: it names no lora_A or lora_B tensor (peft's layout)")
        return
    raise CodemoatError(f"{path}: an adapter is a .gguf or .safetensors file")


#: the tokenizer files a Hugging Face folder may need that are not JSON (sentencepiece, BPE merges, WordPiece)
TOKENIZER_FILES = frozenset({"tokenizer.model", "spiece.model", "merges.txt", "vocab.txt", "chat_template.jinja"})


def model_file(name: str) -> bool:
    """Whether a folder's file `name` is part of the model beside its weights: packed by `vendor seal`,
    covered by its identity (`engines.adapters.folder_sha256`), unpacked beside a sealed folder's
    config for the engine (`engines.vllm_handoff.unpack_config`). One list for all three."""
    return not name.startswith(".") and (name.endswith(".json") or name in TOKENIZER_FILES)


def folder_files(folder: Path, weights: Path | None = None) -> list[Path]:
    """The files of a safetensors model, in the order they are sealed: the weights (the folder's one
    .safetensors file), then its other model files by name (`model_file`: JSON, tokenizer files).
    Their bytes in this order are the sealed plaintext; their names, sizes and that plaintext's
    SHA-256 are the model's identity, sealed or not (`engines.adapters.folder_sha256`)."""
    if weights is None:
        found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            raise CodemoatError(f"{folder} must hold exactly one .safetensors file (found {len(found)})")
        weights = found[0]
    if not (folder / "config.json").is_file():
        raise CodemoatError(f"{folder} has no config.json beside the safetensors weights")
    return [weights] + sorted(p for p in folder.iterdir() if model_file(p.name) and p.is_file())


def model_inputs(model: Path) -> list[Path]:
    """The files `read_model` reads for `model` (a .gguf file, or a safetensors file or folder with its
    config and tokenizer files): what the sealed output must not replace. An unreadable folder gives the
    path alone (sealing then says what is wrong with it)."""
    try:
        if model.is_dir():
            return folder_files(model)
        if model.suffix == ".safetensors":
            return folder_files(model.parent, model)
    except (CodemoatError, OSError):
        pass
    return [model]


def gguf_pieces(path: Path, stream: Callable | None, secret: bytes) -> tuple[Callable[[], Iterator[Any]], int]:
    """(pieces, size) of a GGUF file, marked by `stream(path, secret)` when given, else as it is. Unmarked, the
    header streamed is checked again before any of it is yielded (`_same_gguf`), and `seal_stream` counts the
    size: the bytes sealed are those checked, not whatever the path held by then."""
    _, size, header_size = _whole_gguf(path, "model")
    if stream is not None:
        marked = stream(path, secret)
        if marked.size != size:
            raise CodemoatError(f"{path}: changed while it was read ({size} bytes, then {marked.size})")
        return marked.pieces, marked.size

    def pieces() -> Iterator[bytes]:
        with _open(path) as f:
            head = f.read(header_size)  # the header alone, checked before it is yielded: no model block held twice
            _same_gguf(path, memoryview(head), size, header_size)
            yield head
            del head
            while block := f.read(32 << 20):
                yield block

    return pieces, size


def _open(path: Path):
    """`path` open for reading in binary, only if it is a regular file (a FIFO is refused, not waited on)."""
    return os.fdopen(open_regular(path, "model")[0], "rb")


def seal_model(
    model: Path,
    out: str | Path,
    *,
    signing_key: Ed25519PrivateKey,
    customer: str,
    customer_id: str,
    fingerprint_secret: bytes,
    fingerprint: Fingerprinter | None = None,
    chunk_size: int | None = None,
) -> tuple[SealedFile, bytes, str]:
    """(sealed file, its fresh content key, format): `model` encrypted for one customer into `out`,
    fingerprinted first when `fingerprint` is given. A model that is not whole is refused first (`check_model`)."""
    check_model(model)
    key = os.urandom(32)
    kw: dict[str, Any] = {"chunk_size": chunk_size} if chunk_size else {}
    common = dict(signing_key=signing_key, content_key=key, customer=customer, customer_id=customer_id)
    stream = getattr(fingerprint, "stream", None) if fingerprint is not None else None
    if model.suffix == ".gguf" and model.exists() and not model.is_dir() and (fingerprint is None or stream is not None):
        pieces, size = gguf_pieces(model, stream, fingerprint_secret)
        sealed = seal_stream(
            pieces,
            size,
            out,
            model_id=model.stem,
            fmt="gguf",
            parts=[{"name": model.name, "offset": 0, "size": size}],
            fingerprinted=fingerprint is not None,
            **common,
            **kw,
        )
        return sealed, key, "gguf"
    model_id, fmt, data, parts = read_model(model)
    if fingerprint is not None:
        w = parts[0]
        marked = fingerprint(bytes(data[w["offset"] : w["offset"] + w["size"]]), fmt, fingerprint_secret)
        if len(marked) != w["size"]:
            data = bytearray(bytes(marked) + bytes(data[w["size"] :]))
            shift = len(marked) - w["size"]
            parts = [dict(p, size=len(marked)) if i == 0 else dict(p, offset=p["offset"] + shift) for i, p in enumerate(parts)]
        else:
            data[: w["size"]] = marked
    sealed = seal_bytes(
        data,
        out,
        model_id=model_id,
        fmt=fmt,
        parts=parts,
        fingerprinted=fingerprint is not None,
        **common,
        **kw,
    )
    data[:] = bytes(len(data))
    return sealed, key, fmt
