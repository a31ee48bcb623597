#!/usr/bin/env bash
# 60 — scale-out: two replicas on one PostgreSQL behind HAProxy; a token made on one works on
# both; a replica killed mid-stream; the shared audit log still verifies. Then lease seats: three
# replicas on a 2-seat license, the third refused with the reason until one stops.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model replicas-tiny.gguf)
say "two replicas on one PostgreSQL, behind HAProxy (deploy/haproxy.cfg)"
# replicas share the database, not this step's data directory's audit head file
CODEMOAT_HOME="$DEMO/replicas-home" "$PY" "$ROOT/demo/replicas_demo.py" "$MODEL"

say "license seats: each replica holds its own seat of a lease license; a third replica on a 2-seat license is refused"
S="$DEMO/seats"; mkdir -p "$S"
V="$DEMO/vendor"  # the vendor of the earlier steps: this machine trusts the first vendor key it meets, and only it
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
$CODEMOAT machine-id --json >"$S/machine.json"
[[ -f "$S/acme.moat" ]] || $CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer ACME --out "$S/acme.moat" --no-fingerprint >/dev/null
KPORT=$(free_port); PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
$CODEMOAT keyserver --vendor "$V" --port "$KPORT" >"$S/keyserver.log" 2>&1 & PIDS+=($!)
wait_healthy "$KPORT" 20
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$S/acme.moat" --machine "$S/machine.json" \
  --expires 30d --mode lease --keyserver "http://127.0.0.1:$KPORT" --lease-ttl 6s --grace 4s --seats 2 \
  --out "$S/acme.lic" >/dev/null
TOKEN=$($CODEMOAT tokens create --name seats-demo --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
PORTS=()
for i in 1 2 3; do  # one after the other, on this one machine (one machine identity)
  P=$(free_port); PORTS+=("$P")
  $CODEMOAT serve --model "$S/acme.moat" --license "$S/acme.lic" --port "$P" >"$S/replica$i.log" 2>&1 & PIDS+=($!)
  if ((i < 3)); then wait_healthy "$P"; else
    until curl -s -o /dev/null "http://127.0.0.1:$P/health"; do sleep 0.2; done; fi
done
seats() {  # what each replica's /health says
  "$PY" - "$TOKEN" "$@" <<'PYEOF'
import sys, httpx
token, ports = sys.argv[1], sys.argv[2:]
for i, p in enumerate(ports, 1):
    try:
        r = httpx.get(f"http://127.0.0.1:{p}/health", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError:
        print(f"   replica{i}: stopped")
        continue
    lic = r.json().get("license") or {}
    what = r.json().get("reason") if r.status_code != 200 else f"seat held ({lic.get('seats_used')}/{lic.get('seats')} in use)"
    print(f"   replica{i}: HTTP {r.status_code}  {what}")
PYEOF
}
seats "${PORTS[@]}"
echo "   replica3's log: $(grep -m1 -o 'no license seat.*' "$S/replica3.log")"
say "replica1 stops cleanly (its seat goes back to the key server); replica3 takes it at its next attempt"
kill "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true
wait_healthy "${PORTS[2]}" 30
seats "${PORTS[@]}"
