"""The Repositories page's languages: each index's files counted by language, from their extensions
(the same map usage uses), grouped in SQL over the index's `files` table."""

from __future__ import annotations

from ..usage.languages import UNKNOWN, language_of

# the text after a path's last "." ("/" when there is none, and a "/" after it: not an extension)
_EXT = "CASE WHEN instr(path, '.') > 0 THEN replace(path, rtrim(path, replace(path, '.', '')), '') ELSE '/' END"


def languages(index) -> dict[int, list[tuple[str, int]]]:
    """{repo id: [(language, files)], most files first}; files of no known language are left out."""
    out: dict[int, dict[str, int]] = {}
    for rid, ext, n in index.db.execute(f"SELECT repo_id, lower({_EXT}) AS ext, count(*) FROM files GROUP BY repo_id, ext"):
        lang = language_of("x." + ext) if "/" not in ext else UNKNOWN
        if lang != UNKNOWN:
            counts = out.setdefault(rid, {})
            counts[lang] = counts.get(lang, 0) + n
    return {rid: sorted(c.items(), key=lambda x: (-x[1], x[0])) for rid, c in out.items()}
