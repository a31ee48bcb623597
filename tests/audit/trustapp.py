"""The real app for the trust-layer tests: `create_app` over a real llama.cpp engine on the tiny
random model, with real accounts and the real audit log. Nothing fills `request.state.usage` by
hand: the routes and the service do.

`Paced` and `Broken` wrap the real engine to put time (a generation stuck in a queue) or a failure
(an engine that falls over mid-stream) where a test needs one; everything else is the engine's own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.db import open_db
from codemoat.serve.app import create_app
from kept_holder import KeptHolder

GREEDY = {"model": "tiny", "temperature": 0}  # a request's fields for repeatable answers
SCOPES = {"alice": ("complete", "chat"), "bob": ("complete", "chat"), "root": ("admin",), "scraper": ("metrics",)}


def tiny_engine(path: Path):
    from codemoat.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine.from_path(path, model_id="tiny", n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def tiny_llm(random_gguf):
    """That engine for a test module, closed after it; a module takes it as its `llm` with `llm = tiny_llm`."""
    e = tiny_engine(random_gguf)
    yield e
    e.close()


@pytest.fixture
def fresh_db():
    """The home's database through an engine of the test's own, disposed after; a module takes it as `db = fresh_db`."""
    eng = open_db()
    yield eng
    eng.dispose()


class Paced:
    """The real engine, with `pause` seconds before each chunk it streams."""

    def __init__(self, engine, pause: float):
        self._engine, self.pause = engine, pause

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def stream(self, prompt, params):
        async for ch in self._engine.stream(prompt, params):
            await asyncio.sleep(self.pause)
            yield ch


class Broken(Paced):
    """The real engine, failing after its first chunk."""

    def __init__(self, engine):
        super().__init__(engine, 0)

    async def stream(self, prompt, params):
        async for ch in self._engine.stream(prompt, params):
            yield ch
            raise RuntimeError("engine fell over")


def make_app(settings: Settings, accounts: Accounts, engine) -> FastAPI:
    holder = KeptHolder("tiny")
    holder.set(engine)
    return create_app(settings, holder=holder, accounts=accounts)


def make_tokens(accounts: Accounts) -> dict[str, dict[str, str]]:
    out = {}
    for name, scopes in SCOPES.items():
        _, secret = accounts.create_token(name, user=name, scopes=scopes)
        out[name] = {"Authorization": f"Bearer {secret}"}
    return out


def records(db, kind: str | None = "request") -> list[dict]:
    from codemoat.audit.log import AuditLog

    return list(AuditLog(db).records(kind=kind))


def db_bytes(home: Path) -> bytes:
    """Every byte of the customer database as it lies on disk (WAL included)."""
    return b"".join(p.read_bytes() for p in home.glob("codemoat.db*"))
