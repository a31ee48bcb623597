#!/usr/bin/env bash
# 21 — revoking an offline license: the vendor writes a signed, numbered revocation list (CRL), the
# customer installs it, and the revoked license refuses to start; an older, edited or foreign CRL is refused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
refused() { if "$@" 2>"$DEMO/err.txt" >/dev/null; then echo "!! accepted"; exit 1; else printf '   refused: %s\n' "$(cat "$DEMO/err.txt")"; fi; }

V="$DEMO/vendor"
if [[ ! -f "$DEMO/acme.moat" || ! -f "$DEMO/acme.lic" ]]; then  # step 20 makes them; alone, make them here
  [[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
  $CODEMOAT machine-id --json >"$DEMO/acme-machine.json"
  $CODEMOAT vendor seal "$(demo_model vault-tiny.gguf)" --vendor "$V" --customer ACME --out "$DEMO/acme.moat" --no-fingerprint >/dev/null
  $CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/acme.moat" \
    --machine "$DEMO/acme-machine.json" --expires 30d --features complete,chat --out "$DEMO/acme.lic" >/dev/null
  $CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/acme.lic" >/dev/null  # this machine now trusts the vendor
fi

say "vendor: a second offline license for the same machine (a trial, say), then a CRL retiring another machine"
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/acme.moat" \
  --machine "$DEMO/acme-machine.json" --expires 30d --features complete --out "$DEMO/acme-trial.lic" --force
TRIAL=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['license']['id'])" "$DEMO/acme-trial.lic")
$CODEMOAT vendor revoke --vendor "$V" --machine m_retired_demo_box --reason "appliance retired" --out "$DEMO/crl-old.crl" --force
$CODEMOAT license crl install "$DEMO/crl-old.crl"

say "vendor: revoke the trial license offline; customer: install the new CRL"
$CODEMOAT vendor revoke --vendor "$V" --license "$TRIAL" --reason "trial ended" --out "$DEMO/crl-new.crl" --force
$CODEMOAT license crl install "$DEMO/crl-new.crl"
echo " - the revoked license:"; refused $CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/acme-trial.lic"
echo " - the other license on this machine still holds:"
$CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/acme.lic" | tail -1

say "attacks on the list, each refused in one line"
echo " - the older CRL installed again (it does not list the trial):"; refused $CODEMOAT license crl install "$DEMO/crl-old.crl"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); d['crl']['revoked']=d['crl']['revoked'][:1]; json.dump(d,open(sys.argv[2],'w'))" "$DEMO/crl-new.crl" "$DEMO/crl-edited.crl"
echo " - the new CRL with the trial taken out:"; refused $CODEMOAT license crl install "$DEMO/crl-edited.crl"
[[ -f "$DEMO/vendor-other/vendor.json" ]] || $CODEMOAT vendor init --vendor "$DEMO/vendor-other" >/dev/null
$CODEMOAT vendor revoke --vendor "$DEMO/vendor-other" --out "$DEMO/crl-foreign.crl" --force >/dev/null
echo " - a CRL signed by another vendor key:"; refused $CODEMOAT license crl install "$DEMO/crl-foreign.crl"
mv "$CODEMOAT_HOME/crl" "$DEMO/crl-stash"
echo " - the installed CRL deleted (the machine remembers the number it installed):"
refused $CODEMOAT verify --model "$DEMO/acme.moat" --license "$DEMO/acme-trial.lic"
mv "$DEMO/crl-stash" "$CODEMOAT_HOME/crl"
