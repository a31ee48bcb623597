#!/usr/bin/env bash
# 80 — the vendor sells a service: signed offline update bundles (a model v2 and a knowledge pack),
# gated by the support contract; a bundle released after support ended is refused until a renewed
# license unlocks it; a downgrade is refused; a vendor adapter for one team is applied and swapped in;
# a serve of the installed model (`--model update:model`) follows apply and rollback without a restart;
# every step is in the audit log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
refused() { if "$@" 2>"$DEMO/err.txt" >/dev/null; then echo "!! accepted"; exit 1; else printf '   refused: %s\n' "$(cat "$DEMO/err.txt")"; fi; }

MODEL=$(demo_model updates-tiny.gguf)
V="$DEMO/vendor"
U="$DEMO/updates"
mkdir -p "$U"
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
$CODEMOAT machine-id --json >"$U/machine.json"
[[ -f "$U/acme-v1.moat" ]] || $CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer ACME --out "$U/acme-v1.moat" --no-fingerprint >/dev/null

say "vendor: a license whose support contract ended on 2026-01-01 (the license itself runs a year)"
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$U/acme-v1.moat" --machine "$U/machine.json" \
  --expires 365d --support-until 2026-01-01 --out "$U/lapsed.lic" --force
say "vendor: release model v2 and a knowledge pack (httpx's own source and docstrings) for ACME"
$CODEMOAT vendor release --vendor "$V" --customer ACME --model "$MODEL" --version 2 --notes "better completions" \
  --no-fingerprint --out "$U/model-v2.moatpkg"
PACK="$U/pack"
rm -rf "$PACK" && mkdir -p "$PACK"
cp -r "$("$PY" -c 'import httpx, os; print(os.path.dirname(httpx.__file__))')" "$PACK/httpx"
$CODEMOAT vendor release --vendor "$V" --customer ACME --knowledge-pack "$PACK" --name httpx --version 0.28.1 \
  --notes "httpx API reference" --out "$U/httpx.moatpkg"

say "customer: model v2 was released after support ended -> refused (installed things keep working)"
refused $CODEMOAT update apply "$U/model-v2.moatpkg" --license "$U/lapsed.lic"

say "vendor: support renewed for a year (a new license); the customer serves v1 under it"
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$U/acme-v1.moat" --machine "$U/machine.json" \
  --expires 365d --support-until 365d --out "$U/renewed.lic" --force
PORT=$(free_port)
$CODEMOAT serve --model "$U/acme-v1.moat" --license "$U/renewed.lic" --host 127.0.0.1 --port "$PORT" >"$U/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
wait_healthy "$PORT" 120
USER_T=$($CODEMOAT tokens create --name updates-dev --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['token'])")
ADMIN_T=$($CODEMOAT tokens create --name updates-ops --scopes admin --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['token'])")
LIC1=$(curl -s -H "Authorization: Bearer $ADMIN_T" "http://127.0.0.1:$PORT/health" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['license']['license_id'])")

say "customer: while a client streams completions, the waiting bundles install and v2 is swapped in"
rm -f "$U/stop"
"$PY" - "$PORT" "$USER_T" "$U/stop" >"$U/client.txt" <<'PYEOF' &
import os, sys, httpx
port, token, stop = sys.argv[1:]
h = {"Authorization": f"Bearer {token}"}
model = httpx.get(f"http://127.0.0.1:{port}/health", headers=h).json()["model"]
ok = failed = 0
with httpx.Client(timeout=120) as c:
    while not os.path.exists(stop) or ok + failed == 0:
        with c.stream("POST", f"http://127.0.0.1:{port}/v1/completions", headers=h,
                      json={"model": model, "prompt": "def fib(n):\n", "max_tokens": 12, "stream": True}) as r:
            text = "".join(r.iter_text())
        good = r.status_code == 200 and "[DONE]" in text and '"error"' not in text
        ok, failed = ok + good, failed + (not good)
print(ok, failed)
PYEOF
CLIENT=$!
$CODEMOAT update verify "$U/model-v2.moatpkg" --license "$U/renewed.lic"
# apply hands v2 to the running serve (its socket in $CODEMOAT_HOME/run), which swaps it in
$CODEMOAT update apply "$U/model-v2.moatpkg" --license "$U/renewed.lic"
$CODEMOAT update apply "$U/httpx.moatpkg" --groups everyone
sleep 2
touch "$U/stop"; wait $CLIENT
read -r OK FAILED <"$U/client.txt"
echo "   streaming client across the apply and the swap: $OK completions, $FAILED failed"
[[ "$FAILED" == 0 ]] || { echo "!! requests failed across the swap"; exit 1; }
LIC2=$(curl -s -H "Authorization: Bearer $ADMIN_T" "http://127.0.0.1:$PORT/health" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['license']['license_id'])")
echo "   serving license before: $LIC1, now: $LIC2 (v2 came with its own)"

say "vendor: a LoRA adapter for the model (here a random stand-in), for ACME's fee team only"
"$PY" - "$MODEL" "$U/fee.gguf" "$ROOT" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, f"{sys.argv[3]}/tests")
from tune.loras import random_lora_gguf  # what the vendor would train: a LoRA GGUF for this base
# rank 16, tune's default: release fingerprints the lora_a matrices, which need >= 1024 weights each
Path(sys.argv[2]).write_bytes(random_lora_gguf(Path(sys.argv[1]), rank=16, scale=0.2))
PYEOF
$CODEMOAT vendor release --vendor "$V" --customer ACME --adapter "$U/fee.gguf" --name fee --version 1 --out "$U/fee-1.moatpkg"
$CODEMOAT update apply "$U/fee-1.moatpkg" --groups fee-team
$CODEMOAT users add updates-fee --groups fee-team >/dev/null
FEE_T=$($CODEMOAT tokens create --name updates-fee-editor --user updates-fee --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['token'])")
echo "   swap it in (no restart): $(curl -sf -X POST -H "Authorization: Bearer $ADMIN_T" -H 'Content-Type: application/json' \
  -d '{"adapter": "fee"}' "http://127.0.0.1:$PORT/admin/api/model/swap")"
"$PY" - "$PORT" "$FEE_T" "$USER_T" <<'PYEOF'
import sys, httpx
port, fee, other = sys.argv[1:]
url = f"http://127.0.0.1:{port}"
model = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {fee}"}).json()["model"]
body = {"model": model, "prompt": "def interchange_fee(amount_cents: int) -> int:\n    return", "max_tokens": 12, "temperature": 0}
for who, tok in (("fee-team user (base + adapter)", fee), ("anyone else (the base)", other)):
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {tok}"}, timeout=120)
    print(f"   {who}: {r.json()['choices'][0]['text']!r}")
PYEOF
$CODEMOAT update list
kill $SERVE 2>/dev/null || true
wait $SERVE 2>/dev/null || true

say "customer: serve the installed model itself (serve --model update:model: the bundle's own license, no --license)"
# the model version a serve runs: /health names the installed bundle it serves
served() {
  curl -s -H "Authorization: Bearer $ADMIN_T" "http://127.0.0.1:$PORT/health" \
    | "$PY" -c "import json,sys; print((json.load(sys.stdin).get('bundle') or {}).get('version', '?'))"
}
$CODEMOAT vendor release --vendor "$V" --customer ACME --model "$MODEL" --version 3 --notes "v3" --no-fingerprint \
  --out "$U/model-v3.moatpkg" >/dev/null
PORT=$(free_port)
$CODEMOAT serve --model update:model --host 127.0.0.1 --port "$PORT" >"$U/serve-installed.log" 2>&1 &
SERVE=$!
wait_healthy "$PORT" 120
echo "   serving model version $(served) (installed by update apply)"
$CODEMOAT update apply "$U/model-v3.moatpkg"
echo "   serving model version $(served)"
say "customer: v3 disappoints; update rollback goes back to v2 and hands it to the running serve (no restart)"
$CODEMOAT update rollback --channel model
echo "   serving model version $(served)"
kill $SERVE 2>/dev/null || true
wait $SERVE 2>/dev/null || true

say "customer: a version installed while no serve runs is pending until a serve's health check passes it"
# (a serve killed in the middle of a swap leaves its version pending too: update apply records it failed and goes back)
status() {
  $CODEMOAT update list --json | "$PY" -c "import json,sys; print(*[f\"update list: model {b['version']} {b.get('status') or 'checked'}\" for b in json.load(sys.stdin) if b['channel'] == 'model' and b['current']])"
}
$CODEMOAT vendor release --vendor "$V" --customer ACME --model "$MODEL" --version 4 --notes "v4" --no-fingerprint \
  --out "$U/model-v4.moatpkg" >/dev/null
$CODEMOAT update apply "$U/model-v4.moatpkg"
echo "   $(status)"
PORT=$(free_port)
$CODEMOAT serve --model update:model --host 127.0.0.1 --port "$PORT" >"$U/serve-pending.log" 2>&1 &
SERVE=$!
wait_healthy "$PORT" 120
echo "   serve checked it before its first request: serving model version $(served); $(status)"
kill $SERVE 2>/dev/null || true
wait $SERVE 2>/dev/null || true

say "attacks, each refused in one line"
$CODEMOAT vendor release --vendor "$V" --customer ACME --model "$MODEL" --version 1.5 --no-fingerprint --out "$U/model-v1.5.moatpkg" >/dev/null
echo " - a downgrade to 1.5 (not signed as a rollback target):"; refused $CODEMOAT update apply "$U/model-v1.5.moatpkg"
"$PY" -c "import sys; b=bytearray(open(sys.argv[1],'rb').read()); b[-100]^=1; open(sys.argv[2],'wb').write(b)" "$U/httpx.moatpkg" "$U/flipped.moatpkg"
echo " - one bit flipped in a bundle's payload:"; refused $CODEMOAT update verify "$U/flipped.moatpkg"
echo " - the same bundle applied on another machine:"
CODEMOAT_HOME="$DEMO/other-machine" $CODEMOAT machine-id >/dev/null 2>&1
refused env CODEMOAT_HOME="$DEMO/other-machine" $CODEMOAT update apply "$U/httpx.moatpkg" --license "$U/renewed.lic"

say "audit: every update step is a record"
$CODEMOAT audit export --kind update | "$PY" -c "import json,sys; [print('  ', r['route'], {k: v for k, v in (r['detail'] or {}).items() if k in ('version','reason','name','adapter','frm','to')}) for r in map(json.loads, sys.stdin)]"
