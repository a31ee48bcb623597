"""`codemoat vendor train`: train a tokenizer and a small code model on directories of code, export GGUF + safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .apps import vendor_app
from .common import JsonFlag, console, emit
from .training import Device, Lr, Minutes, check_budget, run_with_progress


@vendor_app.command("train")
def train_command(
    *,
    corpus: Annotated[list[Path], typer.Option("--corpus", help="Directory of code to train on (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="Output GGUF path; safetensors go to <stem>.hf/ beside it.")],
    size: Annotated[str, typer.Option("--size", help="Model size: tiny, small or base (micro for tests).")] = "tiny",
    minutes: Minutes = 45.0,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Train exactly this many steps instead of a time budget (bit-reproducible).")
    ] = None,
    device: Device = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, data order, FIM draws and initialisation.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).")] = None,
    lr: Lr = 1.5e-3,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Sequences per optimiser step (default by size).")
    ] = None,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="BPE vocabulary size (default by size).")] = None,
    ftype: Annotated[str, typer.Option("--ftype", help="GGUF weight type: f16 or f32.")] = "f16",
    name: Annotated[str | None, typer.Option("--name", help="Model name written to the GGUF (default: the output stem).")] = None,
    checkpoint_minutes: Annotated[
        float, typer.Option("--checkpoint-minutes", help="Export the model this often during training.")
    ] = 5.0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out model and its <stem>.hf/ folder (a new run starts over).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a byte-level BPE tokenizer and a llama-architecture model with FIM; export GGUF and safetensors."""
    from ..errors import CodemoatError
    from ..train.trainer import TrainOptions, train

    check_budget(device, minutes, steps)
    if ftype not in ("f16", "f32"):
        raise CodemoatError(f"--ftype must be f16 or f32, got {ftype!r}")
    for root in corpus:  # said before the progress bar starts (it left a "corpus 0:00:00" line above the error)
        if root.exists() and not root.is_dir():
            raise CodemoatError(f"corpus {root} is not a folder: --corpus names a folder of code (repeat it for several)")
        if not root.is_dir():
            raise CodemoatError(f"corpus directory not found: {root}")
    if out.is_dir():  # with --force too: the export at the end, after the whole run, could not write it
        raise CodemoatError(f"{out} is a folder: name the .gguf file to write")
    if out.suffix != ".gguf":  # said by the trainer too, but only after the files beside it were looked for
        raise CodemoatError(f"--out must end in .gguf, got {out}")
    if not out.parent.is_dir():  # as `vendor seal` says it: the trainer made the whole path (`/nonexist/`)
        raise CodemoatError(f"folder {out.parent} does not exist")
    refuse_overwriting_run(out, force)
    opts = TrainOptions(
        corpus=corpus,
        out=out,
        size=size,
        minutes=minutes,
        steps=steps,
        device=device,
        seed=seed,
        threads=threads,
        lr=lr,
        batch_size=batch_size,
        vocab_size=vocab_size,
        ftype=ftype,
        name=name,
        checkpoint_minutes=checkpoint_minutes,
    )
    result = run_with_progress(
        train, opts, quiet=as_json, verb="train", stage_info=_stage_info, step_info=_step_info, other=_checkpoint
    )
    data = {
        "gguf": str(result.gguf),
        "hf_dir": str(result.hf_dir),
        "params": result.params,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "heldout_bpb": result.heldout_bpb,
        "summary": str(result.summary_path),
    }

    def human(d: dict) -> None:
        bpb = f"{d['heldout_bpb']:.3f}" if d["heldout_bpb"] is not None else "n/a"
        console.print(
            f"[green]trained[/green] {d['params']:,} parameters, {d['steps']} steps, {d['tokens']:,} tokens "
            f"in {d['seconds']:.0f} s; held-out bits/byte ≈ {bpb}\n  gguf: {d['gguf']}\n  safetensors: {d['hf_dir']}"
        )

    emit(data, as_json, human)


#: what a run writes beside `X.gguf` (`train.trainer.train`): safetensors, held-out list, log, summary, loss plot
BESIDE = (".hf", ".heldout.txt", ".log.jsonl", ".train.json", ".loss.png")


def run_outputs(out: Path) -> list[Path]:
    """Every path a `vendor train --out OUT` run writes: OUT and the files beside it (`BESIDE`)."""
    return [out] + [out.with_name(out.stem + suffix) for suffix in BESIDE]


def refuse_overwriting_run(out: Path, force: bool) -> None:
    """One line naming every output of an earlier run that is there, unless `force`. Only X.gguf and X.hf/ were
    looked for: X.train.json, X.loss.png, X.log.jsonl and X.heldout.txt beside them were replaced without
    --force (a run does not resume: each is written again from the start)."""
    from ..errors import CodemoatError

    there = [p for p in run_outputs(out) if p.exists() or p.is_symlink()]
    if there and not force:
        names = ", ".join(str(p) if p == there[0] else p.name for p in there)
        verb, them = ("exists", "it") if len(there) == 1 else ("exist", "them")
        raise CodemoatError(f"{names} {verb}: pass --force to replace {them} (a new run starts over)")


def _stage_info(ev: dict) -> str:
    info = {k: v for k, v in ev.items() if k not in ("kind", "stage", "config")}
    return " ".join(f"{k}={v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}" for k, v in info.items())


def _step_info(ev: dict) -> str:
    return f"loss {ev['loss_ema']:.3f}  {ev['tok_per_s']:,.0f} tok/s  lr {ev['lr']:.2e}"


def _checkpoint(progress, ev: dict) -> None:
    if ev["kind"] == "checkpoint" and not progress.disable:
        hl = ev["heldout_loss"]
        progress.console.print(
            f"checkpoint at step {ev['step']}: train loss {ev['train_loss']:.3f}"
            + (f", held-out loss {hl:.3f}" if hl is not None else "")
        )
