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
vocab = [bytes(toks.parts[i]).decode() for i in toks.data]
specials = [t for t in vocab if t.startswith("<|") and t.endswith("|>")]
print(f"model        {s('general.name')}  ({p.stat().st_size / 1e6:.1f} MB, {n:,} parameters)")
print(f"architecture {s('general.architecture')}: {s('llama.block_count')} layers, d={s('llama.embedding_length')}, "
      f"{s('llama.attention.head_count')} heads ({s('llama.attention.head_count_kv')} kv), context {s('llama.context_length')}")
print(f"tokenizer    byte-level BPE, {len(vocab):,} tokens, pre-tokenizer {s('tokenizer.ggml.pre')}; specials: {' '.join(specials)}")
PY
if [[ -f "$ROOT/bench/results/model.md" ]]; then
  echo "evaluation   (bench/results/model.md, held-out CPython modules):"
  grep -E '^Model /|^Model vs' "$ROOT/bench/results/model.md" | sed -e 's/^/  /' -e 's/\*\*//g'
fi
