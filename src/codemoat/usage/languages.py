"""A completion's language: the client's own word when it is one we know, else the file's extension."""

from __future__ import annotations

from pathlib import PurePosixPath

# extension -> language (the names Tabby and VS Code use as language ids)
EXTENSIONS = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".kt": "kotlin",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hpp": "cpp",
    ".cs": "csharp",
    ".rb": "ruby",
    ".php": "php",
    ".swift": "swift",
    ".scala": "scala",
    ".sh": "shellscript",
    ".bash": "shellscript",
    ".sql": "sql",
    ".lua": "lua",
    ".r": "r",
    ".dart": "dart",
    ".ex": "elixir",
    ".exs": "elixir",
    ".hs": "haskell",
    ".ml": "ocaml",
    ".html": "html",
    ".css": "css",
    ".scss": "scss",
    ".vue": "vue",
    ".svelte": "svelte",
    ".md": "markdown",
    ".json": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".tf": "terraform",
}
KNOWN = frozenset(EXTENSIONS.values())
UNKNOWN = "unknown"


def language_of(word_or_path: object = None) -> str:
    """A client's language id (Tabby's `language`) or a file path, as one of a fixed set (so a
    caller's text never becomes a report's row), or "unknown"."""
    if not isinstance(word_or_path, str) or not word_or_path.strip():
        return UNKNOWN
    word = word_or_path.strip().lower()
    word = {"typescriptreact": "typescript", "javascriptreact": "javascript", "shell": "shellscript"}.get(word, word)
    if word in KNOWN:
        return word
    return EXTENSIONS.get(PurePosixPath(word_or_path.replace("\\", "/")).suffix.lower(), UNKNOWN)
