#!/usr/bin/env bash
# 60 — scale-out: two replicas on one PostgreSQL behind HAProxy; a token made on one works on
# both; a replica killed mid-stream; the shared audit log still verifies.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

MODEL=$(demo_model replicas-tiny.gguf)
say "two replicas on one PostgreSQL, behind HAProxy (deploy/haproxy.cfg)"
# replicas share the database, not this step's data directory's audit head file
CODEMOAT_HOME="$DEMO/replicas-home" "$PY" "$ROOT/demo/replicas_demo.py" "$MODEL"
