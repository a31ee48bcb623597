#!/usr/bin/env bash
# 22 — privilege separation: `codemoat vaultd` holds the machine key and decrypts the model once; `serve --vault`
# gets only the sealed memfd over a unix socket and runs from a data directory that holds no key at all.
# Allow-lists may name a model (MODEL_ID=USER): one vaultd, two teams' models, each fetched only by its own user.
# (In production vaultd runs as its own system user: docs/operations.md has the systemd units.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model vault-tiny.gguf)
V="$DEMO/vendor"
if [[ ! -f "$DEMO/acme.moat" || ! -f "$DEMO/acme.lic" ]]; then  # step 20 makes them; alone, make them here
  [[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
  $CODEMOAT machine-id --json >"$DEMO/acme-machine.json"
  $CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer ACME --out "$DEMO/acme.moat" --no-fingerprint >/dev/null
  $CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/acme.moat" \
    --machine "$DEMO/acme-machine.json" --expires 30d --features complete,chat --out "$DEMO/acme.lic" >/dev/null
fi
MODEL_ID=$($CODEMOAT inspect "$DEMO/acme.moat" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["model_id"])')

say "vaultd: verify the license and decrypt once into a sealed memfd; socket 0660, only uid $(id -u) allowed"
SOCK="$DEMO/vault.sock"
$CODEMOAT vaultd --socket "unix:$SOCK" --model "$DEMO/acme.moat" --license "$DEMO/acme.lic" --allow-uid "$(id -u)" \
  >"$DEMO/vaultd.log" 2>&1 &
VAULTD=$!
trap 'kill $VAULTD ${SERVER:-} 2>/dev/null || true' EXIT
for _ in $(seq 300); do [[ -S "$SOCK" ]] && break; sleep 0.1; done
ls -l "$SOCK" | awk '{print "   " $1, $NF}'

say "serve --vault: its own data directory, no license, no container, not vaultd's key"
SERVE_HOME="$DEMO/serve-home"; mkdir -p "$SERVE_HOME"
TOKEN=$(CODEMOAT_HOME="$SERVE_HOME" $CODEMOAT tokens create --name vaultd-demo --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
PORT=$(free_port)
CODEMOAT_HOME="$SERVE_HOME" $CODEMOAT serve --vault "unix:$SOCK" --model "$MODEL_ID" --port "$PORT" >"$DEMO/vaultd-serve.log" 2>&1 &
SERVER=$!
wait_healthy $PORT
echo "   files in serve's data directory: $(ls "$SERVE_HOME" | tr '\n' ' ')"
"$PY" - "$CODEMOAT_HOME/machine.key" "$SERVE_HOME/machine.key" <<'PYEOF'
import sys
# serve makes its own key to sign its audit log; the license is wrapped to vaultd's, which serve never reads
same = open(sys.argv[1], "rb").read() == open(sys.argv[2], "rb").read()
print("   serve's machine.key is vaultd's key:", same)
sys.exit(1 if same else 0)
PYEOF
"$PY" - "$PORT" "$TOKEN" "$MODEL_ID" <<'PYEOF'
import sys, httpx
port, token, model = sys.argv[1:]
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
r = c.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0})
print("   completion through vaultd's memfd:", repr(r.json()["choices"][0]["text"]))
print("   license as serve sees it (facts only, no key):", c.get("/health").json()["license"]["license_id"])
PYEOF
grep -o "vaultd: handed .*" "$DEMO/vaultd.log" | sed 's/^/   vaultd log: /' | head -1

say "a caller not on the allow-list is refused by its kernel credentials (SO_PEERCRED), in one line"
$CODEMOAT vaultd --socket "unix:$DEMO/vault-strict.sock" --model "$DEMO/acme.moat" --license "$DEMO/acme.lic" \
  --allow-uid 4242 >"$DEMO/vaultd-strict.log" 2>&1 &
STRICT=$!
trap 'kill $VAULTD $STRICT ${SERVER:-} 2>/dev/null || true' EXIT
for _ in $(seq 300); do [[ -S "$DEMO/vault-strict.sock" ]] && break; sleep 0.1; done
if CODEMOAT_HOME="$SERVE_HOME" $CODEMOAT serve --vault "unix:$DEMO/vault-strict.sock" --model "$MODEL_ID" \
    --port "$(free_port)" 2>"$DEMO/err.txt" >/dev/null; then echo "!! accepted"; exit 1; fi
printf '   refused: %s\n' "$(cat "$DEMO/err.txt")"
kill $SERVER $VAULTD $STRICT 2>/dev/null || true
wait 2>/dev/null || true
SERVER=""

say "one vaultd, two models, a list per model: uid $(id -u) gets $MODEL_ID only, another team (uid 4242) the other"
ln -sf "$MODEL" "$DEMO/other-team.gguf"  # the same weights under another name: sealed, it is another model id
$CODEMOAT vendor seal "$DEMO/other-team.gguf" --vendor "$V" --customer ACME --out "$DEMO/other.moat" --no-fingerprint --force >/dev/null
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/other.moat" \
  --machine "$DEMO/acme-machine.json" --expires 30d --features complete --out "$DEMO/other.lic" --force >/dev/null
OTHER_ID=$($CODEMOAT inspect "$DEMO/other.moat" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["model_id"])')
SCOPED="$DEMO/vault-scoped.sock"
$CODEMOAT vaultd --socket "unix:$SCOPED" --model "$DEMO/acme.moat" --license "$DEMO/acme.lic" \
  --model "$DEMO/other.moat" --license "$DEMO/other.lic" --allow-uid "$MODEL_ID=$(id -u)" --allow-uid "$OTHER_ID=4242" \
  >"$DEMO/vaultd-scoped.log" 2>&1 &
SCOPEDD=$!
trap 'kill $SCOPEDD ${SERVER:-} 2>/dev/null || true' EXIT
for _ in $(seq 300); do [[ -S "$SCOPED" ]] && break; sleep 0.1; done
echo "   vaultd holds $MODEL_ID and $OTHER_ID: --allow-uid $MODEL_ID=$(id -u) --allow-uid $OTHER_ID=4242"
echo " - serve --vault --model $OTHER_ID as uid $(id -u):"
if CODEMOAT_HOME="$SERVE_HOME" $CODEMOAT serve --vault "unix:$SCOPED" --model "$OTHER_ID" \
    --port "$(free_port)" 2>"$DEMO/err.txt" >/dev/null; then echo "!! accepted"; exit 1; fi
printf '   refused: %s\n' "$(cat "$DEMO/err.txt")"
echo " - serve --vault --model $MODEL_ID as uid $(id -u), from the same vaultd:"
PORT=$(free_port)
CODEMOAT_HOME="$SERVE_HOME" $CODEMOAT serve --vault "unix:$SCOPED" --model "$MODEL_ID" --port "$PORT" >"$DEMO/vaultd-scoped-serve.log" 2>&1 &
SERVER=$!
wait_healthy $PORT
"$PY" - "$PORT" "$TOKEN" "$MODEL_ID" <<'PYEOF'
import sys, httpx
port, token, model = sys.argv[1:]
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
r = c.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0})
print(f"   HTTP {r.status_code}, completion from {model}:", repr(r.json()["choices"][0]["text"]))
PYEOF
grep -o "vaultd: refused .*" "$DEMO/vaultd-scoped.log" | sed 's/^/   vaultd log: /' | head -1
kill $SERVER $SCOPEDD 2>/dev/null || true
wait 2>/dev/null || true
