#!/usr/bin/env bash
# 50 — customer trust: the audit trail of our own requests, tamper detection, a blocked
# outbound connection, and a secret that is redacted before anything is kept.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model audit-tiny.gguf)

PORT=$(free_port)
TOKEN=$($CODEMOAT tokens create --name demo-dev --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')

say "serve with prompt retention on (audit.retain_text = true): kept text is redacted first"
CODEMOAT_AUDIT__RETAIN_TEXT=true $CODEMOAT serve --model "$MODEL" --port "$PORT" >"$DEMO/audit-serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_healthy $PORT 20

"$PY" - "$PORT" "$TOKEN" <<'EOF'
import sys, httpx
port, token = sys.argv[1], sys.argv[2]
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
model = c.get("/v1/models").json()["data"][0]["id"]
key = "AKIA" + "Z7Q2X9W4V6T8R1P3"   # a (fake) AWS access key id pasted into the editor
r = c.post("/v1/completions", json={"model": model, "prompt": f"s3 = boto3.client('s3', aws_access_key_id='{key}')\n", "max_tokens": 8})
print("completion with a secret in the prompt:", r.status_code)
r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "What does def add(a, b) do?"}], "max_tokens": 8})
print("chat:", r.status_code)
print("no token:", httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}).status_code)
EOF
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT

say "the audit trail of those requests (codemoat audit export --since 10m)"
$CODEMOAT audit export --since 10m >"$DEMO/audit-export.jsonl"
"$PY" - "$DEMO/audit-export.jsonl" <<'EOF'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if r["kind"] != "request":
        continue
    who = r["user"] or "-"
    print(f"#{r['seq']:<4} {r['time'][11:19]} {who:9} {r['route']:22} status {r['status']}  "
          f"tokens {r['prompt_tokens']}+{r['completion_tokens']}  {r['latency_ms']:.0f} ms")
    if r["prompt_text"]:
        print("      kept prompt:", r["prompt_text"].strip(), "  secrets found:", r["detail"].get("secrets"))
EOF
DB="$CODEMOAT_HOME/codemoat.db"
grep -c "AKIAZ7Q2X9W4V6T8R1P3" "$DB"* >/dev/null 2>&1 && echo "!! the secret is in the database files" || echo "the secret appears nowhere in $DB* (checked the bytes)"

say "codemoat audit verify"
$CODEMOAT audit verify

say "someone edits one record in the database ..."
SEQ=$("$PY" -c "import sqlite3; print(sqlite3.connect('$DB').execute(\"SELECT max(seq) FROM audit_records WHERE kind='request' AND status=200\").fetchone()[0])")
OLD=$("$PY" -c "import sqlite3; print(sqlite3.connect('$DB').execute('SELECT completion_tokens FROM audit_records WHERE seq=$SEQ').fetchone()[0])")
"$PY" -c "import sqlite3; c=sqlite3.connect('$DB'); c.execute('UPDATE audit_records SET completion_tokens=0 WHERE seq=$SEQ'); c.commit()"
echo "UPDATE audit_records SET completion_tokens=0 WHERE seq=$SEQ"
$CODEMOAT audit verify && echo "!! tampering went unnoticed" || echo "(exit status $? — tampering detected)"
"$PY" -c "import sqlite3; c=sqlite3.connect('$DB'); c.execute('UPDATE audit_records SET completion_tokens=$OLD WHERE seq=$SEQ'); c.commit()"
echo "restored the original value:"; $CODEMOAT audit verify

say "a rollback needs no key: drop the last record, put back the older signed head the head file still holds"
$CODEMOAT audit head export -o "$DEMO/audit-head.json" --force   # an operator keeps this copy off the machine (--force: a rerun in the same scratch folder)
"$PY" -c "import sqlite3; s=sqlite3.connect('$DB'); s.backup(sqlite3.connect('$DEMO/audit-before-rollback.db'))"
"$PY" - "$DB" <<'EOF'
import json, shutil, sqlite3, sys
from codemoat import paths
from codemoat.audit.log import head_file_for
hf = head_file_for(paths.db_url(), paths.home())
shutil.copy2(hf, str(hf) + ".before-rollback")
raw = hf.read_bytes()
older, newest = sorted((json.loads(raw[i:i + 512]) for i in (0, 512)), key=lambda h: h["seq"])
c = sqlite3.connect(sys.argv[1])
c.execute("DELETE FROM audit_records WHERE seq = ?", (newest["seq"],))
c.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (older["seq"],))
c.execute("UPDATE audit_head SET seq=?, hash=?, last_checkpoint=?, ts_us=?, signature=? WHERE id = 1",
          (older["seq"], older["hash"], older["last_checkpoint"], older["ts_us"], older["signature"]))
c.commit()
older_slot = raw[0:512] if json.loads(raw[0:512])["seq"] == older["seq"] else raw[512:1024]
hf.write_bytes(older_slot * 2)
print(f"DELETE FROM audit_records WHERE seq = {newest['seq']}; the signed head of record {older['seq']} put back "
      f"in audit_head and in both slots of {hf.name} (every signature in what is left is valid)")
EOF
$CODEMOAT audit verify && echo "!! the rollback went unnoticed" || echo "(exit status $? — refused: audit verify remembers the last head it accepted)"
"$PY" -c "import sqlite3; s=sqlite3.connect('$DEMO/audit-before-rollback.db'); s.backup(sqlite3.connect('$DB'))"
HF=$("$PY" -c "from codemoat import paths; from codemoat.audit.log import head_file_for; print(head_file_for(paths.db_url(), paths.home()))")
mv "$HF.before-rollback" "$HF"
echo "put everything back:"; $CODEMOAT audit verify --trusted-head "$DEMO/audit-head.json"

say "the egress guard that serve arms: one loopback port allowed, another refused, the refusal audited"
"$PY" - 2>/dev/null <<'EOF'
import socket
from codemoat import paths
from codemoat.audit import egress
from codemoat.audit.log import AuditLog, head_file_for
from codemoat.db import open_db
url = paths.db_url()
log = AuditLog(open_db(url), head_file=head_file_for(url, paths.home()))
a, b = socket.socket(), socket.socket()
for s in (a, b):
    s.bind(("127.0.0.1", 0)); s.listen(1)
pa, pb = a.getsockname()[1], b.getsockname()[1]
# loopback=False makes 127.0.0.1 stand in for the internet: only the allow-listed port is reachable
egress.arm(egress.EgressGuard(allow=[f"127.0.0.1:{pa}"], loopback=False,
                              on_refuse=lambda ev, dest: log.append("egress_blocked", detail={"event": ev, "destination": dest})))
socket.create_connection(("127.0.0.1", pa)).close(); print(f"connect 127.0.0.1:{pa} (allow-listed): ok")
try:
    socket.create_connection(("127.0.0.1", pb))
except egress.EgressBlocked as e:
    print(f"connect 127.0.0.1:{pb}: refused — {e}")
try:  # with loopback off even "localhost" counts as outside; a name lookup is refused before any query
    socket.getaddrinfo("localhost", 443)
except egress.EgressBlocked as e:
    print("name lookup of localhost (standing in for a telemetry host): refused before any query")
EOF
$CODEMOAT audit export --kind egress_blocked --since 10m | "$PY" -c 'import json,sys; [print("audit record", r["seq"], r["kind"], r["detail"]) for r in map(json.loads, sys.stdin)]'

say "what this machine has ever sent off it (codemoat audit outbound)"
$CODEMOAT audit outbound
