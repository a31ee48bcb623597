"""`codemoat tune`: train a LoRA adapter on indexed repositories, evaluate it, seal it to this machine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .apps import app
from .common import JsonFlag, check_writable, console, emit
from .training import Device, Lr, Minutes, check_budget, run_with_progress


def _forgetting_limit(value: str | float | None) -> float | None:
    """`--max-forgetting`: a fraction from 0 to 1, or `off` for no limit."""
    if value is None or isinstance(value, float):
        return value
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        f = float(value)
    except ValueError:
        f = math.nan
    if not 0.0 <= f <= 1.0:  # NaN fails this too
        raise typer.BadParameter(f"must be a fraction from 0 to 1 (e.g. 0.015) or off, got {value!r}")
    return f


@app.command("tune")
def tune_command(
    *,
    repos: Annotated[str, typer.Option("--repos", help="Indexed repositories to tune on, comma-separated (NAME[,NAME]).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Sealed adapter to write (NAME.moat). NAME, up to the first dot, names the adapter in serving and the "
            "audit log: letters, digits, '_', '@' or '-', starting with a letter or digit.",
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Base GGUF, Hugging Face model folder (what the vllm engine serves) or sealed .moat of either "
            "(default: model.path of the configuration).",
        ),
    ] = None,
    license: Annotated[
        Path | None, typer.Option("--license", help="License of a sealed base (default: model.license of the configuration).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Configuration file (TOML).")] = None,
    minutes: Minutes = 10.0,
    steps: Annotated[int | None, typer.Option("--steps", help="Train exactly this many steps instead of a time budget.")] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 64,
    lr: Lr = 2e-3,
    device: Device = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, the data order and the LoRA initialisation.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens scored before and after.")] = 20_000,
    infill_lines: Annotated[int, typer.Option("--infill-lines", help="Held-out lines completed before and after.")] = 30,
    replay: Annotated[
        float,
        typer.Option(
            "--replay",
            min=0.0,
            max=0.75,
            help="Share of each batch's 4 rows taken from public CPython modules the base knows, against "
            "forgetting (0 to 0.75, rounded to quarters; 0: none).",
        ),
    ] = 0.5,
    max_forgetting: Annotated[
        float | None,
        typer.Option(
            "--max-forgetting",
            parser=_forgetting_limit,
            metavar="FRACTION|off",
            help="Keep only states at most this much worse than the base on unseen CPython modules "
            "(0 to 1, e.g. 0.015 = 1.5 %; off: no limit).",
        ),
    ] = 0.015,
    ema: Annotated[
        float,
        typer.Option(
            "--ema",
            min=0.0,
            max=0.999,
            help="Average the adapter's weights over the run (the decay of an exponential moving average, "
            "0 to 0.999; 0: off): the averaged weights are scored, kept and written.",
        ),
    ] = 0.95,
    kl: Annotated[
        float,
        typer.Option(
            "--kl",
            min=0.0,
            max=10.0,
            help="Weight of the replayed rows' KL divergence from the base's own predictions, against "
            "forgetting (distillation; 0 to 10; 0: off).",
        ),
    ] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune the served model on the named repositories' indexed code; write a sealed LoRA adapter."""
    from ..config import load_settings
    from ..errors import CodemoatError
    from ..tune.trainer import TuneOptions, tune

    check_budget(device, minutes, steps)
    check_writable(out, force)  # said now, not after the run (a killed run resumes from its checkpoint: no --out yet)
    settings = load_settings(config)
    base = model or (Path(p) if (p := settings.model.path) else None)
    if base is None:
        raise CodemoatError("no base model: pass --model PATH.gguf (or a model folder) or set model.path in the configuration")
    lic = license or (Path(p) if (p := settings.model.license) else None)
    _check_out(out, base, lic, config)
    names = [n.strip() for n in repos.split(",") if n.strip()]
    opts = TuneOptions(
        repos=names,
        out=out,
        base=base,
        minutes=minutes,
        steps=steps,
        rank=rank,
        lr=lr,
        device=device,
        seed=seed,
        threads=threads,
        eval_tokens=eval_tokens,
        infill_lines=infill_lines,
        license=lic,
        replay=replay,
        max_forgetting=max_forgetting,
        ema=ema,
        kl=kl,
    )
    result = run_with_progress(tune, opts, quiet=as_json, verb="tune", stage_info=_stage_info, step_info=_step_info)
    data = {"adapter": str(result.out), **result.meta}

    def human(d: dict) -> None:
        e = d["eval"]

        def row(what: str) -> str:
            b, a = e["bpb_base"][what], e["bpb_adapter"][what]
            if b is None or a is None:
                return f"  {what:<9} n/a"
            return f"  {what:<9} {b:.3f} → {a:.3f} bits/byte ({(a - b) / b * 100:+.1f} %)"

        t = d["train"]
        console.print(
            f"[green]tuned[/green] {d['name']} on {', '.join(r['name'] for r in d['repos'])}: "
            f"{t['steps']} steps, {t['tokens']:,} tokens in {t['seconds']:.0f} s ({t['tok_per_s']:,.0f} tok/s)"
        )
        if t.get("resumed_from_step"):
            console.print(f"  (resumed from the checkpoint of step {t['resumed_from_step']})")
        if t.get("secrets_redacted"):
            console.print(f"  {t['secrets_redacted']:,} secrets in the code replaced by [REDACTED:<kind>]: not trained on")
        console.print("held-out bits/byte, base → base + adapter:\n" + row("tuned") + "\n" + row("unrelated"))
        ib, ia = e.get("infill_base"), e.get("infill_adapter")
        if ia and not ia["n"]:
            console.print("  infill    n/a (no line of the held-out files to complete)")
        elif ib and ia:
            console.print(
                f"  infill    exact match {ib['exact']:.0%} → {ia['exact']:.0%}, edit similarity "
                f"{ib['edit_sim']:.2f} → {ia['edit_sim']:.2f} ({ia['n']} held-out lines)"
            )
        else:
            console.print("  infill    n/a (the model has no <|fim_prefix|>/<|fim_suffix|>/<|fim_middle|> tokens)")
        console.print(
            f"  sealed to this machine: {d['adapter']} ({d['size']['sealed']:,} bytes); "
            f"served to groups that may read {' and '.join(r['name'] for r in d['repos'])}"
        )

    emit(data, as_json, human)


def _check_out(out: Path, base: Path, lic: Path | None, config: Path | None) -> None:
    """Before the run, not after it: --out must not be one of the run's inputs (`--out m.gguf --force` replaced
    the base model by the adapter; likewise its license, the configuration or the index), and the sealer's
    temporary file beside it (`.NAME.<32 hex>.part`, then renamed) must be possible there (a name too long
    for that, or a folder not writable, failed once the training was done)."""
    import os

    from ..errors import CodemoatError
    from ..index.store import default_path
    from ..vault.samefile import refuse_input_as_output
    from ..vault.seal_model import model_inputs

    refuse_input_as_output(out, model_inputs(Path(base).expanduser()), "base model")
    for what, path in (("license", lic), ("configuration", config), ("code index", default_path())):
        if path is not None:
            refuse_input_as_output(out, [Path(path).expanduser()], what)
    probe = out.with_name(f".{out.name}.{'0' * 32}.part")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        return  # one left by a killed probe: the name fits and the folder was writable
    except OSError as e:
        raise CodemoatError(f"cannot write the adapter beside {out}: {e.strerror or e}") from None
    os.unlink(probe)


def _stage_info(ev: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("kind", "stage"))


def _step_info(ev: dict) -> str:
    hb = ev["heldout_bpb"]
    if hb is None:
        return f"loss {ev['loss']:.3f}"
    return f"loss {ev['loss']:.3f}  held-out {hb:.3f} bits/byte  {ev['tok_per_s']:,.0f} tok/s"
