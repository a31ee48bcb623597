#!/usr/bin/env bash
# 30 — the private code index: index a small repository for the group `payments`, show the snippet a
# completion gets from another file (and the completion with and without it), show that a user outside
# `payments` gets nothing from it, and that re-indexing after an edit touches one file.
set -euo pipefail
: "${CODEMOAT:=codemoat}" "${PY:=python3}" "${DEMO:=$(mktemp -d)}"
export CODEMOAT_HOME="${CODEMOAT_HOME:-$DEMO/home}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL="${CODEMOAT_DEMO_MODEL:-$ROOT/models/codemoat-tiny.gguf}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

REPO="$DEMO/payments-repo"
rm -rf "$REPO" && cp -r "$ROOT/demo/repo" "$REPO"
git -C "$REPO" init -q && git -C "$REPO" remote add origin git@git.acme.example:fin/payments.git
$CODEMOAT index remove payments >/dev/null 2>&1 || true

say "admin: codemoat index add payments-repo --name payments --groups payments"
$CODEMOAT index add "$REPO" --name payments --groups payments
$CODEMOAT index list

say "the line to complete (payments/checkout.py:15) needs interchange_fee() from payments/fees.py"
sed -n '14,15p' "$REPO/payments/checkout.py" | sed 's/^/   │ /'

say "developer in group payments: codemoat retrieve --line 15 --column 16 (the snippets the prompt gets)"
$CODEMOAT retrieve --repo payments --path payments/checkout.py --line 15 --column 16 --k 2 --groups payments

say "a contractor (not in group payments) asks for the same cursor: no snippet from this repository"
$CODEMOAT retrieve --repo payments --path payments/checkout.py --line 15 --column 16 --groups contractors

say "the model completes the line, without and with the retrieved snippets ($(basename "$MODEL"))"
"$PY" - "$REPO" "$MODEL" <<'PYEOF'
import sys
from pathlib import Path
from llama_cpp import Llama
from codemoat.retrieve import Retriever

repo, model = Path(sys.argv[1]), sys.argv[2]
lines = (repo / "payments/checkout.py").read_text().split("\n")
prefix = "\n".join(lines[:14] + [lines[14][:16]])
suffix = "\n" + "\n".join(lines[15:])
llm = Llama(model_path=model, n_ctx=512, n_threads=2, verbose=False)
count = lambda t: len(llm.tokenize(t.encode(), add_bos=False, special=True))
for who, groups in (("payments", {"payments"}), ("contractor", {"contractors"})):
    snips = Retriever().snippets_for_completion(groups=frozenset(groups), repo="payments", path="payments/checkout.py",
                                                prefix=prefix, suffix=suffix, k=3, budget_tokens=200,
                                                count_tokens=count)
    ctx = "".join(f"<|file_sep|>{s.path}\n{s.text}" for s in snips)
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    # Qwen2.5-Coder's repository format, which the bundled model was trained on.
    prompt = f"<|repo_name|>payments\n{ctx}<|file_sep|>payments/checkout.py\n{fim}" if snips else fim
    out = llm.create_completion(prompt, max_tokens=24, temperature=0.0, stop=["\n"])["choices"][0]["text"]
    used = ", ".join(f"{s.path}:{s.start_line}" for s in snips) or "none"
    print(f"   {who:<10} snippets: {used}")
    print(f"   {'':<10} │ {lines[14][:16]}\033[32m{out}\033[0m")
print(f"   expected   │ {lines[14]}")
PYEOF

say "an edit, then codemoat index update: only the changed file is parsed again"
printf '\n\ndef refund_fee(amount_minor: int) -> int:\n    return 0\n' >> "$REPO/payments/fees.py"
$CODEMOAT index update payments
