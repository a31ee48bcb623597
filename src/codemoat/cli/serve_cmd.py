"""`codemoat serve`: the API server (OpenAI, Ollama, llama.cpp /infill, Tabby)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .apps import app
from .common import ConfigOpt, console


@app.command()
def serve(
    *,
    model: Annotated[
        str | None, typer.Option(help="Model: .gguf, safetensors folder, or sealed .moat (default: the bundled model).")
    ] = None,
    license: Annotated[Path | None, typer.Option(help="License file (.lic) for a sealed model.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on; 0 picks a free one [default: 8080].")] = None,
    config: ConfigOpt = None,
    engine: Annotated[str | None, typer.Option(help="Inference engine: llamacpp, transformers, vllm.")] = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Model name shown by the API.")] = None,
    n_ctx: Annotated[int | None, typer.Option("--n-ctx", help="Context window in tokens.")] = None,
    fim_template: Annotated[str | None, typer.Option("--fim-template", help="FIM template (default: detected).")] = None,
    vault: Annotated[str | None, typer.Option(help="unix:PATH of a `codemoat vaultd`; --model is then the model id.")] = None,
) -> None:
    """Serve a model to editors and API clients until SIGTERM or Ctrl-C."""
    from rich.markup import escape

    from ..accounts import Accounts
    from ..config import load_settings
    from ..config.serving import http_url
    from ..db import open_db
    from ..engines.loader import open_model
    from ..paths import bundled_model
    from ..retrieve import Retriever
    from ..serve.app import create_app
    from ..serve.run import listen, run

    settings = load_settings(
        config,
        **{
            "model.path": None if vault else model,
            "vault.socket": vault,
            "model.license": str(license) if license else None,
            "server.host": host,
            "server.port": port,
            "model.engine": engine,
            "model.id": (model_id or model) if vault else model_id,
            "model.n_ctx": n_ctx,
            "model.fim_template": fim_template,
        },
    )
    if not settings.model.path and not settings.vault.socket:
        settings.model.path = str(bundled_model())
    # the port first: a port already taken is said in one line at once, not after the model has loaded
    # (minutes for a large one, or a license lease taken); the bound socket is handed to uvicorn
    sock = listen(settings.server.host, settings.server.port)
    try:
        log_to_stderr(settings.server.log_level)
        accounts = Accounts(open_db(settings.database_url))
        accounts.keep_fresh()  # tokens in use stay verified through an editor's pause (accounts.fresh)
        holder = open_model(settings)
        retriever = Retriever()
        application = create_app(settings, holder=holder, accounts=accounts, retriever=retriever)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    url = escape(http_url(settings.server.host, bound))  # "[fe80::1]" is no rich markup tag
    console.print(f"codemoat serving [bold]{escape(holder.model_id)}[/bold] on {url}", highlight=False)
    run(application, sock, settings.server.log_level, settings.server.trusted_proxies, settings.server.read_timeout_s)
    console.print("codemoat stopped", highlight=False)
    if holder.exit_status:  # stopped by its inline engine's stall (model.exit_on_hang): a failure, to be restarted
        raise typer.Exit(holder.exit_status)


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
