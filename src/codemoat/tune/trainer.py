"""`codemoat tune`: a LoRA adapter trained on indexed repositories, evaluated honestly, sealed here.

Data: the named repositories' indexed files, split by file into train and held-out (never a file in
both), rendered into FIM and next-token samples by `vendor train`'s own code (`train.data`).
Optimiser: AdamW over the LoRA weights only, linear warm-up then cosine decay over the wall-clock
budget (or over `steps` when given, which makes a run reproducible). Against forgetting, a share
of each batch (`replay`) is public code the base already knows: CPython modules that no forgetting
check scores (`evaluate.replay_files`: for the bundled model, its own training code), and with `kl`
the tuned model's predictions on those rows are also pulled towards the base's (distillation). A few training files are set aside for
validation (never trained on, and not the evaluation's held-out files); the adapter written is the
one with the lowest validation bits/byte seen, the untuned start included (a cheap early stop within
the budget: a run that only made things worse writes an adapter that changes nothing), among the
states that made a third set of CPython modules (`evaluate.FORGETTING_VALIDATION_MODULES`) at most
`max_forgetting` worse than the base: forgetting-aware selection. With `ema`, the states scored, kept
and written are an exponential moving average of the adapter's weights (Polyak averaging, as in
Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"): it averages out the optimiser's step
noise, which on the bundled model costs unrelated code more than it buys on the tuned code. Data tables (`corpus.is_data_table`)
are neither trained on nor validated on. Evaluation, before and after:
bits per byte on every held-out file of the tuned repositories and on unrelated code (CPython
modules the bundled model never trained on) — the second shows what the adapter made the model forget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from .sets import data_options, eval_sets, replay_rows, validation_split


@dataclass
class TuneOptions:
    repos: list[str]
    out: Path
    base: Path
    minutes: float = 10.0
    steps: int | None = None
    rank: int = 64  # the recipe measured on the bundled model (bench/results/tune.md, session 10): rank, lr, ema, kl
    alpha: float | None = None
    lr: float = 2e-3
    batch_size: int = 4
    n_ctx: int = 512
    device: str = "cpu"
    seed: int = 0
    heldout_fraction: float = 0.1
    eval_tokens: int = 20_000  # held-out tokens scored, shared out over every held-out file (and over the CPython modules)
    old_eval_tokens: int | None = None  # also the figures of sessions up to 8 on this many tokens (None: not scored)
    infill_lines: int = 30  # held-out lines for the single-line infill score
    threads: int | None = None
    index_path: Path | None = None
    name: str | None = None
    license: Path | None = None  # for a sealed base (.moat)
    checkpoint_steps: int | None = None  # checkpoint every N steps (default: every checkpoint.EVERY_S seconds)
    replay: float = 0.5  # share of each batch's rows from public code the base knows (0: none)
    val_fraction: float = 0.05  # training files set aside to pick the best adapter seen
    eval_every: int = 20  # steps between validation scores
    max_forgetting: float | None = 0.015  # kept state: at most this much worse on unseen public code (None: any)
    lora_dropout: float = 0.0
    weight_decay: float = 0.0
    ema: float = 0.95  # decay of a moving average of the adapter's weights, scored and kept instead of them (0: off)
    kl: float = 1.0  # weight of the replay rows' KL divergence from the base's own predictions (0: off)


@dataclass
class TuneResult:
    out: Path
    meta: dict[str, Any] = field(default_factory=dict)


def _lr(opts: TuneOptions, step: int, progress: float, warmup: int = 4) -> float:
    if step < warmup:
        return opts.lr * (step + 1) / warmup
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_options(opts: TuneOptions) -> None:
    """One-line errors naming the option, before anything loads, for options that would train for ever
    (a negative `steps` or a NaN `minutes` never reaches the end of its budget) or fail inside the run
    in Python's words (a negative `threads`, `lr` or `infill_lines`, a `seed` past 64 bits)."""
    if opts.rank < 1 or opts.rank > 256:
        raise CodemoatError(f"--rank must be between 1 and 256, got {opts.rank}")
    if not 0.0 <= opts.ema < 1.0:  # NaN fails this too
        raise CodemoatError(f"--ema must be from 0 to below 1, got {opts.ema}")
    if not 0.0 <= opts.kl <= 10.0:  # NaN fails this too
        raise CodemoatError(f"--kl must be from 0 to 10, got {opts.kl}")
    if opts.steps is not None and opts.steps < 1:
        raise CodemoatError(f"--steps must be at least 1, got {opts.steps}")
    if not opts.steps and not 0.0 < opts.minutes < math.inf:  # NaN fails this too
        raise CodemoatError(f"--minutes must be positive, got {opts.minutes}")
    if not 0.0 < opts.lr < math.inf:  # torch's AdamW refused a negative or NaN rate in its own words
        raise CodemoatError(f"--lr must be a positive number, got {opts.lr}")
    if opts.threads is not None and opts.threads < 1:
        raise CodemoatError(f"--threads must be at least 1, got {opts.threads}")
    if opts.eval_tokens < 1 or opts.infill_lines < 0:
        raise CodemoatError(
            f"--eval-tokens must be at least 1 and --infill-lines at least 0, got {opts.eval_tokens} and {opts.infill_lines}"
        )
    if not 0 <= opts.seed < 2**63:
        raise CodemoatError(f"--seed must be from 0 to 2**63 - 1, got {opts.seed}")
    adapter_name(opts)


def adapter_name(opts: TuneOptions) -> str:
    """The adapter's name: `name`, else --out's file name up to its first dot (`pay.moat`: pay). It is what
    `model.adapters` serving and every audit record name the adapter by, so it must be a name (`.moat`
    gave "", which served no one and no audit record could name; a control character went into them)."""
    from ..names import RULE, valid_name

    name = opts.name if opts.name is not None else Path(opts.out).name.split(".")[0]
    if not valid_name(name):
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise CodemoatError(f"adapter name {shown!r} (from --out {Path(opts.out).name[:100]!r}) is not a name: {RULE}")
    return name


def tune(opts: TuneOptions, on_event: Callable[[dict], None] | None = None) -> TuneResult:
    check_options(opts)
    from . import checkpoint

    with checkpoint.running(opts.out):  # one run at a time onto one --out
        return _run(opts, on_event)


def _run(opts: TuneOptions, on_event: Callable[[dict], None] | None) -> TuneResult:
    import os

    # before torch imports tqdm (read then): transformers' GGUF reader drew a bar on stderr, under --json too
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from ..train.corpus import split
    from ..train.data import epoch_rows
    from . import checkpoint, infill
    from .base import load_base
    from .corpus import is_data_table, load_corpus
    from .evaluate import bits_per_byte, forgetting_validation_files, spread_windows
    from .lora import gguf_bytes, safetensors_bytes, wrap
    from ..engines.adapters import Adapter, seal_adapter

    emit = on_event or (lambda ev: None)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    emit({"kind": "stage", "stage": "reading the index"})
    corpus = load_corpus(opts.repos, opts.index_path)
    train_files, held = split(corpus.files, opts.heldout_fraction, opts.seed)
    if not held:  # a tiny repository: hold out its last file rather than evaluate on nothing
        if len(train_files) < 2:
            raise CodemoatError("too little code to tune on: need at least two indexed files")
        held = [train_files.pop()]
    train_files, val = validation_split(train_files, opts)
    tables = [f for f in train_files + val if is_data_table(f.text)]
    if len(tables) < len(train_files):  # not trained on, nor used to choose the adapter kept
        train_files, val = ([f for f in fs if f not in tables] for fs in (train_files, val))
    else:
        tables = []
    emit({"kind": "stage", "stage": "loading the base model", "files": len(train_files), "heldout": len(held)})
    base = load_base(opts.base, n_ctx=opts.n_ctx, device=opts.device, license=opts.license)
    tok, n_ctx = base.tokenizer, base.n_ctx
    scored = eval_sets(held, tok, n_ctx, opts)
    lines = infill.cases(held, opts.infill_lines, opts.seed)
    ck_path = checkpoint.path_for(checkpoint.key(opts, base.sha256, corpus))
    ck = checkpoint.load(ck_path)
    if ck is None:
        emit({"kind": "stage", "stage": "evaluating the base"})
        before = _evaluate(base.model, scored, opts.device)
        before["infill"] = infill.scores(base.model, tok, lines, n_ctx, opts.device)
    else:
        before = ck["state"]["before"]

    alpha = opts.alpha if opts.alpha is not None else 2.0 * opts.rank
    model = wrap(base.model, opts.rank, alpha, dropout=opts.lora_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay)
    avg = [p.detach().clone() for p in params] if opts.ema else None  # the averaged weights (Polyak averaging)
    dopts = data_options(tok, base.eos, opts.repos[0])
    try:
        rows = epoch_rows(train_files, tok, n_ctx, dopts, opts.seed, 0)
    except ValueError:  # fewer tokens than one sequence
        raise CodemoatError(f"too little code to tune on in {', '.join(opts.repos)}: under {n_ctx} tokens") from None
    val_rows = spread_windows(val, tok, n_ctx, min(opts.eval_tokens, 8 * n_ctx))
    forget_rows = spread_windows(forgetting_validation_files(), tok, n_ctx, min(opts.eval_tokens, 8 * n_ctx))

    def score() -> tuple[float | None, float | None]:
        """(validation bits/byte, bits/byte on the forgetting-validation modules or None when not watched)."""
        watch = opts.max_forgetting is not None
        return bits_per_byte(model, *val_rows, device=opts.device), (
            bits_per_byte(model, *forget_rows, device=opts.device) if watch else None
        )

    def score_and_keep(best: dict | None, step: int) -> tuple[dict | None, float | None]:
        """Score the state (the averaged weights, with `ema`) and keep it when it is the best so far."""
        with _weights(params, avg):
            val, forget = score()
            return _keep_best(model, best, val, step, forget, forget_limit), val

    n_rep = min(opts.batch_size - 1, round(opts.batch_size * opts.replay)) if opts.replay > 0 else 0
    replay = replay_rows(tok, base.eos, n_ctx, opts, n_rep) if n_rep else None
    if replay is None or len(replay) < n_rep:
        n_rep = 0
    take = opts.batch_size - n_rep
    step = tokens = epoch = at = 0
    ema = heldout_loss = best = forget0 = None
    spent = 0.0  # training seconds of the runs this one resumes
    if ck is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, ck["lora"])
        optim.load_state_dict(ck["optim"])
        st = ck["state"]
        step, tokens, epoch, at, ema, heldout_loss, spent = (
            st[k] for k in ("step", "tokens", "epoch", "at", "ema", "heldout", "spent")
        )
        best, forget0 = st.get("best"), st.get("forget0")
        if avg is not None and st.get("avg") is not None:
            avg = st["avg"]
        rows = epoch_rows(train_files, tok, n_ctx, dopts, opts.seed, epoch)
        emit({"kind": "stage", "stage": f"resuming from step {step}", "checkpoint": str(ck_path)})
    if ck is None:  # step 0: the base itself (a zero LoRA), so the adapter kept never scores worse than no adapter
        val0, forget0 = score()
        best = _keep_best(model, None, val0, 0, forget0)
    forget_limit = forget0 * (1 + opts.max_forgetting) if forget0 is not None and opts.max_forgetting is not None else None
    model.train()
    t0 = saved_at = time.monotonic()
    budget = opts.minutes * 60
    while True:
        progress = step / opts.steps if opts.steps else (spent + time.monotonic() - t0) / budget
        if progress >= 1.0:
            break
        if at + take > len(rows):
            epoch += 1
            rows, at = epoch_rows(train_files, tok, n_ctx, dopts, opts.seed, epoch), 0
        batch = rows[at : at + take]
        if n_rep:  # the replay rows in a fixed rotation (a function of the step: a resumed run takes the same)
            j = (step * n_rep) % (len(replay) - n_rep + 1)
            batch = torch.cat([batch, replay[j : j + n_rep]])
        batch = batch.to(opts.device)
        at += take
        for g in optim.param_groups:
            g["lr"] = _lr(opts, step, progress)
        logits = model(input_ids=batch[:, :-1], labels=None).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        if opts.kl and n_rep:
            loss = loss + opts.kl * n_rep / len(batch) * _kl_from_base(model, logits[take:], batch[take:, :-1])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        if avg is not None:
            with torch.no_grad():
                for a, p in zip(avg, params):
                    a.lerp_(p, 1.0 - opts.ema)
        tokens += batch[:, 1:].numel()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % opts.eval_every == 0 or step == 1:
            best, heldout_loss = score_and_keep(best, step)
        elapsed = spent + time.monotonic() - t0
        if (step % opts.checkpoint_steps == 0) if opts.checkpoint_steps else time.monotonic() - saved_at >= checkpoint.EVERY_S:
            from peft import get_peft_model_state_dict

            state = {"step": step, "tokens": tokens, "epoch": epoch, "at": at, "ema": ema, "heldout": heldout_loss, "best": best}
            state["forget0"], state["avg"] = forget0, avg
            checkpoint.save(
                ck_path, get_peft_model_state_dict(model), optim.state_dict(), {**state, "spent": elapsed, "before": before}
            )
            saved_at = time.monotonic()
        emit(
            {
                "kind": "step",
                "step": step,
                "loss": ema,
                "heldout_bpb": heldout_loss,
                "progress": min(1.0, step / opts.steps if opts.steps else elapsed / budget),
                "tok_per_s": tokens / max(elapsed, 1e-9),
            }
        )
    seconds = spent + time.monotonic() - t0
    if avg is not None:  # the run's result is the averaged weights
        _copy(params, avg)
    best, _ = score_and_keep(best, step)
    if best is not None and best["step"] != step:  # an earlier state scored better on the validation files
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, best["lora"])
    emit({"kind": "stage", "stage": "evaluating the adapter"})
    after = _evaluate(model, scored, opts.device)
    after["infill"] = infill.scores(model, tok, lines, n_ctx, opts.device)
    name = adapter_name(opts)
    meta = {
        "name": name,
        "kind": "codemoat-adapter",
        "version": 1,
        "created": int(time.time()),
        "base": {"name": base.name, "sha256": base.sha256, "sealed": base.sealed, "hf_sha256": base.hf_sha256},
        "repos": [{"name": r.name, "groups": list(r.groups)} for r in corpus.repos],
        "lora": {"rank": opts.rank, "alpha": alpha, "targets": sorted(model.peft_config["default"].target_modules)},
        "train": {
            "files": len(train_files),
            "heldout_files": [f.path for f in held],
            "skipped": corpus.skipped,
            "secrets_redacted": corpus.secrets,  # replaced by [REDACTED:<kind>] before training (tune.corpus)
            "data_tables": len(tables),  # files not trained on (tune.corpus.is_data_table)
            "steps": step,
            "tokens": tokens,
            "seconds": round(seconds, 1),
            "tok_per_s": round(tokens / max(seconds, 1e-9), 1),
            "loss": ema,
            "seed": opts.seed,
            "resumed_from_step": ck["state"]["step"] if ck is not None else None,
            "replay": n_rep / opts.batch_size,
            "validation_files": len(val),
            "kept_step": best["step"] if best is not None else step,
            "validation_bpb": best["bpb"] if best is not None else None,
            "max_forgetting": opts.max_forgetting,
            "ema": opts.ema,
            "kl": opts.kl,
            "forgetting_validation_bpb": [forget0, best.get("forget") if best is not None else None],  # base, kept
        },
        "eval": {
            "bpb_base": {k: v for k, v in before.items() if k != "infill"},
            "bpb_adapter": {k: v for k, v in after.items() if k != "infill"},
            "heldout_tokens": opts.eval_tokens,
            "heldout_tokens_per_file": scored["tuned"][2],  # at most this many from each held-out file
            "heldout_tokens_scored": sum(len(w) - 1 for w in scored["tuned"][0]),
            "unrelated_tokens_per_file": scored["unrelated"][2],
            "unrelated_tokens_scored": sum(len(w) - 1 for w in scored["unrelated"][0]),
            "old_eval_tokens": opts.old_eval_tokens,
            "infill_base": before.get("infill"),  # single-line infill on held-out lines (tune/infill.py)
            "infill_adapter": after["infill"],
            "unrelated": "CPython standard-library modules the bundled model never trained on (models/heldout.txt)",
        },
    }
    emit({"kind": "stage", "stage": "writing the adapter"})
    st, peft_cfg = safetensors_bytes(model)
    adapter = Adapter(meta, gguf_bytes(model, base.hf_config, alpha, name, arch=base.arch), st, peft_cfg)
    seal_adapter(adapter, Path(opts.out))
    checkpoint.remove(ck_path)
    meta["size"] = {"gguf": len(adapter.gguf), "safetensors": len(st), "sealed": Path(opts.out).stat().st_size}
    return TuneResult(Path(opts.out), meta)


def _evaluate(model, scored: dict, device: str) -> dict[str, float | None]:
    """Bits per byte of `model` on each of `sets.eval_sets`."""
    from .evaluate import bits_per_byte

    return {k: bits_per_byte(model, w, n, device=device) for k, (w, n, _) in scored.items()}


@contextmanager
def _weights(params: list, avg: list | None) -> Iterator[None]:
    """Inside: `params` hold the averaged weights `avg` (nothing changes without them)."""
    if avg is None:
        yield
        return
    held = [p.detach().clone() for p in params]
    _copy(params, avg)
    try:
        yield
    finally:
        _copy(params, held)


def _copy(params: list, values: list) -> None:
    import torch

    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _kl_from_base(model, logits, ids):
    """Mean per-token KL(base ‖ tuned) of the rows `ids` whose tuned logits are `logits`: the base's own
    predictions as the target (distillation), which holds the model to what it knew on replayed code
    more tightly than the one next token does (Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network"; as a guard against forgetting, Li & Hoiem 2016, "Learning without Forgetting")."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), model.disable_adapter():
        ref = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    tuned = F.log_softmax(logits, -1)
    return F.kl_div(tuned.reshape(-1, tuned.shape[-1]), ref.reshape(-1, ref.shape[-1]), log_target=True, reduction="batchmean")


def _keep_best(
    model, best: dict | None, bpb: float | None, step: int, forget: float | None = None, limit: float | None = None
) -> dict | None:
    """The LoRA state with the lowest validation bits/byte so far ({"bpb", "step", "lora"}) among those
    that scored at most `limit` bits/byte on the forgetting-validation modules (`forget`; no limit: any)."""
    if bpb is None or not math.isfinite(bpb) or (best is not None and best["bpb"] <= bpb):  # a diverged state scores NaN
        return best
    if limit is not None and (forget is None or not math.isfinite(forget) or forget > limit):  # forgot too much
        return best
    from peft import get_peft_model_state_dict

    lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {"bpb": bpb, "step": step, "forget": forget, "lora": lora}
