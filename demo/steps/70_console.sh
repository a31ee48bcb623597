#!/usr/bin/env bash
# 70 — what the admin sees: usage and acceptance from the editors' own events, the cost case
# against the cloud, and the admin console at /admin (screenshots of Overview and Costs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model console-tiny.gguf)
PORT=$(free_port)
token() { $CODEMOAT tokens create --name "$1" --user "$1" --scopes "$2" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])'; }
ADMIN=$(token console-admin admin)
ANN=$(token ann complete)
BOB=$(token bob complete)

$CODEMOAT serve --model "$MODEL" --port "$PORT" >"$DEMO/console-serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_healthy $PORT 30

say "two developers' editors (Tabby's protocol): completions, then view / select / dismiss events"
"$PY" - "$PORT" "$ANN" "$BOB" <<'EOF'
import sys, httpx
port, tokens = sys.argv[1], sys.argv[2:]
files = [("python", "svc/api.py", "def handler(request):\n    return "), ("typescript", "web/app.ts", "export function sum(a: number, b: number) {\n  return "),
         ("go", "cmd/main.go", "func main() {\n\tfmt."), ("python", "svc/db.py", "def connect(url):\n    ")]
n = 0
for who, token in zip(("ann", "bob"), tokens):
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    for k in range(12 if who == "ann" else 8):
        lang, path, prefix = files[k % len(files)]
        r = c.post("/v1/completions", json={"language": lang, "segments": {"prefix": prefix, "suffix": "\n", "filepath": path}})
        cid = r.json()["id"]
        c.post("/v1/events", json={"type": "view", "completion_id": cid, "choice_index": 0})
        kind = "select" if k % 3 == 0 else "dismiss"
        c.post("/v1/events" + ("?select_kind=line" if k % 6 == 3 else ""), json={"type": kind, "completion_id": cid, "choice_index": 0})
        n += 1
print(f"{n} completions shown and answered by the editors of ann and bob")
EOF

say "codemoat usage report --by language   (persisted in the database, aggregated in SQL)"
COLUMNS=120 $CODEMOAT usage report --since 1d --by language

say "codemoat tco --developers 200   (the cost case; every input with its source: add --json)"
COLUMNS=120 $CODEMOAT tco --developers 200 --no-measure | tail -n 6

say "the admin console at http://127.0.0.1:$PORT/admin: screenshots in headless Chromium"
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && "$PY" -c 'import selenium' 2>/dev/null; then
  "$PY" - "$PORT" "$ADMIN" "$DEMO" <<'EOF'
import sys, tempfile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
port, admin, out = sys.argv[1:]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for f in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp()}",
          "--window-size=1280,900", "--hide-scrollbars"):
    opts.add_argument(f)
d = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
try:
    url = f"http://127.0.0.1:{port}"
    d.get(url + "/admin/signin")
    d.find_element(By.ID, "token").send_keys(admin)
    old = d.find_element(By.TAG_NAME, "html")
    d.find_element(By.ID, "signin").click()
    WebDriverWait(d, 60).until(ec.staleness_of(old))
    for page, name in (("/admin", "overview"), ("/admin/costs?developers=200", "costs")):
        d.get(url + page)
        d.set_window_size(1280, min(4000, d.execute_script("return document.body.scrollHeight") + 40))
        path = f"{out}/console-{name}.png"
        d.save_screenshot(path)
        print(f"{name:9} {path}")
    d.get(url + "/admin")
    print("acceptance on Overview:", d.find_element(By.ID, "acceptance").text)
finally:
    d.quit()
EOF
else
  echo "(chromium, chromium-driver or selenium missing: no screenshots; open http://127.0.0.1:$PORT/admin in a browser instead)"
fi
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT
