"""Demo step 30: a completion that needs another file, through the server, as Tabby's editor plugin asks.

Two developers send the same request (Tabby's `/v1/completions` with `segments.git_url`/`filepath`
and `debug_options.return_snippets`): one in the group that may read the repository, one outside
it. The server finds the repository from the git URL, retrieves for the one who may read it only,
and says which snippets went into the prompt.
"""

import os
import sys
from pathlib import Path

import httpx

url, repo, git_url, alice, carol = sys.argv[1:6]
path, line_no, col = "payments/checkout.py", 15, 16
lines = (Path(repo) / path).read_text().split("\n")
prefix = "\n".join(lines[: line_no - 1] + [lines[line_no - 1][:col]])
suffix = "\n" + "\n".join(lines[line_no:])  # the rest of the line is what the model must write
expected = lines[line_no - 1][col:]
body = {
    "language": "python",
    "segments": {"prefix": prefix, "suffix": suffix, "filepath": path, "git_url": git_url},
    "temperature": 0,
    "debug_options": {"return_snippets": True},
}
results = {}
for who, token in (("alice (group payments)", alice), ("carol (group contractors)", carol)):
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    r.raise_for_status()
    d = r.json()
    text = d["choices"][0]["text"].split("\n")[0]
    snippets = (d.get("debug_data") or {}).get("snippets") or []
    results[who] = text
    print(f"\n   {who}: {len(snippets)} snippet(s) in the prompt")
    if (d.get("debug_data") or {}).get("suffix") == "dropped" or r.headers.get("x-codemoat-suffix") == "dropped":
        print("      (this model has no fill-in-the-middle tokens: the code after the cursor was not used)")
    for s in snippets:
        first = s["body"].strip().splitlines()[0]
        print(f"      {s['filepath']}  score {s['score']:.3f}  │ {first[:70]}")
    ok = text.strip() == expected.strip()
    mark = "\033[32m✓ matches the file\033[0m" if ok else "\033[33m✗ differs from the file\033[0m"
    print(f"   │ {lines[line_no - 1][:col]}\033[1m{text}\033[0m   {mark}")
print(f"\n   the file has │ {lines[line_no - 1]}")
alice_ok = next(iter(results.values())).strip() == expected.strip()
bundled = os.path.basename(os.environ.get("CODEMOAT_DEMO_MODEL", "codemoat-tiny.gguf")) == "codemoat-tiny.gguf"
if not alice_ok and bundled:
    print(
        "\n   \033[2mThe retrieved snippet holds what the line needs (interchange_fee and its arguments), but the\n"
        "   bundled 3.6M-parameter model is too small to copy it into the line (models/README.md: it has not\n"
        "   learned fill-in-the-middle in 45 CPU minutes). A real code model uses the same prompt:\n"
        "   CODEMOAT_DEMO_MODEL=/path/to/qwen2.5-coder-1.5b-q8_0.gguf make demo\033[0m"
    )
elif not alice_ok:
    print(
        "\n   \033[2mThis model did not write the line from the snippets it was given (above): a base model\n"
        "   without fill-in-the-middle training sees only the prefix; a code model with FIM tokens does better.\033[0m"
    )
