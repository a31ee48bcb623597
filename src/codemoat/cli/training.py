"""What `vendor train` and `tune` share: their budget and device options, the checks on them, and a
progress bar driven by the trainer's events (`stage`, `step`, and any other kind the command prints)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from .common import console

Minutes = Annotated[float, typer.Option("--minutes", help="Training time budget in minutes.")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]


def check_budget(device: str, minutes: float, steps: int | None) -> None:
    """One-line errors for a device torch cannot name and a time budget that trains nothing."""
    from ..errors import CodemoatError

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CodemoatError(f"--device must be cpu or cuda, got {device!r}")
    if steps is not None and steps < 1:  # a negative count never reached its end: the run trained for ever
        raise CodemoatError(f"--steps must be at least 1, got {steps}")
    if not steps and not 0 < minutes < float("inf"):  # NaN fails this too (it trained for ever)
        raise CodemoatError("--minutes must be positive")


@contextlib.contextmanager
def stage_progress(quiet: bool) -> Iterator[tuple[Any, Any]]:
    """A rich progress bar for long work reported as stages and steps: yields the `Progress` and
    its one task, whose `info` field carries the latest figures."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        yield progress, progress.add_task("preparing", total=1.0, info="")


def run_with_progress(
    work: Callable[[Any, Callable[[dict], None]], Any],
    opts: Any,
    *,
    quiet: bool,
    verb: str,
    stage_info: Callable[[dict], str],
    step_info: Callable[[dict], str],
    other: Callable[[Any, dict], None] | None = None,
) -> Any:
    """`work(opts, on_event)` with a progress bar: a `stage` event names the bar (`stage_info` its
    figures), a `step` event moves it ("<verb> step N", `step_info`); `other(progress, event)` gets the rest."""
    with stage_progress(quiet) as (progress, task):

        def on_event(ev: dict) -> None:
            if ev["kind"] == "stage":
                progress.update(task, description=ev["stage"], info=stage_info(ev))
            elif ev["kind"] == "step":
                progress.update(task, description=f"{verb} step {ev['step']}", completed=ev["progress"], info=step_info(ev))
            elif other is not None:
                other(progress, ev)

        return work(opts, on_event)
