"""Adapters on a Gemma 3 base: the GGUF adapter carries the base's architecture (llama.cpp refuses
a mismatch) and keeps HF's q/k row order (only llama GGUFs are permuted), so llama.cpp with the
adapter gives PEFT's logits on a tiny random Gemma-3-architecture model built here."""

from __future__ import annotations

import gguf
import pytest

from tests.tune.loras import peft_vs_llamacpp
from tests.tune.tinygemma import build_tiny_gemma3

PROMPT = "class Greeter:\n    def greet(self, name):\n        return"


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf")


def test_gemma3_adapter_in_llamacpp_matches_peft(gemma3):
    err, moved = peft_vs_llamacpp(gemma3, PROMPT)
    assert err < 0.05, err
    assert moved > 20 * max(err, 0.05)  # the adapter really moves the logits


def test_llama_q_k_order_on_a_gemma3_base_is_wrong(gemma3):
    """The negative: with q/k rows permuted as for llama, the logits are far from PEFT's (so the test
    above would catch a writer that permuted every architecture)."""
    err, _ = peft_vs_llamacpp(gemma3, PROMPT, permute_anyway=True)
    assert err > 0.5, err


def test_the_adapter_names_the_base_architecture(gemma3):
    import os

    import torch

    from codemoat.tune.base import load_base
    from codemoat.tune.lora import gguf_bytes, wrap

    base = load_base(gemma3, n_ctx=64)
    assert base.arch == "gemma3"
    torch.manual_seed(0)
    data = gguf_bytes(wrap(base.model, 2), base.hf_config, 4.0, "t", arch=base.arch)
    fd = os.memfd_create("a")
    try:
        os.write(fd, data)
        r = gguf.GGUFReader(f"/proc/self/fd/{fd}")
        f = r.fields["general.architecture"]
        assert bytes(f.parts[f.data[0]]).decode() == "gemma3"
        names = {t.name for t in r.tensors}
        assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    finally:
        os.close(fd)


def test_samples_for_a_base_without_fim_tokens_use_its_own_markers(tmp_path, tiny_gguf):
    """A Gemma-style vocabulary (no FIM or repository tokens, `<eos>`): no FIM or cross-file samples,
    each sample ended by `<eos>`, so no `<|fim_prefix|>` is ever trained as text; the bundled model
    keeps vendor train's mix."""
    from codemoat.train.corpus import SourceFile
    from codemoat.train.data import epoch_rows
    from codemoat.tune.base import load_base
    from codemoat.tune.trainer import data_options
    from tests.special_models import build_special_gguf

    files = [SourceFile(f"r/m{i}.py", "def add(a, b):\n    return a + b\n" * 20) for i in range(4)]
    g = load_base(build_special_gguf(tmp_path / "gemma-style.gguf", "gemma"), n_ctx=64)
    o = data_options(g.tokenizer, g.eos, "r")
    assert (o.fim_rate, o.repo_rate, o.eos) == (0.0, 0.0, "<eos>")
    rows = epoch_rows(files, g.tokenizer, 64, o, 0, 0)
    text = g.tokenizer.decode(rows.flatten().tolist(), skip_special_tokens=False)
    assert "<|" not in text and "<eos>" in text
    b = load_base(tiny_gguf, n_ctx=64)
    o = data_options(b.tokenizer, b.eos, "r")
    assert o.fim_rate > 0 and o.repo_rate > 0 and o.eos == "<|endoftext|>"
