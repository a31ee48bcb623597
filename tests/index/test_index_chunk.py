"""Tree-sitter chunking and symbols, on small real snippets of each supported language."""

from __future__ import annotations

import pytest

from codemoat.index.chunk import MAX_DEF_LINES, PIECE_LINES, chunk_file, language_for

SAMPLES = {
    "a.py": ('import os\nX = 3\n\n@dec\nclass Foo(Base):\n    """Doc of Foo."""\n    a = 1\n    def m(self, x):\n'
             '        """M doc."""\n        return x\n\ndef top(a, b=2) -> int:\n    return a\n',
             {"Foo", "Foo.m", "top", "X"}),
    "a.js": ("import {a} from './x';\nexport function foo(a, b) { return a; }\nconst bar = (x) => x + 1;\n"
             "class Foo extends Base { constructor() {} method(a) { return 1; } }\n", {"foo", "bar", "Foo", "Foo.method"}),
    "a.ts": ("export interface I { m(x: string): void }\ntype T = {a: number};\nnamespace NS { export function f(): void {} }\n"
             "export abstract class A<T> implements I { m(x: string): void {} }\n", {"I", "T", "NS.f", "A", "A.m"}),
    "a.tsx": ("export const App = () => <div/>;\nexport function Page(p: Props) { return <App/>; }\n", {"App", "Page"}),
    "a.go": ("package main\ntype S struct { A int }\nfunc (s *S) M() int { return 1 }\nfunc F(a int) error { return nil }\n",
             {"S", "S.M", "F"}),
    "A.java": ("package x;\npublic class A extends B { public A() {} public int m(int x) { return x; } }\n", {"A", "A.A", "A.m"}),
    "a.rs": ("pub struct S { a: i32 }\nimpl S { pub fn new() -> Self { S{a:1} } }\npub fn f(x: i32) -> i32 { x }\n",
             {"S", "S.new", "f"}),
    "a.c": ("struct S { int a; };\nstatic int *f(int x) { return 0; }\n", {"S", "f"}),
    "a.cpp": ("namespace ns { class C { public: int m(int x) { return x; } }; }\nint ns::C::other(int y) { return y; }\n",
              {"ns.C", "ns.C.m", "ns.C.other"}),
    "a.cs": ("namespace N { public class C { public int M(int x) { return x; } } }\n", {"N.C", "N.C.M"}),
    "a.rb": ("module M\n  class C < B\n    def m(x)\n      x\n    end\n  end\nend\n", {"M", "M.C", "M.C.m"}),
    "a.php": ("<?php\nfunction f($a) { return $a; }\nclass C { public function m($x) { return $x; } }\n", {"f", "C", "C.m"}),
    "a.kt": ("package p\nfun top(a: Int): Int = a\nobject O { fun o() {} }\n", {"top", "O", "O.o"}),
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_definitions_found_in_every_language(path):
    src, expected = SAMPLES[path]
    chunks, symbols = chunk_file(path, src)
    found = {s.qualname for s in symbols}
    assert expected <= found, f"missing {expected - found}"
    for s in symbols:  # every symbol points at a chunk that spans its first line
        c = chunks[s.chunk]
        assert c.start <= s.start <= c.end or c.kind == "module"


def test_method_chunk_carries_class_header_and_class_skeleton_elides_bodies():
    src, _ = SAMPLES["a.py"]
    chunks, symbols = chunk_file("a.py", src)
    by = {s.qualname: s for s in symbols}
    method = chunks[by["Foo.m"].chunk]
    assert method.text.splitlines()[0] == "class Foo(Base):" and "return x" in method.text
    skeleton = chunks[by["Foo"].chunk]
    assert "def m(self, x):" in skeleton.text and "return x" not in skeleton.text
    assert by["Foo"].doc == "Doc of Foo." and by["Foo.m"].signature == "def m(self, x):"
    assert by["X"].kind == "variable"


def test_long_function_is_cut_into_pieces_that_repeat_the_signature():
    body = "\n".join(f"    v{i} = {i}" for i in range(200))
    chunks, symbols = chunk_file("big.py", f"def big(a):\n{body}\n    return a\n")
    pieces = [c for c in chunks if c.name == "big"]
    assert len(pieces) == 4 and all(c.end - c.start < PIECE_LINES for c in pieces)
    assert all(c.text.startswith("def big(a):") for c in pieces)
    assert chunks[symbols[0].chunk].start == 1
    assert "v150 = 150" in "".join(c.text for c in pieces) and MAX_DEF_LINES < 202


def test_files_without_grammar_become_line_windows():
    assert language_for("notes.md") is None
    text = "\n".join(f"line {i} words" for i in range(100))
    chunks, symbols = chunk_file("notes.md", text)
    assert symbols == [] and [(c.start, c.end) for c in chunks] == [(1, 40), (41, 80), (81, 100)]


def test_broken_source_still_chunks():
    chunks, symbols = chunk_file("bad.py", "def ok(a):\n    return a\n\ndef broken(:\n    pass\n")
    assert "ok" in {s.name for s in symbols} and chunks


def test_signature_keeps_each_line_as_written():
    src = "class File(Form):  # type: ignore[misc]\n    pass\n\ndef grid(\n    *headers: str,\n    pad:  int = 1,\n) -> None:\n    pass\n"
    _chunks, symbols = chunk_file("p.py", src)
    by = {s.name: s for s in symbols}
    assert by["File"].signature == "class File(Form):  # type: ignore[misc]"  # an outline quotes it verbatim
    assert by["grid"].signature == "def grid( *headers: str, pad:  int = 1, ) -> None:"


def test_windows_need_eight_letters_or_digits():
    assert chunk_file("notes.txt", "a_b_c_d_e_f_g\n--\n")[0] == []  # 7, underscores and punctuation aside
    (window,) = chunk_file("notes.txt", "a_b_c_d_e_f_g9")[0]
    assert window.kind == "text" and window.text == "a_b_c_d_e_f_g9"
