"""A Hugging Face folder's identity (`engines.adapters.folder_sha256`, what a vLLM adapter's base is
checked against) and what `vendor seal` packs of it: one list (`vault.seal_model.model_file`), the
weights, JSON and tokenizer files, each by name and size. Before, the identity was the SHA-256 of
the weights and top-level JSON files run together: bytes moved from one file to the next, or a
renamed file, kept it, and merges.txt / tokenizer.model were neither covered nor sealed."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError


def _folder(root: Path, *, bpe: bool = False) -> Path:
    """A model folder: weights and a config; with `bpe`, a GPT-2 byte-level BPE tokenizer given as
    vocab.json + merges.txt only (no tokenizer.json: transformers builds it from those two)."""
    root.mkdir()
    # a safetensors file of one tensor: `vendor seal` refuses weights that are not one, or hold none
    head = b'{"w":{"dtype":"U8","shape":[3990],"data_offsets":[0,3990]}}'
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"W" * 3990)
    (root / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300}))
    if bpe:
        from tokenizers.pre_tokenizers import ByteLevel

        chars = sorted(ByteLevel.alphabet())
        merges = [("d", "e"), ("de", "f"), ("Ġ", "r"), ("Ġr", "e")]
        vocab = {c: i for i, c in enumerate(chars)} | {a + b: 256 + i for i, (a, b) in enumerate(merges)}
        vocab["<|endoftext|>"] = len(vocab)
        (root / "vocab.json").write_text(json.dumps(vocab))
        (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    else:
        (root / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "pad": "x" * 50}))
    return root


def test_moving_bytes_between_files_renaming_one_or_changing_a_tokenizer_file_changes_the_identity(tmp_path):
    from codemoat.engines.adapters import folder_identity, folder_sha256

    f = _folder(tmp_path / "m")
    first, legacy = folder_identity(f)
    assert first.startswith("v2:") and legacy is not None
    # the attack: the last bytes of the weights moved to the front of config.json (the run together is the same)
    w, c = f / "model.safetensors", f / "config.json"
    data = w.read_bytes()
    w.write_bytes(data[:-3])
    c.write_bytes(data[-3:] + c.read_bytes())
    assert folder_identity(f)[1] == legacy  # what the old digest saw: nothing changed
    assert folder_sha256(f) != first
    w.write_bytes(data)
    c.write_bytes(c.read_bytes()[3:])
    assert folder_sha256(f) == first
    # a renamed file, same order, same bytes
    (f / "tokenizer.json").rename(f / "tokenizer_.json")
    assert folder_sha256(f) != first
    (f / "tokenizer_.json").rename(f / "tokenizer.json")
    # the tokenizer files that are not JSON are the model's too
    for name in ("merges.txt", "tokenizer.model", "vocab.txt"):
        (f / name).write_text("a b\n")
        one = folder_sha256(f)
        assert one != first
        (f / name).write_text("a c\n")
        assert folder_sha256(f) != one
        (f / name).unlink()
    assert folder_sha256(f) == first
    (f / "notes.md").write_text("not a model file")
    assert folder_sha256(f) == first


def test_an_adapter_is_refused_over_a_folder_whose_bytes_moved_and_an_old_one_serves_on_its_folder(tmp_path):
    """open_adapters for vLLM: a v2 adapter serves over its folder and not over one with bytes moved;
    one recording the pre-v2 digest still serves over the same folder, and not once the folder
    holds a tokenizer file that digest never covered."""
    from codemoat.engines import adapters as ad
    from codemoat.engines.adapters import Adapter, folder_identity, open_adapters, seal_adapter

    f = _folder(tmp_path / "m")
    now, legacy = folder_identity(f)

    def sealed(name: str, hf: str) -> str:
        meta = {"name": name, "kind": "codemoat-adapter", "version": 1, "base": {"name": "m", "sha256": hf, "hf_sha256": hf}}
        meta["repos"] = []
        return str(seal_adapter(Adapter(meta, b"GGUF", b"weights", json.dumps({"r": 8})), tmp_path / f"{name}.moat"))

    new, old = sealed("new", now), sealed("old", legacy)
    try:
        assert [a.name for a in open_adapters([new, old], "vllm", f)] == ["new", "old"]
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(data[:-3])
        (f / "config.json").write_bytes(data[-3:] + (f / "config.json").read_bytes())
        with pytest.raises(CodemoatError, match="another base model than the Hugging Face weights vLLM serves"):
            open_adapters([new], "vllm", f)
        (f / "model.safetensors").write_bytes(data)
        (f / "config.json").write_bytes((f / "config.json").read_bytes()[3:])
        (f / "merges.txt").write_text("a b\n")
        with pytest.raises(CodemoatError, match="another base model"):
            open_adapters([old], "vllm", f)
    finally:
        for key in [k for k in ad._LOADED if k.startswith(str(tmp_path.resolve()))]:
            os.close(ad._LOADED.pop(key)[1].fd)


def test_a_sealed_bpe_folder_keeps_its_merges_and_its_identity(tmp_path):
    """vendor seal of a folder whose tokenizer is vocab.json + merges.txt: the sealed file holds
    merges.txt, the engine's private config folder gets it back (`unpack_config`, what the vllm
    engine and tune load a sealed folder's tokenizer from) and the tokenizer loaded there encodes as
    the plaintext folder's does; the sealed folder's identity, from its signed manifest alone, is the
    plaintext folder's. Before, merges.txt was not sealed and the tokenizer did not load."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from transformers import AutoTokenizer

    from codemoat.engines.adapters import folder_sha256, parts_identity
    from codemoat.engines.vllm_handoff import unpack_config
    from codemoat.vault.seal_model import seal_model

    f = _folder(tmp_path / "bpe", bpe=True)
    sealed, key, fmt = seal_model(
        f,
        tmp_path / "bpe.moat",
        signing_key=Ed25519PrivateKey.generate(),
        customer="acme",
        customer_id="c1",
        fingerprint_secret=b"s" * 32,
    )
    m = sealed.manifest
    assert fmt == "safetensors" and "merges.txt" in [p["name"] for p in m.parts]
    assert parts_identity(m.parts, m.plaintext_sha256)[0] == folder_sha256(f)
    plain = sealed.decrypt(key)
    private = unpack_config(memoryview(plain), {p["name"]: (p["offset"], p["size"]) for p in m.parts})
    try:
        assert sorted(os.listdir(private.path)) == ["config.json", "merges.txt", "tokenizer_config.json", "vocab.json"]
        text = "def f(): return def"
        want = AutoTokenizer.from_pretrained(str(f))(text)["input_ids"]
        assert AutoTokenizer.from_pretrained(str(private.path))(text)["input_ids"] == want
        assert 257 in want  # the merges applied ("def")
    finally:
        private.remove()
