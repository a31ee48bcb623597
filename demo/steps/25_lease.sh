#!/usr/bin/env bash
# 25 — lease mode: the sealed model runs only while the vendor's key server renews its lease.
# Key server down: serving goes on until TTL + grace, then 503; back up: the model reloads.
# License revoked: serving stops at the next renewal. Every heartbeat is in outbound.jsonl.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model vault-tiny.gguf)
V="$DEMO/vendor"
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
$CODEMOAT machine-id --json >"$DEMO/acme-machine.json"
[[ -f "$DEMO/acme-lease.moat" ]] || $CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer ACME --out "$DEMO/acme-lease.moat" --no-fingerprint >/dev/null

KPORT=$(free_port); SPORT=$(free_port)
KS=""; SERVER=""
trap 'kill $KS $SERVER 2>/dev/null || true' EXIT
start_keyserver() { $CODEMOAT keyserver --vendor "$V" --port "$KPORT" >>"$DEMO/keyserver.log" 2>&1 & KS=$!
  wait_healthy $KPORT 20; }

say "vendor: key server on 127.0.0.1:$KPORT; a lease license (TTL 6 s, renewed every 3 s; grace 4 s)"
start_keyserver
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/acme-lease.moat" \
  --machine "$DEMO/acme-machine.json" --expires 30d --mode lease --keyserver "http://127.0.0.1:$KPORT" \
  --lease-ttl 6s --grace 4s --seats 1 --out "$DEMO/acme-lease.lic" --json >"$DEMO/lease-issue.json"
LIC=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['id'])" "$DEMO/lease-issue.json")
echo "   $LIC: no key inside; the key server hands it to this machine, wrapped, on each renewal"

say "customer: serve the sealed model under the lease"
TOKEN=$($CODEMOAT tokens create --name lease-demo --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
: >"$CODEMOAT_HOME/outbound.jsonl"
$CODEMOAT serve --model "$DEMO/acme-lease.moat" --license "$DEMO/acme-lease.lic" --port "$SPORT" >"$DEMO/lease-serve.log" 2>&1 &
SERVER=$!
wait_healthy $SPORT

probe() {  # one completion: its status, and the license state from /health
  "$PY" - "$SPORT" "$TOKEN" "$1" "${2:-}" <<'PYEOF'
import sys, time, httpx
port, token, label, since = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if since:
    label = f"{label} {time.time() - float(since):4.1f} s:"
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
r = c.post("/v1/completions", json={"model": "acme-lease", "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0})
lic = c.get("/health").json().get("license", {})
body = r.json()
what = repr(body["choices"][0]["text"]) if r.status_code == 200 else body.get("error", {}).get("message", body)
print(f"   {label:<26} HTTP {r.status_code}  lease {lic.get('lease_state')}, {lic.get('lease_seconds_left')} s left  {what}")
PYEOF
}
probe "leased:"
sleep 4; probe "after a renewal:"

say "vendor's key server goes down: serving continues until TTL + grace, then stops"
kill $KS; KILLED=$(date +%s.%N); wait $KS 2>/dev/null || true
for _ in 1 2 3 4 5; do sleep 2; probe "key server down" "$KILLED"; done

say "key server back: the next renewal loads the model again"
start_keyserver
sleep 1; wait_healthy $SPORT 20
probe "key server back:"

say "a stranger who knows the license id asks the key server for 500 challenges: it writes nothing, and the renewals go on"
"$PY" - "$KPORT" "$LIC" "$V/vendor.db" <<'PYEOF'
import sqlite3, sys, httpx
port, lic, db = sys.argv[1], sys.argv[2], sys.argv[3]
def rows():  # (every table's rows, the spent-nonce table's): a renewal meanwhile spends one nonce, a challenge none
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        names = [r[0] for r in c.execute("select name from sqlite_master where type = 'table'")]
        count = {n: c.execute(f'select count(*) from "{n}"').fetchone()[0] for n in names}
    return sum(count.values()), count.get("vault_lease_spent", 0)
(before, spent0) = rows()
with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
    ok = sum(c.post("/v1/lease/challenge", json={"license_id": lic, "client_nonce": f"x{i}"}).status_code == 200 for i in range(500))
(after, spent1) = rows()
print(f"   {ok} challenges answered; rows in the vendor database: {before} before, {after} after"
      f" ({spent1 - spent0} spent by this machine's renewals meanwhile). A nonce is its own proof, an HMAC of the key"
      " server's key: there is no table of them to flood")
PYEOF
sleep 4; probe "after the flood:"

say "vendor revokes the license: serving stops at the next renewal"
$CODEMOAT vendor license revoke "$LIC" --vendor "$V"
sleep 4; probe "after revoke:"
$CODEMOAT vendor license list --vendor "$V" --json | "$PY" -c "import json,sys; [print('   vendor sees:', r['id'], r['mode'], r['state'], 'live leases:', r['leases']) for r in json.load(sys.stdin) if r['mode']=='lease']"

say "everything this machine sent to the vendor ($CODEMOAT_HOME/outbound.jsonl): no code, no prompts"
"$PY" - "$CODEMOAT_HOME/outbound.jsonl" <<'PYEOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
sent = [l for l in lines if l["body"] is not None]
print(f"   {len(sent)} requests; the last one, verbatim:")
print("  ", sent[-1]["method"], sent[-1]["destination"], sent[-1]["body"])
PYEOF
