"""What comes after `owner.` and which imported name comes next, on a small real package indexed in SQLite."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from codemoat.retrieve import Retriever
from codemoat.retrieve.query import completion_query
from codemoat.retrieve.outlines import _Fragments, _path_match

G = frozenset({"dev"})
FILES = {
    "__init__.py": "from .api import checkout as checkout\nfrom .api import Basket as Basket\n",
    "api.py": "from ._impl.pricing import checkout as checkout\nfrom ._impl.pricing import Basket\nfrom ._impl.pricing import tax_rate\n\n"
    "def refill(basket):\n    basket.add(tax_rate(1))\n    basket.remove(2)\n    return basket\n",
    "_impl/__init__.py": "",
    "_impl/pricing.py": '''
        def checkout(basket, *, coupon=None):
            """Charge a basket."""
            return basket

        def tax_rate(country):
            return 0.2

        class Basket:
            def add(self, item):
                return item

            def remove(self, item):
                return item

            @classmethod
            def empty(cls):
                return cls()
        ''',
    "util/__init__.py": "from .strings import slugify\n",
    "util/strings.py": "def slugify(text: str) -> str:\n    return text.lower()\n",
    "orders/__init__.py": "",
    "orders/util.py": "from .._impl.pricing import tax_rate\n\ndef order_total(order):\n    return tax_rate(order)\n",
    "orders/views.py": "from .. import util\nfrom ..api import Basket\nfrom .util import order_total\n\ndef show(order):\n    return order\n",
    "cli.py": "import shop\n\ndef main():\n    return 0\n",
    "text.py": "def shout(s):\n    return s\n\ndef whisper(s):\n    return s\n\ndef mumble(s):\n    return s\n",
    "greet.py": "from . import text\n\ndef greet_softly(name, hour):\n    return text.whisper(name) if hour > 22 else name\n",
    "noise.py": "from . import text\n\ndef alarm():\n    return text.shout(1)\n\ndef siren():\n    return text.shout(2)\n",
    "errors.py": "class PaymentError(Exception):\n    pass\n\ndef refundable(order) -> bool:\n    return True\n\n"
    "def refund(order):\n    return order\n",
}


@pytest.fixture
def shop(tmp_path) -> Retriever:
    root = tmp_path / "shop"  # the repository's root folder is the package itself, as site-packages/shop
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip("\n"))
    add_repository(SqliteIndex(tmp_path / "index.db"), root, "shop", ["dev"])
    return Retriever(tmp_path / "index.db")


def _at(r: Retriever, path: str, prefix: str, suffix: str = "") -> list:
    return r.snippets_for_completion(groups=G, repo="shop", path=path, prefix=prefix, suffix=suffix, k=5, budget_tokens=4000)


def _rank(snips: list, path: str, text: str) -> int | None:
    return next((i for i, s in enumerate(snips) if s.path == path and text in s.text), None)


def test_root_package_members_followed_through_reexports(shop):
    snips = _at(shop, "cli.py", FILES["cli.py"].replace("    return 0\n", "    shop."))
    first = snips[0]
    # `shop.checkout` is defined two re-exports away: the outline names the file that defines it.
    assert first.path == "_impl/pricing.py" and "def checkout(basket, *, coupon=None):" in first.text


def test_relative_module_is_the_exact_path_not_a_namesake(shop):
    prefix = FILES["orders/views.py"].replace("    return order\n", "    return util.")
    snips = _at(shop, "orders/views.py", prefix)
    assert snips[0].path == "util/strings.py" and "def slugify(" in snips[0].text
    assert _rank(snips, "orders/util.py", "order_total") != 0  # `orders/util.py` only ends like `util`


def test_explicit_reexport_ranks_above_a_name_imported_for_own_use(shop):
    # `tax_rate` is used more widely, but `api` only imports it for itself; it re-exports `checkout`.
    prefix = "from . import api\n\ndef f():\n    return api."
    text = next(s.text for s in _at(shop, "cli.py", prefix) if s.path == "_impl/pricing.py")
    assert "def checkout(" in text and "def tax_rate(" in text
    assert text.index("def checkout(") < text.index("def tax_rate(")


def test_class_owner_gets_its_methods_called_on_the_class_first(shop):
    prefix = FILES["orders/views.py"].replace("    return order\n", "    b = Basket.")
    outline = _at(shop, "orders/views.py", prefix)[0]
    lines = outline.text.split("\n")
    assert outline.path == "_impl/pricing.py" and lines[0] == "class Basket:"
    assert lines[1].strip() == "def empty(cls):"  # called on the class, before the (more used) instance methods
    assert {"def add(self, item):", "def remove(self, item):"} <= {ln.strip() for ln in lines}


def test_name_on_the_cursor_line_picks_the_imported_name(shop):
    prefix = "from .api import checkout, Basket\nfrom .util import slugify\n\ndef f():\n    basket = "
    q = completion_query(prefix, "", "cli.py")
    q.relative_to_package("shop")
    ids = [r.id for r in SqliteIndex(shop.path).repos()]
    (top, _), *_ = shop.symbol_ranking(q, ids, "cli.py")
    assert SqliteIndex(shop.path).chunks([top])[top].name == "Basket"  # three unused imports; the line says which
    snips = _at(shop, "cli.py", prefix)
    assert _rank(snips, "_impl/pricing.py", "class Basket") < _rank(snips, "_impl/pricing.py", "def checkout")


def test_a_name_imported_from_a_module_that_reexports_it_counts_as_found_there(shop):
    from codemoat.retrieve.query import Query

    store = SqliteIndex(shop.path)
    ids = [r.id for r in store.repos()]
    # Both imported and unused alike; `api` re-exports checkout, `orders/util` defines order_total.
    q = Query(weights={"checkout": 3.0, "order_total": 3.0}, hints={"checkout": {"api"}, "order_total": {"orders/util"}})
    scores = {store.chunks([cid])[cid].name: s for cid, s in shop.symbol_ranking(q, ids, "cli.py")}
    assert scores["checkout"] == pytest.approx(scores["order_total"])


@pytest.mark.parametrize(("at", "expected"), [("raise ", "PaymentError"), ("if not ", "refundable"), ("x = ", None)])
def test_the_syntax_at_the_cursor_says_what_kind_of_name_comes(shop, at, expected):
    prefix = f"from .errors import refund, refundable, PaymentError\n\ndef f(order):\n    {at}"
    q = completion_query(prefix, "", "cli.py")
    store = SqliteIndex(shop.path)
    ranked = shop.symbol_ranking(q, [r.id for r in store.repos()], "cli.py")
    scores = {store.chunks([cid])[cid].name: s for cid, s in ranked}
    best = max(scores, key=scores.get)
    if expected:
        assert best == expected and scores[best] > 2 * max(v for k, v in scores.items() if k != best)
    else:  # nothing expected: three unused imports weigh alike
        assert max(scores.values()) < 2 * min(scores.values())


_frag = st.lists(st.sampled_from(["a", "b", "pkg", "util"]), max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(st.sets(_frag, max_size=6), _frag)
def test_fragment_set_matches_as_path_match_does(frags, stem):
    assert _Fragments(frags).match(stem) == any(_path_match(stem, f) for f in frags)


def test_members_that_similar_code_elsewhere_calls_come_first(shop):
    # `shout` is used more, but the code most like this (greet.py) calls `text.whisper`.
    prefix = "from . import text\n\ndef greet_softly_twice(name, hour):\n    return text."
    outline = next(s for s in _at(shop, "cli.py", prefix) if s.path == "text.py")
    assert outline.text.split("\n")[0] == "def whisper(s):"


def test_a_chunk_whose_signature_an_outline_shows_ranks_lower(shop, monkeypatch):
    import codemoat.retrieve.retriever as retriever

    prefix = "from ._impl.pricing import checkout, tax_rate\n\ndef f(b):\n    x = "

    def scores() -> tuple[float, float]:
        snips = shop.snippets_for_completion(
            groups=G, repo="shop", path="cli.py", prefix=prefix, suffix="", k=10, budget_tokens=4000
        )
        outline = next(
            s.score for s in snips if s.path == "_impl/pricing.py" and "def checkout(" in s.text and "def tax_rate(" in s.text
        )
        chunk = next(s.score for s in snips if s.path == "_impl/pricing.py" and "return basket" in s.text)
        return outline, chunk

    factor = retriever.COVERED
    outline, chunk = scores()
    monkeypatch.setattr(retriever, "COVERED", 1.0)
    assert factor < 1 and outline > chunk and chunk == pytest.approx(factor * scores()[1], rel=1e-3)
