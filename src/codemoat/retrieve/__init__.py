"""Retrieval over the code index: cross-file context for completions and chat, filtered by groups.

from codemoat.retrieve import Retriever, Snippet
r = Retriever()                                   # $CODEMOAT_HOME/index.db
repo = r.repo_for(git_url, filepath)              # which indexed repository a file belongs to
r.snippets_for_completion(groups=frozenset({"dev"}), repo=repo, path="a/b.py", prefix=..., suffix=...)
"""

from .acl import ADMIN, EVERYONE, can_read
from .retriever import Retriever, Snippet

__all__ = ["ADMIN", "EVERYONE", "Retriever", "Snippet", "can_read"]
