#!/usr/bin/env bash
# 30 — the private code index: index a small repository for the group `payments`, show the snippet a
# completion gets from another file, complete that line through the server for a developer in `payments`
# and for one outside it (who gets nothing from the repository), then re-index after an edit (one file).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
MODEL=$(demo_model tiny-random.gguf)

REPO="$DEMO/payments-repo"
rm -rf "$REPO" && cp -r "$ROOT/demo/repo" "$REPO"
git -C "$REPO" init -q && git -C "$REPO" remote add origin git@git.acme.example:fin/payments.git
# a contractor's commit: a symlink to this machine's key. The indexer never follows it (see "not read" below).
ln -s "$CODEMOAT_HOME/machine.key" "$REPO/settings.json" && git -C "$REPO" add settings.json
$CODEMOAT index remove payments >/dev/null 2>&1 || true

say "admin: codemoat index add payments-repo --name payments --groups payments (settings.json -> machine.key: not read)"
$CODEMOAT index add "$REPO" --name payments --groups payments
$CODEMOAT index list

say "the line to complete (payments/checkout.py:15) needs interchange_fee() from payments/fees.py"
sed -n '14,15p' "$REPO/payments/checkout.py" | sed 's/^/   │ /'

say "developer in group payments: codemoat retrieve --line 15 --column 16 (the snippets the prompt gets)"
$CODEMOAT retrieve --repo payments --path payments/checkout.py --line 15 --column 16 --k 2 --groups payments

say "a contractor (not in group payments) asks for the same cursor: no snippet from this repository"
$CODEMOAT retrieve --repo payments --path payments/checkout.py --line 15 --column 16 --groups contractors

say "both ask the server to complete that line, as Tabby's editor plugin does (POST /v1/completions, git_url + filepath)"
$CODEMOAT users add alice --groups payments >/dev/null
$CODEMOAT users add carol --groups contractors >/dev/null
ALICE=$($CODEMOAT tokens create --name alice-editor --user alice --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
CAROL=$($CODEMOAT tokens create --name carol-editor --user carol --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
PORT=$(free_port)
$CODEMOAT serve --model "$MODEL" --model-id codemoat-tiny --port "$PORT" >"$DEMO/serve-30.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
wait_healthy $PORT
"$PY" "$ROOT/demo/index_demo.py" "http://127.0.0.1:$PORT" "$REPO" git@git.acme.example:fin/payments.git "$ALICE" "$CAROL"
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

say "an edit, then codemoat index update: only the changed file is parsed again"
printf '\n\ndef refund_fee(amount_minor: int) -> int:\n    return 0\n' >> "$REPO/payments/fees.py"
$CODEMOAT index update payments
