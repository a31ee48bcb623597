#!/usr/bin/env bash
# 10 — serving: start the server on the bundled model, create a token, then complete and chat
# through the real `openai` client and send an autocomplete request shaped as Continue sends it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
MODEL=$(demo_model tiny-random.gguf)

say "admin: create an API token (shown once; only its hash is stored)"
TOKEN=$($CODEMOAT tokens create --name demo-editor --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
echo "   token ${TOKEN:0:8}… for user demo-editor"

PORT=$(free_port)
say "admin: codemoat serve --model $(basename "$MODEL") --port $PORT"
$CODEMOAT serve --model "$MODEL" --model-id codemoat-tiny --port "$PORT" >"$DEMO/serve-10.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
wait_healthy $PORT
echo "   /health without a token (liveness only): $(curl -s "http://127.0.0.1:$PORT/health")"
curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/health" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("   /health with a token:", d["status"], "| engine", d["engine"]["engine"], "| context", d["engine"]["n_ctx"], "tokens")'

SCRAPER=$($CODEMOAT tokens create --name demo-scraper --scopes metrics --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
"$PY" "$ROOT/demo/serve_demo.py" "http://127.0.0.1:$PORT" "$TOKEN" "$SCRAPER"

say "developer: codemoat complete (a thin CLI client)"
CODEMOAT_URL="http://127.0.0.1:$PORT" CODEMOAT_TOKEN="$TOKEN" $CODEMOAT complete --prefix $'import os\n\ndef list_python_files(root):\n    ' --suffix $'\n' --max-tokens 40 | sed 's/^/   │ /'

say "a request without a token is refused in the protocol's own shape"
curl -s "http://127.0.0.1:$PORT/api/generate" -d '{"model":"codemoat-tiny","prompt":"x"}'; echo
