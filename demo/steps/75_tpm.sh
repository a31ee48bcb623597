#!/usr/bin/env bash
# 75 — hardware-rooted keys: the machine's keys live in a TPM (here swtpm, a software TPM 2.0 on
# 127.0.0.1), a lease is released only against a fresh quote, a copied data directory on another
# chip is refused, and a tamper event locks the model until the vendor reprovisions, a reboot included.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

if ! command -v swtpm >/dev/null || ! command -v swtpm_setup >/dev/null || ! "$PY" -c "import tpm2_pytss" 2>/dev/null; then
  echo "   (skipped: needs Debian's swtpm and swtpm-tools, and tpm2-pytss: pip install -e '.[tpm]')"; exit 0
fi

MODEL=$(demo_model vault-tiny.gguf)
V="$DEMO/vendor"
[[ -f "$V/vendor.json" ]] || $CODEMOAT vendor init --vendor "$V" >/dev/null
export CODEMOAT_HOME="$DEMO/tpm-home"   # this step's machine: its own data directory
T="$DEMO/tpm"; mkdir -p "$T/ca"
cat >"$T/ca/localca.conf" <<CONF
statedir = $T/ca
signingkey = $T/ca/signkey.pem
issuercert = $T/ca/issuercert.pem
certserial = $T/ca/certserial
CONF
printf 'create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n' \
  "$T/ca/localca.conf" >"$T/ca/setup.conf"

KS=""; SERVER=""
trap 'kill $KS $SERVER $(cat "$T"/*.pid 2>/dev/null) 2>/dev/null || true' EXIT
start_tpm() {  # start_tpm NAME: a fresh chip (its own endorsement seed, an EK certificate); prints its TCTI
  local dir="$T/$1" port
  mkdir -p "$dir"
  swtpm_setup --tpm2 --tpmstate "$dir" --create-ek-cert --config "$T/ca/setup.conf" >/dev/null
  port=$("$PY" -c 'import socket
while True:
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]
    try: socket.socket().bind(("127.0.0.1",p+1)); print(p); break
    except OSError: pass')
  swtpm socket --tpm2 --tpmstate dir="$dir" --server type=tcp,port=$port,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear >/dev/null 2>&1 &
  echo $! >"$T/$1.pid"; sleep 0.3  # (this runs in $(...): the pid goes through a file)
  echo "swtpm:host=127.0.0.1,port=$port"
}

reboot_tpm() {  # reboot_tpm NAME TCTI: TPM2_Shutdown, power off, power on (same state, same port): PCRs reset
  "$PY" - "$2" <<'PYEOF'
import sys
from tpm2_pytss import TPM2_SU
from codemoat.attest.tpm import TpmAttestor
with TpmAttestor(sys.argv[1]) as a:
    a.ctx.shutdown(TPM2_SU.CLEAR)
PYEOF
  local pid port=${2##*port=}
  pid=$(cat "$T/$1.pid"); kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  swtpm socket --tpm2 --tpmstate dir="$T/$1" --server type=tcp,port=$port,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear >/dev/null 2>&1 &
  echo $! >"$T/$1.pid"; sleep 0.3
}

say "customer: the machine's identity, made in the TPM (keys never leave the chip)"
TPM1=$(start_tpm chip1)
$CODEMOAT machine-id --tpm --tcti "$TPM1" --json >"$DEMO/tpm-machine.json"
"$PY" - "$DEMO/tpm-machine.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))["tpm"]
print(f"   AK {d['ak'][-16:]}…  unwrap key {d['unwrap'][-16:]}…  EK certificate {len(d['ek_cert'])//2} bytes")
print(f"   PCR policy: PCRs {d['policy']['pcrs']} = {d['policy']['digest'][:16]}… (recorded by the vendor)")
PYEOF

say "vendor: the EK certificate chains to the TPM maker's CA, and the chip proves the AK lives beside that EK"
cat "$T/ca/issuercert.pem" "$T/ca/swtpm-localca-rootca-cert.pem" >"$T/ek-ca.pem"  # swtpm's CA stands in for the TPM maker's
[[ -f "$V/tpm-ek-ca.pem" ]] || $CODEMOAT vendor tpm trust-ca "$T/ek-ca.pem" --vendor "$V" | sed 's/^/   /'
$CODEMOAT vendor tpm challenge --vendor "$V" --machine "$DEMO/tpm-machine.json" --out "$DEMO/tpm-challenge.json" --force | sed 's/^/   /'
$CODEMOAT appliance tpm-activate "$DEMO/tpm-challenge.json" --out "$DEMO/tpm-activation.json" --force | sed 's/^/   /'
$CODEMOAT vendor tpm confirm "$DEMO/tpm-activation.json" --vendor "$V" | sed 's/^/   /'

KPORT=$(free_port); SPORT=$(free_port)
say "vendor: seal, and a lease license bound to that TPM (TTL 6 s, grace 4 s)"
[[ -f "$DEMO/acme-tpm.moat" ]] || $CODEMOAT vendor seal "$MODEL" --vendor "$V" --customer ACME --out "$DEMO/acme-tpm.moat" --no-fingerprint >/dev/null
$CODEMOAT keyserver --vendor "$V" --port "$KPORT" >>"$DEMO/tpm-keyserver.log" 2>&1 & KS=$!
wait_healthy $KPORT 20
$CODEMOAT vendor license issue --vendor "$V" --customer ACME --model "$DEMO/acme-tpm.moat" \
  --machine "$DEMO/tpm-machine.json" --expires 30d --mode lease --keyserver "http://127.0.0.1:$KPORT" \
  --lease-ttl 6s --grace 4s --out "$DEMO/acme-tpm.lic" --json >"$DEMO/tpm-issue.json"
LIC=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['id'])" "$DEMO/tpm-issue.json")

say "customer: serve under an attested lease (each renewal: a quote of the key server's nonce)"
TOKEN=$($CODEMOAT tokens create --name tpm-demo --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
$CODEMOAT serve --model "$DEMO/acme-tpm.moat" --license "$DEMO/acme-tpm.lic" --port "$SPORT" >"$DEMO/tpm-serve.log" 2>&1 &
SERVER=$!
wait_healthy $SPORT
probe() {
  "$PY" - "$SPORT" "$TOKEN" "$1" <<'PYEOF'
import sys, httpx
port, token, label = sys.argv[1:4]
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
r = c.post("/v1/completions", json={"model": "acme-tpm", "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0})
lic = c.get("/health").json().get("license", {})
what = repr(r.json()["choices"][0]["text"]) if r.status_code == 200 else r.json().get("error", {}).get("message", "")[:90]
print(f"   {label:<22} HTTP {r.status_code}  lease {lic.get('lease_state')}  {what}")
PYEOF
}
probe "attested lease:"

say "an attacker copies the data directory (machine.key, tpm.json, license) to a machine with another TPM"
TPM2=$(start_tpm chip2)
cp -a "$CODEMOAT_HOME" "$DEMO/tpm-home-copy"
CODEMOAT_HOME="$DEMO/tpm-home-copy" CODEMOAT_TPM_TCTI="$TPM2" \
  $CODEMOAT verify --model "$DEMO/acme-tpm.moat" --license "$DEMO/acme-tpm.lic" 2>&1 | sed 's/^/   /' || true

say "the chassis is opened: the sensor's handler raises a tamper event"
$CODEMOAT appliance tamper-event --reason "chassis intrusion sensor" | sed 's/^/   /'
sleep 4; probe "after tamper:"
echo "   vendor sees: $(tail -1 "$V/attestation.jsonl")"

say "the machine is rebooted: PCR 15 is back to zero, but the tamper latch (an NV counter) still counts the event"
kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true
reboot_tpm chip1 "$TPM1"
"$PY" - "$TPM1" <<'PYEOF'
import sys
from codemoat.attest.tpm import TAMPER_PCR, TpmAttestor
with TpmAttestor(sys.argv[1]) as a:
    print(f"   PCR {TAMPER_PCR} after the reboot: {a.pcr_values([TAMPER_PCR])[0].hex()[:16]}… (the quote alone would hold again)")
PYEOF
if $CODEMOAT verify --model "$DEMO/acme-tpm.moat" --license "$DEMO/acme-tpm.lic" >/dev/null 2>"$DEMO/err.txt"; then
  echo "!! a lease was released after tamper + reboot"; exit 1
fi
printf '   start refused: %s\n' "$(cat "$DEMO/err.txt")"
echo "   vendor sees: $(tail -1 "$V/attestation.jsonl")"

say "the audit log: the chip certified its monotonic counter over the log (an older copy put back would not match it)"
$CODEMOAT audit export --kind tpm_checkpoint | "$PY" -c 'import json, sys
for line in sys.stdin:
    d = json.loads(line)["detail"]
    print("   TPM checkpoint: counter %s over record %s (NV_Certify by the AK)" % (d["counter"], d["seq"]))'
$CODEMOAT audit verify | sed 's/^/   /'

say "vendor reprovisions (the same chip, new policy values): the restarted server serves again"
$CODEMOAT machine-id --tpm --tcti "$TPM1" --json >"$DEMO/tpm-machine-2.json"
$CODEMOAT vendor license reprovision "$LIC" --vendor "$V" --machine "$DEMO/tpm-machine-2.json" --out "$DEMO/acme-tpm-2.lic" | sed 's/^/   /'
$CODEMOAT serve --model "$DEMO/acme-tpm.moat" --license "$DEMO/acme-tpm-2.lic" --port "$SPORT" >>"$DEMO/tpm-serve.log" 2>&1 &
SERVER=$!
wait_healthy $SPORT; probe "after reprovision:"
