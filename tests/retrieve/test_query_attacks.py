"""An outside attacker's review of retrieval's query reading: a hostile completion body (any token
holder) and a hostile committed file (any committer to an indexed repository) against the patterns
that read a prefix, a suffix, a question and an indexed file's imports.

Was broken: those patterns backtracked quadratically or cubically on text no editor sends but any
client can (a 20 KB identifier with no "(" after it cost 35 s, 20 KB of blank lines 82 s, "import"
and 3,000 spaces 57 s), all of it in one regex call holding the GIL, so the whole server stood still
meanwhile: one small request froze every user's completions. A committed .js file of 20 lines of
"import" and spaces cost 9 s in every completion that looked up its members. Each case here is run
in its own interpreter with a bound tens of times what the text costs now and thousands of times
less than what it cost before (a hang is the failure, not a slow run).
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from conftest import create_token, run_cli

N = 200_000  # characters of hostile text: well under server.max_body_mb (8 MiB)
BOUND = 120  # seconds: the whole case runs in well under a second here now

SHAPES = {
    "a long identifier": "a" * N,
    "blank lines": "\n" * N,
    "indented blank lines": " \t\n" * (N // 3),
    "import and spaces": "import" + " " * N,
    "import and blank lines": "import" + "\n" * N,
    "repeated imports": "import " * (N // 7),
    "a Java import and spaces": "import a.b" + " " * N + "x",
    "open braces": "const {" * (N // 7),
    "open parentheses": "from a import (\n" * (N // 16),
    "Go receivers": "func (\n" * (N // 7),
    "Rust groups": "use a::{\n" * (N // 9),
    "glued names": "a1" * (N // 2),
    "a dotted chain ending badly": "a." * (N // 2) + "1",
    "a condition and spaces": "if" + " " * N + "x (",
    "an && and spaces": "x &&" + "\r" * N + "x (",
}
PATHS = ["", "x.py", "x.js", "x.go", "x.rs", "x.java", "x.php"]


def _in_own_interpreter(code: str, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=BOUND, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still reading the hostile text after {BOUND} s (it takes well under a second)")


QUERY = f"""
import sys
from codemoat.retrieve.query import _imports, chat_query, completion_query
text = open(sys.argv[1], encoding="utf-8", newline="").read()
for path in {PATHS!r}:
    completion_query(text, text[:4000], path)
    completion_query("x = 1\\n", text, path)
    _imports(text, path or "x")
chat_query(text)
print("read")
"""


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_hostile_prefix_suffix_or_question_is_read_in_linear_time(shape, tmp_path):
    (tmp_path / "text").write_text(SHAPES[shape], encoding="utf-8", newline="")
    p = _in_own_interpreter(QUERY, str(tmp_path / "text"))
    assert p.returncode == 0 and p.stdout.strip() == "read", p.stderr[-2000:]


def test_what_retrieval_reads_in_ordinary_code_is_unchanged():
    """The negative beside the attacks: imports, calls, chains and the owner before the cursor still read."""
    from codemoat.retrieve.query import _imports, completion_query

    js = "import { charge, refund } from './billing';\nimport type { Money } from \"../money\"\nconst x = "
    names, _ = _imports(js, "web/src/app.ts")
    assert names["charge"] == {"web/src/billing"} and names["Money"] == {"web/money"}
    assert _imports("import {\n  a,\n  b as c,\n} from 'lib/x'\n", "m.js")[0] == {"a": {"lib/x"}, "b": {"lib/x"}, "c": {"lib/x"}}
    q = completion_query("import pay.api as api\n\ndef f():\n    y = api.charge(1)\n    api.", "", "m.py")
    assert q.owner == "api" and q.owner_module == "pay/api" and q.qualified["charge"] == {"api"}
    assert completion_query("x = 1\n    total = compute_fee (x)", "", "m.py").weights["compute_fee"] > 0
    assert _imports("import java.util.List;   \nimport static a.b.C;\n", "A.java")[0].keys() == {"List", "C"}
    assert _imports('package m\nimport (\n\n\t"fmt"\n\tpay "x.com/pay"\n)\n', "m.go")[1] == {"fmt": "fmt", "pay": "x.com/pay"}
    assert _imports("use crate::pay::{charge, refund as r};\n", "m.rs")[0].keys() == {"charge", "refund"}
    assert _imports("from .core import (\n    Order,\n    Item,\n)\n", "a/b.py")[0].keys() == {"Order", "Item"}


RETRIEVE = """
import sys
from codemoat.retrieve import Retriever
sn = Retriever().snippets_for_completion(
    groups=frozenset({"web"}), repo="web", path="main.js", prefix="import * as evil from './lib/evil'\\n\\nevil.", suffix=""
)
print(sorted({s.path for s in sn}))
"""


def test_a_committed_file_does_not_stall_the_completions_of_its_readers(tmp_path, home):
    """A committer's .js file (lines of `import` and spaces, 380 KB, under the indexer's limits) is read
    as an imported module's members are looked up: it cost 9 s per completion at 20 lines, before."""
    root = tmp_path / "web"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "evil.js").write_text("export function charge(x) { return x }\n" + ("import" + " " * 190 + "\n") * 2000)
    (root / "app.js").write_text("import { charge } from './lib/evil'\nexport const go = () => charge(1)\n")
    assert run_cli("index", "add", str(root), "--name", "web", "--groups", "web").returncode == 0
    p = _in_own_interpreter(RETRIEVE)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "lib/evil.js" in p.stdout  # the member lookup ran: it is the file's own `charge`


@pytest.mark.slow
def test_a_hostile_chat_message_does_not_freeze_the_server(tmp_path, home, serve_process, random_gguf):
    """Over HTTP, as any token holder: a question naming a readable repository (`@payments`, so retrieval
    reads it) and holding a 200 KB identifier. Before, reading it held the server's GIL for over half
    an hour, whatever came after (the prompt is refused as too long, but only once it has been read);
    no other request was answered meanwhile."""
    root = tmp_path / "payments"
    root.mkdir()
    (root / "money.py").write_text("def cents_to_display(cents):\n    return f'{cents / 100:.2f}'\n")
    assert run_cli("index", "add", str(root), "--name", "payments", "--groups", "everyone").returncode == 0
    token = create_token("--name", "dev")
    s = serve_process(["--model", str(random_gguf), "--model-id", "tiny"])
    auth = {"Authorization": f"Bearer {token}"}

    def ask(text: str) -> httpx.Response:
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": text}]}
        return httpx.post(s.url + "/v1/chat/completions", json=body, headers=auth, timeout=BOUND)

    try:
        r = ask("@payments what does " + "a" * N + " return?")
    except httpx.TimeoutException:
        pytest.fail(f"a {N // 1000} KB question held the server for over {BOUND} s")
    assert r.status_code in (200, 400), r.text  # answered, or refused as too long for the model: one response
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200
    r = ask("@payments what does cents_to_display return?")
    assert r.status_code == 200, r.text  # the same question, ordinary, is still answered


def test_long_or_many_names_in_requests_do_not_pile_up_in_memory():
    """Was broken: every identifier a request's text held was kept for good in the split-name cache, with
    its words, whatever its length: 100 chat questions holding a unique 1 MB identifier kept 826 MiB
    (an 8 MiB body each: about 64 MiB a request); and 500,000 names of 64 characters, 1.2 GB."""
    import random
    import string

    from codemoat.index import terms
    from codemoat.retrieve.query import chat_query, completion_query

    r = random.Random(7)
    long_names = ["n" + "".join(r.choices(string.ascii_letters, k=100_000)) for _ in range(20)]
    for name in long_names:
        chat_query(f"@payments what does {name} return?")
        completion_query(f"x = {name}", "", "m.py")
    kept = sum(name in terms._cache for name in long_names)
    assert kept == 0, f"{kept} of the 20 long names are kept for good"
    assert max(map(len, terms._cache), default=0) <= terms.CACHE_CHARS
    for _ in range(50_000):  # unique 64-character names of 32 words each: more than CACHE_BYTES holds
        terms.split_identifier("".join(r.choice(string.ascii_uppercase) + r.choice(string.ascii_lowercase) for _ in range(32)))
    assert terms._cached_bytes == sum(terms._footprint(k, v) for k, v in terms._cache.items()) <= terms.CACHE_BYTES
    # the negative: an ordinary name is still split once and then remembered
    assert terms.split_identifier("parse_HTTPHeader") == ("parse_httpheader", "parse", "http", "header")
    assert terms._cache["parse_HTTPHeader"] == ("parse_httpheader", "parse", "http", "header")


@pytest.mark.parametrize(
    "alphabet",
    [
        [chr(c) for c in range(0x1D400, 0x1D434)],  # mathematical bold letters: \w, outside the BMP, 4 bytes a character
        [chr(c) for c in range(0x3B1, 0x3C9)],  # Greek: 2 bytes a character
        list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
    ],
    ids=["outside the BMP", "Greek", "ASCII"],
)
def test_the_name_cache_counts_what_its_names_hold(alphabet, monkeypatch):
    """Was broken: the cache's bound counted a byte a character, so 64-character names of letters outside the BMP
    (any client's question can hold them) kept 163 MiB under a 64 MiB bound. Measured with tracemalloc: what the
    cache holds stays within its count (and the bound), whatever the names' letters; ASCII names are the negative."""
    import random
    import tracemalloc

    from codemoat.index import terms

    monkeypatch.setattr(terms, "CACHE_BYTES", 4 << 20)
    r = random.Random(3)
    terms._cache.clear()
    terms._cached_bytes = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        while terms._cached_bytes < 0.9 * terms.CACHE_BYTES:
            terms.split_identifier("".join(r.choices(alphabet, k=64)))
        held = tracemalloc.get_traced_memory()[0] - before
        counted = terms._cached_bytes
    finally:
        tracemalloc.stop()
        terms._cache.clear()
        terms._cached_bytes = 0
    assert held <= 1.15 * counted, f"{held >> 10} KiB held, {counted >> 10} KiB counted"
