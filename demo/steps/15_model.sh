#!/usr/bin/env bash
# The bundled model: what it is, read from the GGUF itself, and what it scored (models/README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL="${CODEMOAT_DEMO_MODEL:-$ROOT/models/codemoat-tiny.gguf}"
"$PY" - "$MODEL" <<'PY'
import sys
from pathlib import Path
import gguf
p = Path(sys.argv[1])
r = gguf.GGUFReader(str(p))
def s(key):
    f = r.fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]
n = sum(int(t.n_elements) for t in r.tensors)
toks = r.fields["tokenizer.ggml.tokens"]
vocab = [bytes(toks.parts[i]).decode(errors="replace") for i in toks.data]
types = r.fields.get("tokenizer.ggml.token_type")
control = [vocab[i] for i, t in enumerate(types.data) if int(types.parts[t][0]) == 3] if types else []
arch = s("general.architecture")  # keys are named after the architecture: llama.block_count, gemma3.block_count…
kind = {"gpt2": "byte-level BPE", "llama": "SentencePiece (SPM)"}.get(s("tokenizer.ggml.model"), s("tokenizer.ggml.model"))
print(f"model        {s('general.name')}  ({p.stat().st_size / 1e6:.1f} MB, {n:,} parameters)")
print(f"architecture {arch}: {s(arch + '.block_count')} layers, d={s(arch + '.embedding_length')}, "
      f"{s(arch + '.attention.head_count')} heads ({s(arch + '.attention.head_count_kv')} kv), context {s(arch + '.context_length')}")
shown = " ".join(control[:12]) + (f" … (+{len(control) - 12})" if len(control) > 12 else "")
print(f"tokenizer    {kind}, {len(vocab):,} tokens, pre-tokenizer {s('tokenizer.ggml.pre')}; control tokens: {shown}")
PY
# the bench's scores are the bundled model's: shown only for it
if [[ "$(realpath "$MODEL")" == "$(realpath "$ROOT/models/codemoat-tiny.gguf")" && -f "$ROOT/bench/results/model.md" ]]; then
  echo "evaluation   (bench/results/model.md, held-out CPython modules):"
  grep -E '^Model /|^Model vs' "$ROOT/bench/results/model.md" | sed -e 's/^/  /' -e 's/\*\*//g'
fi
# This CPU and llama.cpp's kernels for quantised models (Q4_K_M, Q8_0, ...): the start-up self-test the server runs
# before serving one, once per CPU and llama.cpp build (docs/llamacpp-amx.md: on Intel Xeons with AMX, llama.cpp as
# GCC 12 compiles it dies with SIGILL; the Makefile's build keeps the fast AMX path correct)
"$PY" - <<'PY'
import time
from codemoat.engines import cpu
name, flags = cpu.cpu_info()
t = time.perf_counter()
c = cpu.choose("auto")
kernels = "extra buffer types (AMX tiles / repacked)" if c.use_extra_bufts else "plain (safe) kernels"
print(f"this CPU     {name}, {cpu.feature(flags, cpu.system_info())}: quantised models on llama.cpp's {kernels}")
print(f"             self-test ({time.perf_counter() - t:.1f} s, cached in $CODEMOAT_HOME/cpu-verdicts.json): {c.reason}")
PY
