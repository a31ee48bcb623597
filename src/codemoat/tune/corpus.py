"""Training text from the code index: only the named repositories, exactly the indexed bytes.

Files are listed by the index (so `.gitignore`, include/exclude rules and the root confinement of
`index add` apply) and read from the repository's root; a file whose content no longer matches its
indexed hash is skipped (it was never reviewed as indexed), as is anything that resolves outside
the root. The held-out split is by file (`train.corpus.split`), so no file is in both. Data tables (a file
whose characters are under a fifth letters: generated Unicode width tables, palettes, numeric
constants) are not trained on: they are much of some repositories' bytes and teach a model nothing
about the code (the data-file filter of StarCoder's training data, Li et al. 2023, §3, which drops
files under a quarter alphabetic); they stay in the held-out evaluation. Secrets in the code (keys,
tokens, passwords: `audit.redact`, the detectors that screen prompts) are replaced by `[REDACTED:<kind>]`
before anything is trained or scored on it: an adapter that learned a key would complete it for anyone it
serves, long after the key left the repository.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..audit.redact import redact
from ..errors import CodemoatError
from ..index.reader import RepoReader
from ..index.store import RepoInfo, SqliteIndex
from ..paths import home
from ..train.corpus import SourceFile


@dataclass(frozen=True)
class TuneCorpus:
    repos: list[RepoInfo]
    files: list[SourceFile]
    skipped: int  # changed since indexing, unreadable, outside the root or inside another repository's
    secrets: int = 0  # secrets replaced by `[REDACTED:<kind>]` in `files` (never trained on)


#: a file with a smaller share of letters is a data table, not code to learn from
MIN_LETTERS = 0.2


def is_data_table(text: str) -> bool:
    """Mostly digits, punctuation and space: a table of numbers rather than code."""
    return sum(ch.isalpha() for ch in text) < MIN_LETTERS * len(text)


def load_corpus(names: list[str], index_path: Path | None = None) -> TuneCorpus:
    """The indexed files of `names` (each must be indexed), as `SourceFile`s named `<repo>/<path>`."""
    if not names:
        raise CodemoatError("--repos needs at least one indexed repository")
    store = SqliteIndex(index_path)
    try:
        repos = [store.repo(n) for n in dict.fromkeys(names)]
        indexed = store.repos()
        files: list[SourceFile] = []
        skipped = secrets = 0
        for r in repos:
            # read as `index update` reads: inside the root only, regular files up to its size limit
            # (a file swapped for a FIFO or a device since indexing is skipped, not waited on), never from
            # another indexed repository inside this one (its code is its own groups': rows an index kept from
            # before that one was added are not this repository's) nor from codemoat's data folder
            others = [Path(o.root) for o in indexed if o.id != r.id]
            with RepoReader(Path(r.root).resolve(), others, [home().resolve()]) as reader:
                hashes = sorted(store.file_hashes(r.id).items())
                got = [(rel, digest, reader.read(rel)) for rel, (_fid, digest) in hashes]
            for rel, digest, raw in got:
                if not isinstance(raw, bytes) or hashlib.blake2b(raw, digest_size=16).hexdigest() != digest:
                    skipped += 1
                    continue
                text, found = redact(raw.decode("utf-8", "replace"))
                secrets += len(found)
                if text.strip():
                    files.append(SourceFile(f"{r.name}/{rel}", text))
    finally:
        store.close()
    if not files:
        raise CodemoatError(f"no indexed code to tune on in {', '.join(names)} (run `codemoat index update`)")
    return TuneCorpus(repos, files, skipped, secrets)
