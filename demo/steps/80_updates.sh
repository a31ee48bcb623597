#!/usr/bin/env bash
# 80 — the vendor sells a service: signed offline update bundles (a model v2 and a knowledge pack),
# gated by the support contract; a bundle released after support ended is refused until a renewed
# license unlocks it; a downgrade is refused; every step is in the audit log.
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

say "vendor: support renewed for a year (a new license); customer: the waiting bundles now install"
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$U/acme-v1.moat" --machine "$U/machine.json" \
  --expires 365d --support-until 365d --out "$U/renewed.lic" --force
$CODEMOAT update verify "$U/model-v2.moatpkg" --license "$U/renewed.lic"
$CODEMOAT update apply "$U/model-v2.moatpkg" --license "$U/renewed.lic"
$CODEMOAT update apply "$U/httpx.moatpkg" --groups everyone
$CODEMOAT update list

say "the installed v2 serves under the license it came with"
MOAT=$($CODEMOAT update list --json | "$PY" -c "import json,sys; print([r['model'] for r in json.load(sys.stdin) if r['channel']=='model' and r['current']][0])")
$CODEMOAT verify --model "$MOAT" --license "${MOAT%.moat}.lic"

say "attacks, each refused in one line"
$CODEMOAT vendor release --vendor "$V" --customer ACME --model "$MODEL" --version 1.5 --no-fingerprint --out "$U/model-v1.5.moatpkg" >/dev/null
echo " - a downgrade to 1.5 (not signed as a rollback target):"; refused $CODEMOAT update apply "$U/model-v1.5.moatpkg"
"$PY" -c "import sys; b=bytearray(open(sys.argv[1],'rb').read()); b[-100]^=1; open(sys.argv[2],'wb').write(b)" "$U/httpx.moatpkg" "$U/flipped.moatpkg"
echo " - one bit flipped in a bundle's payload:"; refused $CODEMOAT update verify "$U/flipped.moatpkg"
echo " - the same bundle applied on another machine:"
CODEMOAT_HOME="$DEMO/other-machine" $CODEMOAT machine-id >/dev/null 2>&1
refused env CODEMOAT_HOME="$DEMO/other-machine" $CODEMOAT update apply "$U/httpx.moatpkg" --license "$U/renewed.lic"

say "audit: every update step is a record"
$CODEMOAT audit export --kind update | "$PY" -c "import json,sys; [print('  ', r['route'], {k: v for k, v in (r['detail'] or {}).items() if k in ('version','reason','name')}) for r in map(json.loads, sys.stdin)]"
