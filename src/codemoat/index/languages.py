"""The languages the indexer parses: file extensions, and the tree-sitter node types that make a
definition, a class, a type, a scope, a body or a name in each grammar (`chunk.py` walks them).

Grammars come from tree-sitter-language-pack 0.13.0, which bundles them (newer releases download
grammars at first use and fail offline); a language without a grammar here is cut into line windows.
"""

from __future__ import annotations

from functools import cache
from typing import Any

LANG_BY_EXT = {
    "py": "python", "pyi": "python",
    "js": "javascript", "mjs": "javascript", "cjs": "javascript", "jsx": "javascript",
    "ts": "typescript", "mts": "typescript", "cts": "typescript", "tsx": "tsx",
    "go": "go", "java": "java", "rs": "rust",
    "c": "c", "h": "cpp", "cc": "cpp", "cpp": "cpp", "cxx": "cpp", "hpp": "cpp", "hh": "cpp", "hxx": "cpp",
    "cs": "csharp", "rb": "ruby", "php": "php", "kt": "kotlin", "kts": "kotlin",
}  # fmt: skip

_JS = "javascript"
FUNCS = {
    "python": {"function_definition"},
    _JS: {"function_declaration", "generator_function_declaration", "method_definition"},
    "typescript": {"function_declaration", "generator_function_declaration", "method_definition", "function_signature", "abstract_method_signature"},
    "go": {"function_declaration", "method_declaration"},
    "java": {"method_declaration", "constructor_declaration"},
    "rust": {"function_item", "function_signature_item"},
    "c": {"function_definition"},
    "cpp": {"function_definition"},
    "csharp": {"method_declaration", "constructor_declaration", "destructor_declaration", "operator_declaration"},
    "ruby": {"method", "singleton_method"},
    "php": {"function_definition", "method_declaration"},
    "kotlin": {"function_declaration"},
}  # fmt: skip
CLASSES = {
    "python": {"class_definition"},
    _JS: {"class_declaration"},
    "typescript": {"class_declaration", "abstract_class_declaration", "interface_declaration"},
    "java": {"class_declaration", "interface_declaration", "enum_declaration", "record_declaration", "annotation_type_declaration"},
    "rust": {"trait_item", "impl_item"},
    "cpp": {"class_specifier", "struct_specifier"},
    "csharp": {"class_declaration", "interface_declaration", "struct_declaration", "record_declaration"},
    "ruby": {"class", "module"},
    "php": {"class_declaration", "interface_declaration", "trait_declaration", "enum_declaration"},
    "kotlin": {"class_declaration", "object_declaration", "companion_object"},
}  # fmt: skip
TYPES = {
    "typescript": {"type_alias_declaration", "enum_declaration"},
    "go": {"type_spec", "type_alias"},
    "rust": {"struct_item", "enum_item", "type_item", "union_item"},
    "c": {"struct_specifier", "enum_specifier", "union_specifier", "type_definition"},
    "cpp": {"enum_specifier", "union_specifier", "type_definition", "alias_declaration"},
    "csharp": {"enum_declaration"},
}  # fmt: skip
SCOPES = {
    "internal_module",
    "module",
    "namespace_definition",
    "namespace_declaration",
    "file_scoped_namespace_declaration",
    "mod_item",
}
# Nodes to look inside without adding a scope; the first three also lend their start line (decorators, `export`, `template<>`).
WRAPPERS = {"decorated_definition", "export_statement", "template_declaration"}
TRANSPARENT = WRAPPERS | {
    "ERROR",
    "type_declaration",
    "expression_statement",
    "enum_body_declarations",
    "declaration_list",
    "linkage_specification",
    "ambient_declaration",
}
BODIES = {
    "block",
    "class_body",
    "declaration_list",
    "field_declaration_list",
    "body_statement",
    "interface_body",
    "enum_body",
    "statement_block",
    "compound_statement",
    "function_body",
    "enum_class_body",
}
NAME_TYPES = {
    "identifier",
    "type_identifier",
    "simple_identifier",
    "constant",
    "name",
    "field_identifier",
    "property_identifier",
    "namespace_identifier",
}
FN_VALUES = {"arrow_function", "function_expression", "function", "generator_function"}
for _ts in ("tsx",):
    FUNCS[_ts], CLASSES[_ts], TYPES[_ts] = FUNCS["typescript"], CLASSES["typescript"], TYPES["typescript"]
CLASSES["typescript"] = CLASSES["typescript"] | {"class"}
TYPES.setdefault("javascript", set())


def language_for(path: str) -> str | None:
    """The tree-sitter language of a file name, or None (line windows)."""
    name = path.rsplit("/", 1)[-1]
    return LANG_BY_EXT.get(name.rsplit(".", 1)[-1].lower()) if "." in name else None


@cache
def parser_for(lang: str) -> Any:
    """A tree-sitter parser from the bundled grammars (tree_sitter is imported here only)."""
    from tree_sitter_language_pack import get_parser

    return get_parser(lang)  # type: ignore[arg-type]
