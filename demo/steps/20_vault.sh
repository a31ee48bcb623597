#!/usr/bin/env bash
# 20 — the vault: the vendor seals a model for one customer's machine, the customer verifies and
# serves it from memory; a changed byte, a copied license and a set-back clock are refused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
refused() { if "$@" 2>"$DEMO/err.txt" >/dev/null; then echo "!! accepted"; exit 1; else printf '   refused: %s\n' "$(cat "$DEMO/err.txt")"; fi; }

MODEL=$(demo_model vault-tiny.gguf)
V="$DEMO/vendor"
FP=--no-fingerprint
"$PY" -c "import codemoat.trace.fingerprint" 2>/dev/null && FP=--fingerprint

say "vendor: signing keys, master key, vendor database"
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V"

say "customer: this machine's public identity (public keys + hashed hardware facts, no secret)"
$CODEMOAT machine-id --json >"$DEMO/acme-machine.json"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('  ', d['id'], 'facts:', ', '.join(d['facts']))" "$DEMO/acme-machine.json"

say "vendor: seal the model for ACME ($FP) and issue an offline license for that machine"
$CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer ACME --out "$DEMO/acme.moat" $FP
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/acme.moat" \
  --machine "$DEMO/acme-machine.json" --expires 30d --features complete,chat --out "$DEMO/acme.lic"
$CODEMOAT inspect "$DEMO/acme.moat" --json | "$PY" -c "import json,sys; d=json.load(sys.stdin); print('   manifest:', {k: d[k] for k in ('model_id','format','plaintext_size','chunks','customer','fingerprinted')})"

say "customer: verify (signatures, machine, dates, model; every chunk decrypted in memory)"
$CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/acme.lic"
if ! "$PY" - "$DEMO/acme.moat" "$MODEL" <<'PYEOF'
import sys
# the plaintext's bytes appear nowhere in the sealed file
plain, sealed = open(sys.argv[2], "rb").read(), open(sys.argv[1], "rb").read()
probe = plain[len(plain) // 2: len(plain) // 2 + 32]
print("   a 32-byte slice of the weights found in acme.moat:", probe in sealed)
sys.exit(probe in sealed)
PYEOF
then exit 1; fi

say "attacks, each refused in one line"
"$PY" -c "import sys; b=bytearray(open(sys.argv[1],'rb').read()); b[len(b)//2]^=1; open(sys.argv[2],'wb').write(b)" "$DEMO/acme.moat" "$DEMO/flipped.moat"
echo " - one bit flipped in the middle of the sealed file:"; refused $CODEMOAT verify --model "$DEMO/flipped.moat" --license "$DEMO/acme.lic"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); d['license']['expires']+=10**8; json.dump(d,open(sys.argv[2],'w'))" "$DEMO/acme.lic" "$DEMO/extended.lic"
echo " - expiry edited in the license:"; refused $CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/extended.lic"
echo " - license copied to another machine:"
CODEMOAT_HOME="$DEMO/other-machine" $CODEMOAT machine-id >/dev/null 2>&1
refused env CODEMOAT_HOME="$DEMO/other-machine" $CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/acme.lic"
echo " - the clock set back a year (after the machine has seen today's date):"
refused "$PY" - "$DEMO/acme.moat" "$DEMO/acme.lic" <<'PYEOF'
import sys, time
from codemoat.vault.clock import ManualClock
from codemoat.errors import CodemoatError
from codemoat.vault.verify import verify_bundle
try:  # what `verify` sees on a machine whose date was set back: the same check, a clock a year behind
    verify_bundle(sys.argv[1], sys.argv[2], clock=ManualClock(time.time() - 365 * 86400))
except CodemoatError as e:
    sys.exit(f"error: {e}")
PYEOF

say "customer: serve the sealed model (decrypted into a sealed memfd; the process is non-dumpable)"
PORT=$(free_port)
TOKEN=$($CODEMOAT tokens create --name vault-demo --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
SERVE_TMP="$DEMO/vault-serve-tmp"; mkdir -p "$SERVE_TMP"
TMPDIR="$SERVE_TMP" $CODEMOAT serve --model "$DEMO/acme.moat" --license "$DEMO/acme.lic" --port "$PORT" >"$DEMO/vault-serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_healthy $PORT
"$PY" - "$PORT" "$TOKEN" <<'PYEOF'
import sys, httpx
port, token = sys.argv[1], sys.argv[2]
h = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
lic = h.get("license", {})
print("   /health:", h["status"], "| license", lic.get("license_id"), "for", lic.get("customer"), "until", lic.get("license_expires"), "| non-dumpable:", lic.get("non_dumpable"))
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
model = c.get("/v1/models").json()["data"][0]["id"]
r = c.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0})
print("   completion from the sealed model:", repr(r.json()["choices"][0]["text"]))
PYEOF
kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true
"$PY" - "$MODEL" "$CODEMOAT_HOME" "$SERVE_TMP" <<'PYEOF'
import os, sys
plain = open(sys.argv[1], "rb").read()
probe = plain[len(plain) // 2: len(plain) // 2 + 32]
hits = []
for root in sys.argv[2:]:
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                if os.path.isfile(p) and os.path.getsize(p) < 1 << 31 and probe in open(p, "rb").read() and not os.path.samefile(p, sys.argv[1]):
                    hits.append(p)
            except OSError:
                pass
print("   files under the data directory and the server's temp directory holding plaintext weights:", hits or "none")
sys.exit(1 if hits else 0)
PYEOF
