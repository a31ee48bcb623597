"""Which LoRA adapter answers a request: one whose every source repository the caller may read.

An adapter learned from its repositories' code and can reproduce it, so it is served only to a
caller who may read all of them — by the groups recorded when it was tuned AND by the index now (a
repository since moved to other groups, or removed from the index, closes the adapter to those who
lost it). Anyone else gets the base model. The first eligible adapter in `model.adapters` order wins.
A vendor adapter (an update bundle, `update:NAME`) learned no customer code: it serves the groups the
admin gave it at `update apply --groups` (everyone by default). An adapter without a name (one `tune --out
.moat` wrote before tune refused it) serves nobody: the audit record could not name it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..engines.adapters import LoadedAdapter
from ..retrieve.acl import can_read


def eligible(adapter: LoadedAdapter, caller_groups: Iterable[str], readable_now: set[str]) -> bool:
    groups = frozenset(caller_groups)
    if not adapter.name:
        return False
    if adapter.groups and not adapter.repos:  # a vendor adapter
        return can_read(adapter.groups, groups)
    return bool(adapter.repos) and all(name in readable_now and can_read(recorded, groups) for name, recorded in adapter.repos)


def choose(adapters: Sequence[LoadedAdapter], caller_groups: Iterable[str], readable_now: Iterable[str]) -> LoadedAdapter | None:
    """The adapter for a caller in `caller_groups` who may read `readable_now` in today's index; None: the base."""
    groups, now = frozenset(caller_groups), set(readable_now)
    return next((a for a in adapters if eligible(a, groups, now)), None)
