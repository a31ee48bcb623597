"""`codemoat trace SUSPECT` and `codemoat watermark detect FILE…`: which customer leaked, or wrote this."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .apps import app, watermark_app
from .common import JsonFlag, VendorDir, console, emit


def _p(p: float) -> str:
    return "<1e-300" if p == 0 else f"{p:.2e}"


@app.command("trace")
def trace_cmd(
    suspect: Annotated[
        Path, typer.Argument(help="The suspect model: a GGUF of any quantisation, a .safetensors file or a folder holding one.")
    ],
    *,
    vendor: VendorDir,
    original: Annotated[
        Path | None,
        typer.Option(help="The unfingerprinted original (default: the one recorded when sealing that matches the suspect)."),
    ] = None,
    top: Annotated[int, typer.Option(min=0, help="Customers to show, best first (0: all; --json always lists all).")] = 10,
    as_json: JsonFlag = False,
) -> None:
    """Rank every customer by the evidence that SUSPECT is their fingerprinted copy."""
    from ..trace import vendor_io
    from ..trace.trace_stream import trace_files

    suspect_w = vendor_io.weights_path(suspect)
    with vendor_io.open_vendor(vendor) as v:
        secrets = vendor_io.fingerprint_secrets(v)
        orig = (
            vendor_io.weights_path(original) if original else vendor_io.pick_original(suspect_w, vendor_io.recorded_originals(v))
        )
    with console.status(f"scoring {len(secrets)} customers…", spinner="dots") if not as_json else _null():
        result = trace_files(suspect_w, orig, secrets)
    data = {"suspect": str(suspect), "original": str(orig), **result.as_dict()}

    def human(d: dict) -> None:
        what = (
            f"{d['positions']:,} changed weights in {d['tensors']} tensors"
            if d["tensors"]
            else "identical to the original in every fingerprinted tensor"
        )
        t = Table(title=f"{Path(d['suspect']).name} vs {Path(d['original']).name}: {what}")
        for col in ("customer", "z", "p (corrected)", "named"):
            t.add_column(col, justify="right" if col != "customer" else "left")
        for s in d["scores"][:top] if top > 0 else d["scores"]:
            t.add_row(s["customer"], f"{s['z']:.2f}", _p(s["p_adj"]), "yes" if s["named"] else "")
        console.print(t)
        if 0 < top < len(d["scores"]):
            console.print(f"({len(d['scores']) - top} more customers, all with lower scores: --top 0 lists them)")
        if d["realigned"]:
            console.print("re-aligned permuted units: " + ", ".join(f"{k} ({n})" for k, n in d["realigned"].items()))
        if d["named"]:
            console.print(
                f"[bold red]verdict:[/bold red] carries the fingerprint of {', '.join(d['named'])} "
                f"(p < {d['threshold']:g} after correcting for {len(d['scores'])} customers)"
            )
        else:
            console.print(
                f"no verdict: no customer reaches p < {d['threshold']:g} after correcting for {len(d['scores'])} customers"
            )

    emit(data, as_json, human)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@watermark_app.command("detect")
def watermark_detect(
    files: Annotated[list[Path], typer.Argument(help="Text files to test (generated code, or a suspect model's outputs).")],
    *,
    vendor: VendorDir,
    customer: Annotated[
        str | None, typer.Option(help="Test only this customer's key (default: every customer, corrected for their number).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="GGUF model for tokens and entropies (default: the GGUF original recorded when sealing).")
    ] = None,
    entropy: Annotated[
        bool,
        typer.Option(
            "--entropy/--no-entropy",
            help="Score only where the model had freedom (SWEET; one forward pass per file), or every token.",
        ),
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Print the watermark z-score and p-value of each FILE for each customer."""
    from ..errors import CodemoatError
    from ..paths import read_regular
    from ..trace import vendor_io
    from ..trace.watermark import THRESHOLD, GreenList, LlamaScorer, aggregate, detect_ids
    from ..vault.container import MAGIC

    texts = []  # read every file first: a wrong path fails at once, before the model loads
    for f in files:
        if not f.exists():
            raise CodemoatError(f"cannot read {f}: no such file")
        raw = read_regular(f, "text file", 64 << 20)  # a FIFO is refused
        if raw[:4] == b"GGUF" or raw[:8] == MAGIC or raw[8:10] == b'{"':  # a model here was scored as text for minutes
            raise CodemoatError(f"{f} is a model file, not text (a model's weights are what `codemoat trace` tests)")
        texts.append(raw.decode("utf-8", "replace"))
    with vendor_io.open_vendor(vendor) as v:
        keys = vendor_io.watermark_secrets(v, customer)
        if model is None:
            ggufs = [p for p in vendor_io.recorded_originals(v) if p.suffix == ".gguf" and p.is_file()]
            if not ggufs:
                raise CodemoatError("no GGUF original recorded for this vendor: pass --model PATH (its tokenizer is needed)")
            model = ggufs[0]
    if not model.is_file():
        raise CodemoatError(f"model not found: {model}")
    scorer = LlamaScorer(str(model), n_ctx=1024, vocab_only=not entropy)
    greens = {k: GreenList(s) for k, s in keys.items()}
    out, runs, ents = [], [], []
    for f, text in zip(files, texts):
        ids = scorer.tokenize(text)
        ent = scorer.entropies(ids) if entropy and len(ids) > 1 else None
        runs.append(ids)
        ents.append(ent)
        scores = detect_ids(ids, keys, ent, greens=greens)
        out.append(
            {"file": str(f), "detected": [s.customer for s in scores if s.detected], "scores": [s.__dict__ for s in scores]}
        )
    # the unit of evidence: each file alone, and all files together for each key (Stouffer)
    together = aggregate(runs, keys, ents, greens=greens)
    data = {
        "threshold": THRESHOLD,
        "customers": len(keys),
        "entropy_gated": entropy,
        "files": out,
        "aggregate": {
            "files": len(files),
            "detected": [s.customer for s in together if s.detected],
            "scores": [s.__dict__ for s in together],
        },
    }

    def human(d: dict) -> None:
        t = Table(title=f"watermark, {d['customers']} customer key(s), detection at corrected p < {d['threshold']:g}")
        for col in ("file", "best customer", "z", "p (corrected)", "tokens", "watermarked"):
            t.add_column(col)
        for r in d["files"]:
            s = r["scores"][0]
            t.add_row(
                Path(r["file"]).name,
                s["customer"],
                f"{s['z']:.2f}",
                _p(s["p_adj"]),
                str(s["scored_tokens"]),
                ", ".join(r["detected"]) or "no",
            )
        a = d["aggregate"]
        if a["files"] > 1:
            s = a["scores"][0]
            t.add_row(
                f"all {a['files']} files (Stouffer)",
                s["customer"],
                f"{s['z']:.2f}",
                _p(s["p_adj"]),
                str(s["scored_tokens"]),
                ", ".join(a["detected"]) or "no",
            )
        console.print(t)

    emit(data, as_json, human)
