"""The training loop: corpus → tokenizer → model → AdamW with warm-up and cosine decay → export.

Optimiser settings follow common small-model practice (Loshchilov & Hutter 2019, "Decoupled
Weight Decay Regularization": AdamW; β = (0.9, 0.95) and weight decay 0.1 as in LLaMA, Touvron
et al. 2023 §2.2; cosine decay to 10 % of the peak after a linear warm-up). The schedule runs
over the step budget when `steps` is given (bit-reproducible from the seed), otherwise over the
wall-clock budget, so a run on a slower or busier machine still anneals before its deadline.
Every `checkpoint_minutes` the model is exported (GGUF and safetensors), so a run that is
stopped early still leaves a usable model at the output path.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CodemoatError


@dataclass
class TrainOptions:
    corpus: list[Path]
    out: Path
    size: str = "tiny"
    minutes: float = 45.0
    steps: int | None = None  # fixed step count instead of a time budget (exactly reproducible)
    device: str = "cpu"
    seed: int = 0
    vocab_size: int | None = None
    batch_size: int | None = None
    lr: float = 1.5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    heldout_fraction: float = 0.06
    threads: int | None = None
    precision: str = "auto"  # auto | fp32 | bf16
    checkpoint_minutes: float = 5.0
    name: str | None = None
    ftype: str = "f16"
    fim_rate: float = 0.5
    repo_name: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    gguf: Path
    hf_dir: Path
    params: int
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    heldout_loss: float | None
    heldout_bpb: float | None
    summary_path: Path


#: per size: vocabulary and batch (sequences per step)
SIZE_DEFAULTS = {"micro": (1024, 4), "tiny": (8192, 6), "small": (16384, 16), "base": (32768, 32)}


def _resolve_precision(opts: TrainOptions, torch) -> bool:
    if opts.precision == "fp32":
        return False
    if opts.precision == "bf16":
        return True
    if opts.device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:  # CPUs with AVX512-BF16 / AMX run bf16 matmuls through oneDNN ~1.5x faster
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def lr_at(opts: TrainOptions, step: int, progress: float) -> float:
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(opts: TrainOptions, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train and export; `on_event` receives dicts (`kind`: stage, step, eval, checkpoint, done)."""
    import torch

    from . import data as data_mod
    from .corpus import collect, split
    from .export import export
    from .model import SIZES, Llama, ModelConfig
    from .tokenizer import train_tokenizer

    emit = on_event or (lambda e: None)
    if opts.size not in SIZES:
        raise CodemoatError(f"unknown size {opts.size!r}; choose one of {', '.join(SIZES)}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise CodemoatError("--device cuda requested but no CUDA device is available")
    out = Path(opts.out)
    if out.suffix != ".gguf":
        raise CodemoatError(f"--out must end in .gguf, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    name = opts.name or out.stem
    t_start = time.time()

    emit({"kind": "stage", "stage": "corpus"})
    files = collect([Path(p) for p in opts.corpus])
    train_files, held = split(files, opts.heldout_fraction, opts.seed)
    heldout_list = out.with_name(out.stem + ".heldout.txt")
    roots = "\n".join(f"# root: {Path(p).resolve()}" for p in opts.corpus)
    heldout_list.write_text(
        f"# held-out files (not trained on), seed {opts.seed}\n{roots}\n" + "".join(f.path + "\n" for f in held)
    )
    n_bytes = sum(len(f.text.encode()) for f in train_files)
    emit({"kind": "stage", "stage": "tokenizer", "files": len(train_files), "heldout": len(held), "bytes": n_bytes})

    vocab_default, batch_default = SIZE_DEFAULTS[opts.size]
    tok = train_tokenizer((f.text for f in train_files), opts.vocab_size or vocab_default)
    tokenizer_json = tok.to_str()
    mcfg = ModelConfig(vocab_size=tok.get_vocab_size(), **{**SIZES[opts.size], **opts.model_overrides})
    model = Llama(mcfg).to(opts.device)
    n_params = model.num_params()
    bf16 = _resolve_precision(opts, torch)
    B = opts.batch_size or batch_default
    dopts = data_mod.DataOptions(fim_rate=opts.fim_rate, repo_name=opts.repo_name or Path(opts.corpus[0]).name)
    dopts.chunk_chars = int(mcfg.n_ctx * 2.8)

    plain = data_mod.DataOptions(fim_rate=0.0, repo_rate=0.0, chunk_chars=dopts.chunk_chars)
    val_rows = None
    bytes_per_token = None
    if held:
        val_rows = data_mod.epoch_rows(held, tok, mcfg.n_ctx, plain, opts.seed, 0)[:32]
        held_text = "".join(f.text for f in held)
        bytes_per_token = len(held_text.encode()) / max(1, len(tok.encode(held_text, add_special_tokens=False).ids))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    log_path = out.with_name(out.stem + ".log.jsonl")
    log = log_path.open("w")
    emit({"kind": "stage", "stage": "train", "params": n_params, "config": asdict(mcfg), "bf16": bf16, "batch": B})

    def autocast():
        dev = "cuda" if opts.device.startswith("cuda") else "cpu"
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16)

    def evaluate() -> float | None:
        if val_rows is None:
            return None
        model.eval()
        losses = []
        with torch.no_grad(), autocast():
            for i in range(0, len(val_rows), B):
                x = val_rows[i : i + B].to(opts.device)
                losses.append(model.loss(x[:, :-1], x[:, 1:]).item())
        model.train()
        return sum(losses) / len(losses)

    def save(step: int, tokens: int, train_loss: float, final: bool) -> tuple[Path, Path, float | None]:
        vl = evaluate()
        bpb = vl / math.log(2) / bytes_per_token if vl is not None and bytes_per_token else None
        desc = f"{name}: {n_params:,} parameters, {tokens:,} training tokens, {step} steps"
        model_cpu = model if opts.device == "cpu" else _cpu_copy(model, mcfg)
        g, h = export(model_cpu, tokenizer_json, out, name=name, ftype=opts.ftype, description=desc)
        ev = {
            "kind": "checkpoint" if not final else "done",
            "step": step,
            "tokens": tokens,
            "seconds": round(time.time() - t_train, 1),
            "train_loss": train_loss,
            "heldout_loss": vl,
            "heldout_bpb": bpb,
        }
        log.write(json.dumps(ev) + "\n")
        log.flush()
        emit(ev)
        return g, h, vl

    model.train()
    gen = torch.Generator().manual_seed(opts.seed)
    budget_s = opts.minutes * 60.0
    t_train = time.time()
    t_ckpt = t_train
    step = epoch = tokens = 0
    ema = None
    rows = data_mod.epoch_rows(train_files, tok, mcfg.n_ctx, dopts, opts.seed, epoch)
    order = torch.randperm(len(rows), generator=gen)
    pos = 0
    while True:
        elapsed = time.time() - t_train
        progress = step / opts.steps if opts.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        if pos + B > len(rows):
            epoch += 1
            rows = data_mod.epoch_rows(train_files, tok, mcfg.n_ctx, dopts, opts.seed, epoch)
            order = torch.randperm(len(rows), generator=gen)
            pos = 0
        x = rows[order[pos : pos + B]].to(opts.device)
        pos += B
        lr = lr_at(opts, step, progress)
        for g in optim.param_groups:
            g["lr"] = lr
        with autocast():
            loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        tokens += B * mcfg.n_ctx
        lv = loss.item()
        if not math.isfinite(lv):
            raise CodemoatError(f"training diverged at step {step} (loss {lv}); lower --lr")
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        elapsed = time.time() - t_train
        ev = {
            "kind": "step",
            "step": step,
            "epoch": epoch,
            "loss": lv,
            "loss_ema": ema,
            "lr": lr,
            "tokens": tokens,
            "seconds": round(elapsed, 2),
            "tok_per_s": tokens / max(elapsed, 1e-9),
            "progress": min(1.0, step / opts.steps if opts.steps else elapsed / budget_s),
        }
        if step % 10 == 0:
            log.write(json.dumps(ev) + "\n")
            log.flush()
        emit(ev)
        if time.time() - t_ckpt >= opts.checkpoint_minutes * 60:
            save(step, tokens, ema, final=False)
            t_ckpt = time.time()

    if step == 0:
        raise CodemoatError("the time budget ended before the first training step; raise --minutes")
    g, h, vl = save(step, tokens, ema, final=True)
    bpb = vl / math.log(2) / bytes_per_token if vl is not None and bytes_per_token else None
    seconds = time.time() - t_train
    summary = {
        "name": name,
        "params": n_params,
        "config": asdict(mcfg),
        "vocab_size": tok.get_vocab_size(),
        "steps": step,
        "epochs_started": epoch + 1,
        "tokens": tokens,
        "batch": B,
        "bf16": bf16,
        "train_seconds": round(seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "train_loss": ema,
        "heldout_loss": vl,
        "heldout_bpb_estimate": bpb,
        "train_files": len(train_files),
        "train_bytes": n_bytes,
        "heldout_files": len(held),
        "seed": opts.seed,
        "device": opts.device,
        "threads": torch.get_num_threads(),
        "hardware": _hardware(opts.device, torch),
        "options": {k: str(v) for k, v in asdict(opts).items()},
    }
    summary_path = out.with_name(out.stem + ".train.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    try:  # the loss curve for the model card; matplotlib is optional
        from .card import plot_loss

        plot_loss(log_path, out.with_name(out.stem + ".loss.png"), title=f"{name}: {n_params / 1e6:.1f}M parameters")
    except ImportError:
        pass
    return TrainResult(g, h, n_params, step, tokens, seconds, ema, vl, bpb, summary_path)


def _cpu_copy(model, mcfg):
    from .model import Llama

    m = Llama(mcfg)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return m


def _hardware(device: str, torch) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
