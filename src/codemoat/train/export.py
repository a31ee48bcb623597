"""Write a trained model twice: a Hugging Face folder (safetensors + config.json + tokenizer.json)
for the `transformers` engine, and a GGUF file (llama architecture) for the `llamacpp` engine.

GGUF layout follows llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`:
tensor names `token_embd`, `blk.N.attn_q`, …, and q/k rows permuted from Hugging Face's
"rotate half" RoPE pairing (i, i + d/2) to llama.cpp's interleaved pairing (2i, 2i + 1).
Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tokenizer import ENDOFTEXT, FILE_SEP, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, GGUF_PRE, REPO_NAME, SPECIAL_TOKENS

#: a plain-text chat template (the vocabulary has no <|im_start|>); rendered with jinja2
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n"
    "{% else %}### Assistant:\n{{ m['content'] }}" + ENDOFTEXT + "\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection from HF's rotate-half order to llama.cpp's interleaved order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(sd: dict[str, np.ndarray], hf_config: dict) -> dict[str, np.ndarray]:
    """HF-named fp32 arrays → GGUF-named arrays, q/k permuted."""
    n_head, n_kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for name, w in sd.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest == "self_attn.q_proj.weight":
                w = permute_qk(w, n_head)
            elif rest == "self_attn.k_proj.weight":
                w = permute_qk(w, n_kv)
            out[f"blk.{i}.{_HF_TO_GGUF[rest]}"] = w
        elif not name.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"unexpected tensor {name}")
    return out


def write_gguf(
    path: Path,
    sd: dict[str, np.ndarray],
    hf_config: dict,
    tokenizer_json: str,
    *,
    name: str = "codemoat-tiny",
    ftype: str = "f16",
    description: str = "",
) -> Path:
    """Write a llama-architecture GGUF; `ftype` "f32" or "f16" (norms stay f32, as llama.cpp expects)."""
    import gguf

    from .tokenizer import load_tokenizer, vocab_and_merges

    tok = load_tokenizer(tokenizer_json)
    vocab, merges = vocab_and_merges(tok)
    special = set(SPECIAL_TOKENS)
    c = hf_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    if description:
        w.add_description(description)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE)
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab])
    w.add_token_merges(merges)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    w.add_bos_token_id(ids[ENDOFTEXT])
    w.add_eos_token_id(ids[ENDOFTEXT])
    w.add_pad_token_id(ids[FIM_PAD])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, ids[FIM_PREFIX])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, ids[FIM_SUFFIX])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, ids[FIM_MIDDLE])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_PAD_ID, ids[FIM_PAD])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_REP_ID, ids[REPO_NAME])
    w.add_uint32(gguf.Keys.Tokenizer.FIM_SEP_ID, ids[FILE_SEP])
    w.add_chat_template(CHAT_TEMPLATE)

    for tname, arr in gguf_tensors(sd, c).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if ftype == "f16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def write_hf_dir(out_dir: Path, state_dict, hf_config: dict, tokenizer_json: str) -> Path:
    """A folder the `transformers` engine loads: model.safetensors, config.json, tokenizer.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": ENDOFTEXT,
                "pad_token": FIM_PAD,
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
                "additional_special_tokens": SPECIAL_TOKENS[1:],
            },
            indent=2,
        )
        + "\n"
    )
    return out_dir


def export(
    model, tokenizer_json: str, gguf_path: Path, *, name: str, ftype: str = "f16", description: str = ""
) -> tuple[Path, Path]:
    """Both formats from a `model.Llama`: (gguf path, hf folder `<stem>.hf/`)."""
    from .tokenizer import load_tokenizer, special_ids

    ids = special_ids(load_tokenizer(tokenizer_json))
    cfg = model.cfg.to_hf(bos_id=ids[ENDOFTEXT], eos_id=ids[ENDOFTEXT])
    sd = model.hf_state_dict()
    gguf_path = Path(gguf_path)
    # the safetensors copy carries the same precision as the GGUF (the engine computes in fp32)
    hf_sd = {k: v.half() for k, v in sd.items()} if ftype == "f16" else sd
    hf_dir = write_hf_dir(gguf_path.with_suffix(".hf"), hf_sd, cfg, tokenizer_json)
    np_sd = {k: v.numpy() for k, v in sd.items()}
    write_gguf(gguf_path, np_sd, cfg, tokenizer_json, name=name, ftype=ftype, description=description)
    return gguf_path, hf_dir
