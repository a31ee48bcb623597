#!/usr/bin/env bash
# 85 — fine-tuning on the customer's own code: `codemoat tune` trains a LoRA adapter on the payments
# repository only (held-out files never trained on), shows bits/byte before and after, seals it to this
# machine; the server then answers a payments developer with base + adapter and a contractor with the
# base model, and the audit records name the adapter that answered.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
MODEL=$(demo_model tiny-random.gguf)

if ! $CODEMOAT index list 2>/dev/null | grep -q payments; then  # the step also runs alone
  REPO="$DEMO/payments-repo"
  rm -rf "$REPO" && cp -r "$ROOT/demo/repo" "$REPO"
  $CODEMOAT index add "$REPO" --name payments --groups payments >/dev/null
fi

say "admin: codemoat tune --repos payments --out payments.moat (a short run: 12 steps)"
$CODEMOAT tune --repos payments --out "$DEMO/payments.moat" --model "$MODEL" --steps 12 --rank 8 --eval-tokens 4000
ls -l "$DEMO/payments.moat" | awk '{print "   sealed adapter:", $5, "bytes (encrypted; opens only on this machine)"}'

say "serve with model.adapters = [payments.moat]: priya (payments) and carol (contractors) complete the same line"
printf '[model]\nadapters = ["%s"]\nn_threads = 2\n' "$DEMO/payments.moat" > "$DEMO/tune.toml"
$CODEMOAT users add priya --groups payments >/dev/null 2>&1 || $CODEMOAT users set-groups priya --groups payments >/dev/null  # (alice left payments in step 65)
$CODEMOAT users add carol --groups contractors >/dev/null 2>&1 || true
PRIYA=$($CODEMOAT tokens create --name priya-tune --user priya --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
CAROL=$($CODEMOAT tokens create --name carol-tune --user carol --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
PORT=$(free_port)
$CODEMOAT serve --config "$DEMO/tune.toml" --model "$MODEL" --model-id codemoat-tiny --port "$PORT" >"$DEMO/serve-85.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
wait_healthy $PORT
if ! curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then  # e.g. an adapter llama.cpp cannot apply to this base
  echo "   the server did not start with the adapter: $(grep -m1 '^error:' "$DEMO/serve-85.log" || tail -n1 "$DEMO/serve-85.log")"
  echo "   (see $DEMO/serve-85.log)"
  kill $SERVER 2>/dev/null || true  # it has usually exited already
  wait $SERVER 2>/dev/null || true
  trap - EXIT
  exit 0
fi
BODY='{"model":"codemoat-tiny","prompt":"from payments.ledger import ","max_tokens":16,"temperature":0}'  # an import of the tuned repository: its answers differ with the adapter
for who in PRIYA CAROL; do
  tok=${!who}
  printf '   %-6s → ' "${who,,}"
  curl -s "http://127.0.0.1:$PORT/v1/completions" -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' -d "$BODY" \
    | "$PY" -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))'
done
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

say "the audit log: which adapter answered whom"
$CODEMOAT audit export --kind request | "$PY" -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if r.get("route", "").endswith("/completions") and r.get("user") in ("priya", "carol"):
        d = r.get("detail") or {}
        d = json.loads(d) if isinstance(d, str) else d
        print("   %-6s adapter=%s" % (r["user"], d.get("adapter", "(base model)")))
' | tail -2
