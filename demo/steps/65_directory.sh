#!/usr/bin/env bash
# 65 — the company directory (LDAP) decides who sees which code: alice signs in with her directory
# password, gets her own token and payments code; the directory drops her from the group, a sync
# follows, and her next completion no longer draws on payments.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model directory-tiny.gguf)
say "sign in with the company directory; groups (and so code access) come from it"
"$PY" "$ROOT/demo/directory_demo.py" "$MODEL"
