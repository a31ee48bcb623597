"""Does vLLM (the CPU build) serve a per-request LoRA adapter exactly? A feasibility check for issue 22.

    .venv/bin/python bench/tune_vllm_lora.py [--model models/codemoat-tiny.hf]

Makes a rank-8 peft adapter on every linear layer of the model (random B, so it changes the output),
saves it in peft's layout (what `codemoat tune` seals as its safetensors part), and compares 8 greedy
tokens: transformers + peft with and without the adapter against vLLM (`enable_lora=True`) without a
LoRARequest and with one. Prints one RESULT line; nothing is served.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "codemoat-tiny.hf"))
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.monotonic()
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="vllm-lora-")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(folder)
    ids = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids

    def greedy() -> list[int]:
        x, out = torch.tensor([ids]), []
        with torch.no_grad():
            for _ in range(a.tokens):
                nxt = int(pm(input_ids=x).logits[0, -1].argmax())
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], 1)
        return out

    ref_lora = greedy()
    with pm.disable_adapter():
        ref_base = greedy()

    # bench/vllm.py, beside this script, would shadow the vllm package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=a.model, enable_lora=True, max_lora_rank=8, max_loras=2, max_model_len=256, enforce_eager=True, dtype="float32"
    )
    sp = SamplingParams(max_tokens=a.tokens, temperature=0)
    prompt = [TokensPrompt(prompt_token_ids=ids)]
    got_base = list(llm.generate(prompt, sp)[0].outputs[0].token_ids)
    got_lora = list(llm.generate(prompt, sp, lora_request=LoRARequest("bench", 1, folder))[0].outputs[0].token_ids)
    print("peft  base", ref_base, "lora", ref_lora)
    print("vllm  base", got_base, "lora", got_lora)
    print(
        f"RESULT base matches peft: {got_base == ref_base}; with the LoRARequest matches peft + adapter: "
        f"{got_lora == ref_lora}; the adapter changes the output: {got_lora != got_base}; {time.monotonic() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
