#!/usr/bin/env bash
# 40 — leak tracing: every customer's copy carries its own fingerprint. One copy leaks (unsealed,
# requantised by llama.cpp, noise added) and `codemoat trace` names its customer; the clean
# original names nobody. Then the output watermark tells a generation from human code.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL="${CODEMOAT_DEMO_MODEL:-$ROOT/models/codemoat-tiny.gguf}"
if [[ ! -f "$MODEL" ]]; then  # no bundled model yet: a small random llama GGUF stands in
  MODEL="$DEMO/trace-standin.gguf"
  [[ -f "$MODEL" ]] || (cd "$ROOT" && "$PY" -c "from tests.trace.synth import tiny_model; tiny_model('$MODEL', dtype='F16')")
fi
V="$DEMO/vendor"
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null

say "vendor: seal a fingerprinted copy for each of three customers"
for c in ACME GLOBEX INITECH; do
  [[ -f "$DEMO/trace-$c.moat" ]] || $CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer "$c" --out "$DEMO/trace-$c.moat" --fingerprint >/dev/null
  echo "   $c -> trace-$c.moat"
done

say "a leak: GLOBEX's copy is decrypted, requantised to Q8_0 with llama.cpp, and noised"
$CODEMOAT vendor unseal "$DEMO/trace-GLOBEX.moat" --vendor "$V" --out "$DEMO/leak.gguf" >/dev/null
(cd "$ROOT" && "$PY" - "$DEMO/leak.gguf" "$DEMO/leak-q8.gguf" "$DEMO/leaked.gguf" <<'PYEOF'
import sys
from pathlib import Path
from tests.trace import attacks
src, q8, out = map(Path, sys.argv[1:])
attacks.requantize(src, q8, 7)                  # llama.cpp's own quantiser, ftype 7 = Q8_0
attacks.transform(q8, out, attacks.noise(0.03))  # Gaussian noise, 3% of each tensor's RMS
print(f"   leaked.gguf: {out.stat().st_size:,} bytes, Q8_0, noised")
PYEOF
)

say "vendor: codemoat trace leaked.gguf"
$CODEMOAT trace "$DEMO/leaked.gguf" --vendor "$V" --original "$MODEL"

say "vendor: codemoat trace on the clean original (no customer's copy): no verdict"
$CODEMOAT trace "$MODEL" --vendor "$V" --original "$MODEL" --top 3

say "watermark: ACME's server marks what it generates; a human file is not marked"
(cd "$ROOT" && "$PY" - "$V" "$MODEL" "$DEMO/generated.py" <<'PYEOF'
import sys
from llama_cpp import Llama, LogitsProcessorList
from codemoat.trace.watermark import WatermarkProcessor
from codemoat.vault.vendor import Vendor
v = Vendor.open(sys.argv[1]); key = v.customer("ACME").watermark_secret; v.close()
llm = Llama(sys.argv[2], n_ctx=512, verbose=False, seed=7)
wmp = WatermarkProcessor(key, vocab_size=llm.n_vocab())  # what the server adds to each ACME request
eos = llm.token_eos()
def no_eos(ids, logits):
    logits[eos] = -1e9
    return logits
out = llm.create_completion("import os\n\ndef main(", max_tokens=200, temperature=0.8, seed=7,
                            logits_processor=LogitsProcessorList([no_eos, wmp]))
open(sys.argv[3], "w").write(out["choices"][0]["text"])
print("   generated.py:", out["usage"]["completion_tokens"], "tokens")
PYEOF
)
cp "$ROOT/src/codemoat/trace/align.py" "$DEMO/human.py"
$CODEMOAT watermark detect "$DEMO/generated.py" "$DEMO/human.py" --vendor "$V" --model "$MODEL"
