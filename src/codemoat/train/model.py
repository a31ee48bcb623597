"""A llama-architecture decoder in plain PyTorch, readable top to bottom (after nanoGPT).

References:
- Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (pre-norm RMSNorm,
  SwiGLU feed-forward, rotary position embeddings, no biases).
- Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (RMSNorm).
- Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU; hidden size 8/3·d).
- Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (RoPE).
- Ainslie et al. 2023, "GQA" (grouped-query attention: n_kv_head ≤ n_head).
- Press & Wolf 2017, "Using the Output Embedding to Improve Language Models" (tied embeddings).

Parameter names follow Hugging Face's `LlamaForCausalLM`, so `state_dict()` loads into it
unchanged; RoPE uses the same "rotate half" pairing (dimension i with i + head_dim/2). The GGUF
exporter permutes q/k rows to llama.cpp's interleaved pairing (see `export.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_ctx: int = 512
    d_model: int = 256
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int = 4
    d_ff: int = 704  # ≈ 8/3 · d_model, rounded to a multiple of 64 (Shazeer 2020)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_hf(self, bos_id: int, eos_id: int) -> dict:
        """The equivalent Hugging Face `LlamaConfig` as a dict (config.json)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.n_ctx,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": "float32",
            "codemoat": asdict(self),
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (T, head_dim) for positions 0..T-1 (Su et al. 2021, θ_i = base^(-2i/d))."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    t = torch.arange(T, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd): "rotate half" layout, as in HF llama
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); pairs dimension i with i + hd/2
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.n_kv_head != c.n_head:  # GQA: each kv head serves n_head / n_kv_head query heads
            rep = c.n_head // c.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Trunk(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Llama(nn.Module):
    """Decoder-only transformer; `forward(idx)` gives logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Trunk(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)
        # GPT-2 scaled init of residual projections: std 0.02/√(2·n_layer) (Radford et al. 2019)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        cos, sin = rope_tables(self.cfg, T, idx.device)
        x = self.model.embed_tokens(idx)  # (B, T, d)
        for block in self.model.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under Hugging Face names, contiguous fp32, tied head left out."""
        sd = {k: v.detach().float().contiguous().clone() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd


SIZES: dict[str, dict] = {
    # tiny: the bundled model's shape, sized for ~45 minutes on 2 busy CPU cores (~3.6M parameters)
    "tiny": dict(d_model=192, n_layer=5, n_head=6, n_kv_head=3, d_ff=512, n_ctx=512),
    "small": dict(d_model=512, n_layer=8, n_head=8, n_kv_head=4, d_ff=1408, n_ctx=1024),
    "base": dict(d_model=768, n_layer=12, n_head=12, n_kv_head=4, d_ff=2048, n_ctx=2048),
    # micro: tests only (seconds on one core)
    "micro": dict(d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, n_ctx=128),
}
