"""`codemoat serve`: the API server (OpenAI, Ollama, llama.cpp /infill, Tabby)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from .apps import app
from .common import console


@app.command()
def serve(
    *,
    model: Annotated[str | None, typer.Option(help="Model: .gguf, safetensors folder, or sealed .moat (default: the bundled model).")] = None,
    license: Annotated[Path | None, typer.Option(help="License file (.lic) for a sealed model.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on; 0 picks a free one [default: 8080].")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML configuration file.", envvar="CODEMOAT_CONFIG")] = None,
    engine: Annotated[str | None, typer.Option(help="Inference engine: llamacpp, transformers, vllm.")] = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Model name shown by the API.")] = None,
    n_ctx: Annotated[int | None, typer.Option("--n-ctx", help="Context window in tokens.")] = None,
    fim_template: Annotated[str | None, typer.Option("--fim-template", help="FIM template (default: detected).")] = None,
) -> None:
    """Serve a model to editors and API clients until SIGTERM or Ctrl-C."""
    import uvicorn

    from ..accounts import Accounts
    from ..config import load_settings
    from ..db import open_db
    from ..engines.loader import open_model
    from ..paths import bundled_model
    from ..serve.app import create_app

    settings = load_settings(
        config,
        **{
            "model.path": model, "model.license": str(license) if license else None, "server.host": host,
            "server.port": port, "model.engine": engine, "model.id": model_id, "model.n_ctx": n_ctx,
            "model.fim_template": fim_template,
        },
    )
    if not settings.model.path:
        settings.model.path = str(bundled_model())
    log_to_stderr(settings.server.log_level)
    accounts = Accounts(open_db(settings.database_url))
    holder = open_model(settings)
    retriever = _retriever()
    application = create_app(settings, holder=holder, accounts=accounts, retriever=retriever)

    # proto=IPPROTO_TCP so that asyncio sets TCP_NODELAY on accepted connections (with proto 0 it
    # does not, and Nagle + delayed ACKs add ~40 ms to every small response); set on the listener too.
    family = socket.AF_INET6 if ":" in settings.server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((settings.server.host, settings.server.port))
    except OSError as e:
        from ..errors import CodemoatError

        raise CodemoatError(f"cannot listen on {settings.server.host}:{settings.server.port}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    console.print(f"codemoat serving [bold]{holder.model_id}[/bold] on http://{settings.server.host}:{bound}", highlight=False)
    cfg = uvicorn.Config(application, log_level=settings.server.log_level, access_log=False, timeout_graceful_shutdown=10)
    server = uvicorn.Server(cfg)
    # uvicorn drains requests on SIGTERM/SIGINT, then re-raises the signal under the handler it
    # found at start; a quiet handler here makes a graceful stop exit 0, as service managers expect.
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    console.print("codemoat stopped", highlight=False)


def log_to_stderr(level: str) -> None:
    """codemoat's own log lines (model loading, licensing, the trust layer) on stderr, at uvicorn's level
    and in its shape, so that one log stream tells the whole story."""
    import logging

    logger = logging.getLogger("codemoat")
    if not any(getattr(h, "_codemoat", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        handler._codemoat = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    number = logging.getLevelName(level.upper())
    logger.setLevel(number if isinstance(number, int) else logging.DEBUG)  # uvicorn's "trace" → DEBUG


def _retriever():
    import importlib.util

    if importlib.util.find_spec("codemoat.retrieve") is None:
        return None
    from .. import retrieve

    cls = getattr(retrieve, "Retriever", None)
    return cls() if cls is not None else None
