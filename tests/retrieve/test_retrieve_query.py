"""What retrieval looks for at a cursor: imports, identifiers in use, the owner before a dot."""

from __future__ import annotations

from codemoat.retrieve.query import _imports, chat_query, completion_query


def test_python_imports_give_names_with_their_modules():
    prefix = (
        "import os\nimport pkg.sub as ps\nfrom .fees import interchange_fee, refund as rf\n"
        "from ..core.models import (\n    Order,\n    Item,\n)\n\ndef f(order):\n    total = "
    )
    q = completion_query(prefix, "\n    return Order(total)\n", "app/payments/checkout.py")
    assert q.hints["interchange_fee"] == {"app/payments/fees"}
    assert q.hints["Order"] == {"app/core/models"}
    assert q.weights["interchange_fee"] > q.weights.get("total", 0)  # imported, unused yet
    assert q.weights["Order"] > q.weights["Item"]  # used right after the cursor


def test_js_and_go_imports():
    q = completion_query(
        "import { charge, refund } from './billing';\nimport * as money from '../money';\nconst x = ", "", "web/src/app.ts"
    )
    assert q.hints["charge"] == {"web/src/billing"}
    q = completion_query(
        'package main\nimport (\n\t"fmt"\n\tpay "example.com/acme/payments"\n)\nfunc main() {\n\tpay.', "", "cmd/main.go"
    )
    assert q.owner == "pay" and q.owner_module == "example.com/acme/payments"


def test_owner_before_cursor_and_members_seen_later():
    q = completion_query("from . import fees\n\ndef f(a):\n    x = fees.", "\n    y = fees.is_regulated(r)\n", "p/c.py")
    assert q.owner == "fees" and q.owner_module == "p/fees"
    assert q.member_weights["is_regulated"] > 0


def test_local_definitions_weigh_less():
    q = completion_query("def helper(a):\n    return a\n\nx = helper(1)\ny = other(2)\n", "", "m.py")
    assert q.weights["helper"] < q.weights["other"]


def test_chat_query_picks_code_words():
    q = chat_query("How does `to_minor_units` round, and what does Ledger.record return?")
    assert "to_minor_units" in q.weights and "record" in q.weights and "Ledger" in q.weights
    assert "round" in q.bm25_terms and "how" not in q.weights


def test_module_paths_relative_to_a_repository_that_is_a_package():
    q = completion_query("import typer\nfrom typer.core import TyperGroup\n\ntyper.", "", "cli.py")
    assert q.owner_module == "typer" and q.hints["TyperGroup"] == {"typer/core"}
    q.relative_to_package("typer")
    assert q.owner_module == "" and q.hints["TyperGroup"] == {"core"}  # `` is the root `__init__`
    assert "core" in q.path_hints and "typerx/core" not in q.path_hints


def test_name_match_with_the_cursor_line():
    q = completion_query("from .requests import Request, Response\n\ndef f(scope):\n    request = ", "", "a.py")
    assert q.name_match("Request") == 1.0 and q.name_match("Response") == 0.0
    assert completion_query("x = 1\n    conn = ", "", "a.py").name_match("HTTPConnection") == 0.5  # `conn` ~ `connection`
    assert completion_query("x = 1\n    return ", "", "a.py").name_match("Request") == 0.0  # keywords say nothing


def test_a_name_used_in_the_last_lines_weighs_more_than_one_used_long_ago():
    body = "\n".join(f"    v{i} = {i}" for i in range(40))
    prefix = f"from .m import old, recent\n\ndef f():\n    old(1)\n{body}\n    recent(2)\n    y = "
    q = completion_query(prefix, "", "a.py")
    assert q.weights["recent"] > q.weights["old"]


def test_expected_kind_after_raise_and_if():
    def expects(line: str) -> str | None:
        return completion_query("x = 1\n" + line, "", "a.py").expects

    assert expects("    raise ") == expects("    raise errors.") == expects("  throw new ") == "exception"
    assert expects("    if ") == expects("    elif not ") == expects("    ) or util.") == expects("if (!") == "predicate"
    assert expects("    x = ") is None and expects("    raise Error(") is None and expects("    notify ") is None
    q = completion_query("x = 1\n    raise ", "", "a.py")
    assert q.fits("class", "Abort", "class Abort(RuntimeError):") and not q.fits("class", "Basket", "class Basket:")
    q = completion_query("x = 1\n    if ", "", "a.py")
    assert q.fits("function", "lenient_issubclass", "def lenient_issubclass(cls: Any, t: type) -> bool:")
    assert q.fits("function", "is_number_type", "def is_number_type(t)") and not q.fits("function", "isint", "def isint(x)")


def test_imports_are_read_in_the_file_languages_syntax():
    src = "import { charge } from './billing';\nfrom .fees import refund\n"
    assert set(_imports(src, "pkg/a.py")[0]) == {"refund"}  # a JS-looking line in Python is not an import
    assert set(_imports(src, "web/a.ts")[0]) == {"charge"}
    assert set(_imports(src, "notes/a.txt")[0]) == {"charge", "refund"}  # unknown type: every syntax
    assert _imports('#include "x.h"\nuse a\\b;\n', "a.c") == ({}, {})
