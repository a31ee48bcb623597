"""The tokenizer's special tokens and byte coverage; the model against Hugging Face's LlamaForCausalLM."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from codemoat.train.export import permute_qk  # noqa: E402
from codemoat.train.model import Llama, ModelConfig  # noqa: E402
from codemoat.train.tokenizer import SPECIAL_TOKENS, train_tokenizer, vocab_and_merges  # noqa: E402

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = 1  # comment\n",
    "import os\nfor i in range(10):\n    print(i, os.sep)\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CODE, vocab_size=400)


def test_special_tokens_are_single_ids(tok):
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode(s, add_special_tokens=False).ids == [i]
    text = "<|fim_prefix|>x = 1<|fim_suffix|>\n<|fim_middle|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == 1 and 3 in ids and ids[-1] == 2


def test_any_text_round_trips(tok):
    for text in ["naïve = 'café' # 日本語 🎉", "\t\t  \r\n\x00\x7f", "x" * 50, "    return a + b\n"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_learned_merges_compress_code(tok):
    text = CODE[0]
    assert len(tok.encode(text).ids) < len(text.encode()) / 2
    vocab, merges = vocab_and_merges(tok)
    assert len(vocab) == tok.get_vocab_size() and vocab[:7] == SPECIAL_TOKENS
    assert all(len(m.split(" ")) == 2 for m in merges)


def test_model_matches_transformers_llama():
    """Our readable model and HF's LlamaForCausalLM compute the same function from the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, n_ctx=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128)
    ours = Llama(cfg).eval()
    hf_cfg = cfg.to_hf(bos_id=0, eos_id=0)
    hf_cfg.pop("codemoat")
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**hf_cfg)).eval()
    missing, unexpected = hf.load_state_dict(ours.hf_state_dict(), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []
    hf.tie_weights()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), hf(x).logits.numpy(), atol=2e-5)
    # and a different model does not
    other = Llama(cfg).eval()
    with torch.no_grad():
        assert np.abs(other(x).numpy() - hf(x).logits.numpy()).max() > 1e-2


def test_permute_qk_pairs_rotate_half_dims_adjacently():
    hd, n_head = 8, 2
    w = np.arange(n_head * hd, dtype=np.float32)[:, None]  # row r holds r
    p = permute_qk(w, n_head)[:, 0].astype(int).tolist()
    # HF pairs (i, i + hd/2) within a head; llama.cpp wants them at (2i, 2i + 1)
    assert p[:hd] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert p[hd:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=50, n_ctx=16, d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_ff=64)
    m = Llama(cfg)
    x = torch.randint(0, 50, (4, 17))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m.loss(x[:, :-1], x[:, 1:]).item()
    for _ in range(40):
        loss = m.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first * 0.5
