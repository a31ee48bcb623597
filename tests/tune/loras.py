"""A random LoRA adapter for a GGUF model, written with the `gguf` package (no torch): strong enough
that greedy completions with and without it differ."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def random_lora_gguf(base: Path, rank: int = 4, scale: float = 0.3, seed: int = 0) -> bytes:
    import gguf

    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(str(base))
    fd = os.memfd_create("lora")
    try:
        w = gguf.GGUFWriter(f"/proc/self/fd/{fd}", "llama")
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(rank))
        for t in reader.tensors:
            if t.name.endswith(("attn_q.weight", "attn_v.weight", "ffn_up.weight")):
                n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ne order: columns first
                w.add_tensor(t.name + ".lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
                w.add_tensor(t.name + ".lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
        return _written(w, fd)
    finally:
        os.close(fd)


def forcing_lora_gguf(base: Path, token: str, strength: float = 64.0) -> bytes:
    """A LoRA adapter on `token_embd` that adds `strength` x the unit vector of `token`'s output row to
    every input embedding, so that base + adapter answers `token` at every step whatever the prompt,
    the base's own weights (a per-customer fingerprint included) or the batch: a test asserts the exact
    answer instead of hoping that a random adapter moves a greedy answer away from the base's.
    `token` is spelt as in the GGUF's vocabulary ("Ġfox" for " fox"). Untied models only: where the output
    reuses token_embd, llama.cpp applies this pair to the output matmul too, and aborts (shapes)."""
    import gguf

    reader = gguf.GGUFReader(str(base))
    f = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(f.parts[i]).decode() for i in f.data]
    tid = vocab.index(token)
    ts = {t.name: t for t in reader.tensors}
    out = ts["output.weight"]
    row = np.asarray(gguf.quants.dequantize(out.data, out.tensor_type), dtype=np.float32).reshape(len(vocab), -1)[tid]
    fd = os.memfd_create("lora")
    try:
        w = gguf.GGUFWriter(f"/proc/self/fd/{fd}", reader.fields["general.architecture"].contents())
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 1.0)
        # token_embd's pair is stored flipped (llama.cpp's build_inp_embd): delta(t) = b @ a[t]
        w.add_tensor("token_embd.weight.lora_a", np.ones((len(vocab), 1), np.float32))
        w.add_tensor("token_embd.weight.lora_b", (row / np.linalg.norm(row) * strength).astype(np.float32)[:, None])
        return _written(w, fd)
    finally:
        os.close(fd)


def sealed_adapter(base: Path, out: Path, name: str, repos: list[tuple[str, list[str]]], seed: int = 0) -> Path:
    from codemoat.engines.adapters import Adapter, file_sha256, seal_adapter

    meta = {
        "name": name,
        "kind": "codemoat-adapter",
        "version": 1,
        "base": {"name": base.stem, "sha256": file_sha256(base)},
        "repos": [{"name": r, "groups": g} for r, g in repos],
    }
    return seal_adapter(Adapter(meta, random_lora_gguf(base, seed=seed), b"", "{}"), out)


def peft_vs_llamacpp(base_path: Path, prompt: str, *, permute_anyway: bool = False) -> tuple[float, float]:
    """(max |llama.cpp logits with the GGUF adapter - PEFT's|, max |PEFT's - the base's|) for a random
    rank-4 LoRA on every linear layer of `base_path`; the adapter is loaded from a memfd.
    `permute_anyway` writes q/k rows in llama's permuted order whatever the architecture (the old bug)."""
    import llama_cpp
    import torch

    from codemoat.tune import lora
    from codemoat.tune.base import load_base

    base = load_base(base_path, n_ctx=128)
    ids = base.tokenizer.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        plain = base.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    model = lora.wrap(base.model, 4, 8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    saved = lora.PERMUTED_QK
    lora.PERMUTED_QK = saved | {base.arch} if permute_anyway else saved
    try:
        data = lora.gguf_bytes(model, base.hf_config, 8.0, "t", arch=base.arch)
    finally:
        lora.PERMUTED_QK = saved
    fd = os.memfd_create("adapter")
    try:
        os.write(fd, data)
        llm = llama_cpp.Llama(str(base_path), lora_path=f"/proc/self/fd/{fd}", n_ctx=128, logits_all=True, verbose=False)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        llm.close()
    finally:
        os.close(fd)
    return float(np.abs(got - want).max()), float(np.abs(plain - want).max())


def finetune_lora(base_path: Path, texts: list[str], *, steps: int, rank: int = 8, lr: float = 2e-3, n_ctx: int = 32):
    """A customer's own fine-tune of a GGUF: `steps` AdamW steps of a rank-`rank` LoRA on every linear
    layer (`codemoat tune`'s learning rate), on windows of `texts`, on one thread; returns (peft model, base)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    try:
        return _finetune(base_path, texts, steps, rank, lr, n_ctx)
    finally:
        torch.set_num_threads(threads)


def _finetune(base_path: Path, texts: list[str], steps: int, rank: int, lr: float, n_ctx: int):
    import torch

    from codemoat.tune.base import load_base
    from codemoat.tune.lora import wrap

    torch.manual_seed(0)
    base = load_base(base_path, n_ctx=n_ctx)
    ids = [i for t in texts for i in base.tokenizer.encode(t, add_special_tokens=False).ids]
    model = wrap(base.model, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for s in range(steps):
        at = (s * n_ctx) % (len(ids) - n_ctx - 1)
        x = torch.tensor([ids[at : at + n_ctx + 1]])
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, base


def merge_lora(src: Path, adapter_gguf: bytes, dst: Path) -> Path:
    """What llama.cpp's `llama-export-lora` does: W + (alpha / r) · B·A written into every adapted
    matrix of the GGUF `src` (types kept), as a customer who folds an adapter into the weights."""
    import gguf

    from tests.trace import attacks

    fd = os.memfd_create("adapter")
    try:
        os.write(fd, adapter_gguf)
        r = gguf.GGUFReader(f"/proc/self/fd/{fd}")
        f = r.fields["adapter.lora.alpha"]
        alpha = float(f.parts[f.data[0]][0])
        ts = {t.name: np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors}
    finally:
        os.close(fd)

    def fold(mats: dict[str, np.ndarray], _meta: dict) -> None:
        for name, a in ts.items():
            if name.endswith(".lora_a"):
                b = ts[name[: -len("_a")] + "_b"]
                w = name[: -len(".lora_a")]
                mats[w] = (mats[w] + (alpha / a.shape[0]) * (b @ a)).astype(mats[w].dtype)

    return attacks.transform(src, dst, fold)


def _written(w, fd: int) -> bytes:
    """Write a GGUFWriter's file into the memfd `fd` and read the bytes back."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.pread(fd, os.fstat(fd).st_size, 0)
