"""Leak tracing bench: fingerprint robustness and cost, watermark false positives and power.

    .venv/bin/python bench/trace.py                       # every part
    .venv/bin/python bench/trace.py --parts large,bundled  # some parts

Parts (each merges its numbers into bench/results/trace.json; trace.md is rebuilt from it):
  bundled    fingerprint on the bundled model (models/codemoat-tiny.gguf; a random stand-in of the
             same shape when it is missing): quality cost, and tracing after each attack
  large      the same on a random llama-shaped model of ≥ 100M parameters (realistic statistics)
  finetune   fine-tune the fingerprinted bundled model (its .hf safetensors) 200 steps on other code
  watermark  false positives on ≥ 10,000 human code files, detection on 200-token generations,
             exact match with the watermark on and off
  radio      stretch: a student trained on watermarked outputs, is the watermark in its outputs?
  watermark-gemma  the watermark's quality cost on a real pretrained model (Gemma 3 270M Q4_K_M,
             bench/gemma.py): exact match and similarity off vs on, detection on 64-token completions

1,000 customers are registered in a real vendor directory; a customer is named at corrected
p < 1e-9 (detect.py). Runs on one thread; sized for a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from codemoat.trace import detect, fingerprint, trace_stream  # noqa: E402
from codemoat.trace import watermark as wm  # noqa: E402
from tests.trace import attacks, synth  # noqa: E402

WORK = Path(os.environ.get("TRACE_BENCH_DIR", "/tmp/codemoat-bench-trace"))
RESULTS = Path(os.environ.get("TRACE_BENCH_RESULTS", ROOT / "bench" / "results"))
BUNDLED_SRC = ROOT / "models" / "codemoat-tiny.gguf"
BUNDLED = Path(os.environ.get("TRACE_BENCH_BUNDLED", WORK / "bundled" / "codemoat-tiny.gguf"))
HELDOUT = ROOT / "models" / "codemoat-tiny.heldout.txt"
STDLIB = Path(__import__("sysconfig").get_paths()["stdlib"])
SITE = ROOT / ".venv" / "lib" / "python3.11" / "site-packages"
A, B = "customer-0137", "customer-0613"  # the leaker, and a second colluder


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# -- customers --------------------------------------------------------------
def customers(n: int) -> dict[str, bytes]:
    """n customers registered in a real vendor directory (secrets from the vault)."""
    from codemoat.trace.vendor_io import fingerprint_secrets
    from codemoat.vault.vendor import Vendor

    root = WORK / f"vendor-{n}"
    global A, B
    A, B = f"customer-{137 % n:04d}", f"customer-{613 % n:04d}"
    v = Vendor.open(root) if (root / "vendor.json").exists() else Vendor.init(root)
    try:
        have = {c.name for c in v.customers()}
        for i in range(n):
            if f"customer-{i:04d}" not in have:
                v.customer(f"customer-{i:04d}")
        return fingerprint_secrets(v)
    finally:
        v.close()


def watermark_keys(n: int) -> dict[str, bytes]:
    from codemoat.trace.vendor_io import open_vendor, watermark_secrets

    v = open_vendor(WORK / f"vendor-{n}")
    try:
        return watermark_secrets(v)
    finally:
        v.close()


# -- held-out text and model quality ----------------------------------------
def heldout_text(max_bytes: int) -> str:
    """Concatenated held-out source files (listed beside the bundled model), else stdlib files."""
    files: list[Path] = []
    if HELDOUT.exists():
        lines = HELDOUT.read_text().splitlines()
        root = next((Path(x.split(":", 1)[1].strip()) for x in lines if x.startswith("# root:")), STDLIB)
        files = [root.parent / x.strip() for x in lines if x.strip() and not x.startswith("#")]
    files = [f for f in files if f.is_file()] or sorted(STDLIB.glob("[t-z]*.py"))
    out, n = [], 0
    for f in files:
        t = f.read_text(errors="replace")
        out.append(t)
        n += len(t.encode())
        if n >= max_bytes:
            break
    return "".join(out)[:max_bytes]


def quality(orig: Path, other: Path, text: str, n_ctx: int = 512, windows: int = 8) -> dict:
    """Next-token KL(orig ‖ other) in nats/token and bits/byte of both, over `windows` of held-out text."""
    from llama_cpp import Llama

    def run(path: Path):
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=1)
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        out = []
        for w in range(windows):
            chunk = ids[w * n_ctx : (w + 1) * n_ctx]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk)
            out.append((chunk, np.asarray(llm.scores[: len(chunk)], dtype=np.float64)))
        nbytes = sum(len(llm.detokenize(c[1:])) for c, _ in out)
        del llm
        return out, nbytes

    def logp(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    a, nbytes = run(orig)
    b, _ = run(other)
    kl, nll_a, nll_b, n = 0.0, 0.0, 0.0, 0
    for (ids, la), (_, lb) in zip(a, b):
        pa, pb = logp(la[:-1]), logp(lb[:-1])
        kl += float(np.sum(np.exp(pa) * (pa - pb)))
        nxt = np.asarray(ids[1:])
        nll_a -= float(pa[np.arange(len(nxt)), nxt].sum())
        nll_b -= float(pb[np.arange(len(nxt)), nxt].sum())
        n += len(nxt)
    bpb_a, bpb_b = nll_a / math.log(2) / nbytes, nll_b / math.log(2) / nbytes
    return {
        "tokens": n,
        "kl_nats_per_token": kl / n,
        "bpb_original": bpb_a,
        "bpb_other": bpb_b,
        "bpb_change_pct": 100 * (bpb_b - bpb_a) / bpb_a,
    }


# -- fingerprint robustness ---------------------------------------------------
def _trace(suspect: Path, orig: Path, secrets: dict, colluders: tuple[str, ...]) -> dict:
    t = time.time()
    r = trace_stream.trace_files(suspect, orig, secrets)
    others = [s for s in r.scores if s.customer not in colluders]
    mine = {s.customer: s for s in r.scores if s.customer in colluders}
    return {
        "named": r.named,
        "ok": sorted(r.named) == sorted(colluders)
        and all(mine[c].p_adj < 1e-9 for c in colluders)
        and min(s.p_adj for s in others) > 1e-3,
        "z_leaker": {c: round(mine[c].z, 1) for c in colluders},
        "max_z_other": round(max(s.z for s in others), 2),
        "min_p_adj_other": min(s.p_adj for s in others),
        "positions": r.positions,
        "realigned_units": sum(r.realigned.values()),
        "seconds": round(time.time() - t, 1),
    }


def robustness(name: str, orig: Path, secrets: dict, kl_windows: int, attack_kl: bool) -> dict:
    """Fingerprint A and B, then trace the leaks a leaker would make from A's copy."""
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    data = orig.read_bytes()
    copies = {}
    for c in (A, B):
        copies[c] = d / f"{c}.gguf"
        t = time.time()
        copies[c].write_bytes(fingerprint.fingerprint_model(data, "gguf", secrets[c]))
        log(f"{name}: fingerprinted for {c} in {time.time() - t:.1f} s")
    del data
    text = heldout_text(200_000)
    out: dict = {"model": str(orig), "params": _params(orig), "customers": len(secrets), "description": _description(orig)}
    log(f"{name}: quality")
    out["quality"] = quality(orig, copies[A], text, windows=kl_windows)
    leaks = {
        "sealed copy as is": lambda p: attacks.copy(copies[A], p),
        "requantised to Q8_0 (llama.cpp)": lambda p: attacks.requantize(copies[A], p, 7),
        "requantised to Q4_K_M (llama.cpp)": lambda p: attacks.requantize(copies[A], p, 15),
        "Gaussian noise, 5% of RMS (5x the mark)": lambda p: attacks.transform(copies[A], p, attacks.noise(0.05)),
        "30% smallest weights pruned": lambda p: attacks.transform(copies[A], p, attacks.prune(0.3)),
        "MLP units and heads permuted": lambda p: attacks.transform(copies[A], p, attacks.permute(7)),
        "Q4_K_M of the permuted copy": lambda p: attacks.requantize(
            attacks.transform(copies[A], d / "perm-f16.gguf", attacks.permute(7)), p, 15
        ),
        "average of A's and B's copies": lambda p: attacks.transform(copies[A], p, attacks.average(copies[B])),
    }
    out["attacks"] = {}
    for i, (label, make) in enumerate(leaks.items()):
        p = d / f"leak-{i}.gguf"
        t = time.time()
        make(p)
        log(f"{name}: {label}: made in {time.time() - t:.1f} s; tracing")
        res = _trace(p, orig, secrets, (A, B) if label.startswith("average") else (A,))
        if attack_kl and i > 0:
            q = quality(orig, p, text, windows=max(2, kl_windows // 4))
            res["attack_kl"], res["attack_bpb_change_pct"] = q["kl_nats_per_token"], q["bpb_change_pct"]
        out["attacks"][label] = res
        log(f"{name}: {label}: {res}")
        if i:
            p.unlink()
    (d / "perm-f16.gguf").unlink(missing_ok=True)
    out["clean original"] = _trace(orig, orig, secrets, ())
    out["leaker"], out["colluder"] = A, B
    return out


def _params(path: Path) -> int:
    from codemoat.trace.gguf_io import open_gguf

    with open_gguf(path) as r:
        return int(sum(t.n_elements for t in r.tensors))


def _description(path: Path) -> str:
    from codemoat.trace.gguf_io import metadata, open_gguf

    with open_gguf(path) as r:
        return str(metadata(r).get("general.description", ""))


def standin(path: Path, shape: synth.Shape, vocab: int, seed: int) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"building random model {path.name}")
        tok = synth.train_bpe(vocab, synth.corpus(400))
        shape.vocab = len(tok[0])
        synth.write_gguf(path, shape, synth.random_weights(shape, seed), *tok, dtype="F16")
    return path


def snapshot_bundled() -> None:
    """Copy the bundled model (GGUF and .hf) aside: training may overwrite it with a checkpoint mid-run."""
    import shutil

    if "TRACE_BENCH_BUNDLED" in os.environ or not BUNDLED_SRC.exists():
        return
    BUNDLED.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUNDLED_SRC, BUNDLED)
    if BUNDLED_SRC.with_suffix(".hf").is_dir():
        shutil.copytree(BUNDLED_SRC.with_suffix(".hf"), BUNDLED.with_suffix(".hf"), dirs_exist_ok=True)


def bundled_or_standin() -> tuple[Path, bool]:
    if BUNDLED.exists():
        return BUNDLED, True
    return standin(
        WORK / "standin-tiny.gguf",
        synth.Shape(n_layer=6, n_embd=256, n_ff=704, n_head=8, n_head_kv=4, n_ctx=512, out_std=0.6),
        4096,
        3,
    ), False


def part_bundled(n: int) -> dict:
    model, real = bundled_or_standin()
    res = robustness("bundled", model, customers(n), kl_windows=16, attack_kl=True)
    res["bundled"] = real
    return res


def part_large(n: int) -> dict:
    shape = synth.Shape(n_layer=14, n_embd=768, n_ff=2048, n_head=12, n_head_kv=4, n_ctx=512, out_std=0.3)
    model = standin(WORK / "random-113m.gguf", shape, 16384, 11)
    return robustness("large", model, customers(n), kl_windows=2, attack_kl=False)


# -- fine-tuning --------------------------------------------------------------
def part_finetune(n: int, steps: int = 200) -> dict:
    """Fine-tune A's fingerprinted safetensors copy of the bundled model on other code, then trace it."""
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = BUNDLED.with_suffix(".hf")
    if not (hf / "model.safetensors").exists():
        return {"skipped": f"{hf}/model.safetensors not found (the bundled model is not exported yet)"}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    secrets = customers(n)
    data = (hf / "model.safetensors").read_bytes()
    marked = fingerprint.fingerprint_model(data, "safetensors", secrets[A])
    cfg = AutoConfig.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_config(cfg)
    missing = model.load_state_dict(st_load(marked), strict=False)
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    # "other code": installed packages, which the bundled model was not trained on
    files = sorted((SITE / "httpx").rglob("*.py")) + sorted((SITE / "rich").rglob("*.py"))
    ids = []
    for f in files:
        ids += tok.encode(f.read_text(errors="replace")).ids
    ids_t = torch.tensor(ids)
    seq, batch = 128, 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    model.train()
    losses = []
    t = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(ids_t) - seq - 1, (batch,))
        x = torch.stack([ids_t[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"finetune step {step} loss {loss:.3f}")
    tuned = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in st_load(data)}
    out_bytes = st_save(tuned)
    from codemoat.trace import st_io

    orig_m = st_io.read_matrices(data)
    tuned_m = st_io.read_matrices(out_bytes)
    rel = [float(np.linalg.norm(tuned_m[k] - orig_m[k]) / np.linalg.norm(orig_m[k])) for k in orig_m if k in tuned_m]
    meta = json.loads((hf / "config.json").read_text())
    r = detect.trace(tuned_m, orig_m, secrets, meta=meta)
    others = [s for s in r.scores if s.customer != A]
    mine = next(s for s in r.scores if s.customer == A)
    return {
        "description": _description(BUNDLED),
        "steps": steps,
        "batch": f"{batch} x {seq} tokens",
        "lr": 3e-4,
        "seconds": round(time.time() - t, 1),
        "loss_first_10": float(np.mean(losses[:10])),
        "loss_last_10": float(np.mean(losses[-10:])),
        "weight_change_rel_median": float(np.median(rel)),
        "mark_rel": fingerprint.ALPHA,
        "named": r.named,
        "z_leaker": round(mine.z, 1),
        "max_z_other": round(max(s.z for s in others), 2),
        "min_p_adj_other": min(s.p_adj for s in others),
        "ok": r.named == [A] and min(s.p_adj for s in others) > 1e-3,
        "missing_keys": len(missing.missing_keys),
    }


# -- watermark ----------------------------------------------------------------
def human_files(n: int) -> list[Path]:
    files = [f for f in sorted(STDLIB.rglob("*.py")) if "site-packages" not in f.parts] + sorted(SITE.rglob("*.py"))
    rng = np.random.default_rng(0)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


def _banned(llm) -> list[int]:
    out = {llm.token_eos()}
    for s in (
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ):
        ids = llm.tokenize(s.encode(), add_bos=False, special=True)
        if len(ids) == 1:
            out.add(ids[0])
    return sorted(out)


def part_watermark(n_files: int, n_gen: int, n_em: int, n_keys: int, n_cust: int, ent_files: int, temps: list[float]) -> dict:
    from llama_cpp import Llama, LogitsProcessorList

    model, real = bundled_or_standin()
    customers(n_cust)
    keys = watermark_keys(n_cust)
    names = list(keys)[:n_keys]
    key = keys[names[0]]
    scorer = wm.LlamaScorer(str(model), n_ctx=512)
    greens = {k: wm.GreenList(keys[k]) for k in names}
    out: dict = {
        "model": str(model),
        "bundled": real,
        "description": _description(model),
        "gamma": wm.GAMMA,
        "delta": wm.DELTA,
        "entropy_threshold": wm.ENTROPY_THRESHOLD,
        "threshold": wm.THRESHOLD,
    }

    # false positives on human code, first 512 tokens of each file against n_keys customer keys:
    # every file scored on all tokens (the detector without a model), and the first `ent_files`
    # files also with the model's entropies (SWEET gating; one forward pass per file)
    t = time.time()
    files = human_files(n_files)
    tok = wm.LlamaScorer(str(model), vocab_only=True)
    rows = {"all tokens": [], "entropy-gated": []}
    for i, f in enumerate(files):
        ids = tok.tokenize(f.read_text(errors="replace"))[:512]
        if len(ids) < 16:
            continue
        modes = [("all tokens", None)] + ([("entropy-gated", scorer.entropies(ids))] if i < ent_files else [])
        for mode, ent in modes:
            for k in names:
                tt, g = wm.count(ids, greens[k], ent)
                if tt:
                    z = (g - wm.GAMMA * tt) / math.sqrt(tt * wm.GAMMA * (1 - wm.GAMMA))
                    rows[mode].append((z, wm.binom_tail(g, tt, wm.GAMMA), tt))
        if i % 1000 == 0:
            log(f"watermark FPR: {i}/{len(files)} files")
    out["fpr"] = {"files": len(files), "keys_per_file": len(names), "seconds": round(time.time() - t, 1)}
    for mode, r in rows.items():
        if not r:
            continue
        zs, ps, scored = (np.asarray(x) for x in zip(*r))
        out["fpr"][mode] = {
            "files": len(r) // len(names),
            "tests": len(ps),
            "fp_at_threshold": int((ps < wm.THRESHOLD).sum()),
            "fpr_at_threshold": float((ps < wm.THRESHOLD).mean()),
            "fp_at_corrected_threshold": int((ps * n_cust < wm.THRESHOLD).sum()),
            "fp_at_p_1e-3": int((ps < 1e-3).sum()),
            "expected_at_p_1e-3": len(ps) * 1e-3,
            "max_z": float(zs.max()),
            "mean_z": float(zs.mean()),
            "std_z": float(zs.std()),
            "median_scored_tokens": float(np.median(scored)),
        }
    log(f"watermark FPR: {out['fpr']}")
    if n_gen == 0:  # the "fpr" part: false positives only
        return out

    # detection on 200-token generations, prompted with held-out code
    text = heldout_text(400_000)
    llm = Llama(str(model), n_ctx=512, verbose=False, n_threads=1, seed=0)
    ptoks = llm.tokenize(text.encode(), add_bos=False, special=False)
    banned = _banned(llm)

    def ban(_ids, logits):
        logits[banned] = -1e9
        return logits

    rng = np.random.default_rng(1)
    generated: list[str] = []
    for j, temp in enumerate(temps):
        n_gen_t = n_gen if j == 0 else max(20, n_gen // 2)
        det, det_plain, zl, nscored = 0, 0, [], []
        t = time.time()
        for g in range(n_gen_t):
            s = int(rng.integers(0, len(ptoks) - 300))
            prompt = llm.detokenize(ptoks[s : s + 64]).decode(errors="replace")
            proc = wm.WatermarkProcessor(key, vocab_size=llm.n_vocab())
            txt = llm.create_completion(
                prompt,
                max_tokens=200,
                temperature=temp,
                top_k=0,
                top_p=1.0,
                seed=g,
                logits_processor=LogitsProcessorList([ban, proc]),
            )["choices"][0]["text"]
            generated.append(txt)
            res = wm.detect_text(txt, scorer.tokenize, {names[0]: key}, scorer.entropies)[0]
            # the corrected threshold a vendor with 1,000 customers applies
            det += res.p * n_cust < wm.THRESHOLD
            det_plain += res.detected
            zl.append(res.z)
            nscored.append(res.scored_tokens)
        out[f"detection_T{temp}"] = {
            "generations": n_gen_t,
            "tokens": 200,
            "detected_1000_customers": det / n_gen_t,
            "detected_1_key": det_plain / n_gen_t,
            "median_z": float(np.median(zl)),
            "median_scored_tokens": float(np.median(nscored)),
            "seconds": round(time.time() - t, 1),
        }
        log(f"watermark detection T={temp}: {out[f'detection_T{temp}']}")

    (WORK / "wm-generations.json").write_text(json.dumps({"key_customer": names[0], "texts": generated}))

    # single-line exact match, greedy, watermark off and on
    lines = text.splitlines(keepends=True)
    rng = np.random.default_rng(2)
    cands = [i for i in range(20, len(lines)) if len(lines[i].strip()) >= 8]
    picks = sorted(rng.choice(cands, size=min(n_em, len(cands)), replace=False))
    em = {"off": 0, "on": 0}
    changed = 0
    t = time.time()
    for i in picks:
        ctx_ids = llm.tokenize("".join(lines[max(0, i - 30) : i]).encode(), add_bos=False, special=False)[-300:]
        prompt = llm.detokenize(ctx_ids).decode(errors="replace")
        target = lines[i].rstrip("\n")
        outs = {}
        for mode in ("off", "on"):
            procs = [ban] + ([wm.WatermarkProcessor(key, vocab_size=llm.n_vocab())] if mode == "on" else [])
            c = llm.create_completion(
                prompt, max_tokens=48, temperature=0.0, stop=["\n"], logits_processor=LogitsProcessorList(procs)
            )["choices"][0]["text"]
            outs[mode] = c
            em[mode] += c.strip() == target.strip()
        changed += outs["on"] != outs["off"]
    out["exact_match"] = {
        "lines": len(picks),
        "em_off": em["off"] / len(picks),
        "em_on": em["on"] / len(picks),
        "outputs_changed": changed / len(picks),
        "seconds": round(time.time() - t, 1),
    }
    log(f"exact match: {out['exact_match']}")
    return out


def part_watermark_gemma(n_lines: int, n_gen: int) -> dict:
    """The watermark's quality cost on a real pretrained model (Gemma 3 270M Q4_K_M): single-line
    exact match and similarity, greedy, watermark off vs on, on held-out code; and its detection
    rate on short completions of the same model."""
    import difflib

    from gemma import TERMS, gemma_path
    from llama_cpp import Llama, LogitsProcessorList

    global A, B
    model = gemma_path()
    saved = A, B
    customers(4)  # a small vendor for the keys; it must not rename the other parts' leaker and colluder
    A, B = saved
    keys = watermark_keys(4)
    name = next(iter(keys))
    key = keys[name]
    llm = Llama(str(model), n_ctx=1024, verbose=False, n_threads=int(os.environ.get("WM_THREADS", "2")), seed=0)
    banned = {llm.token_eos()}

    def ban(_ids, logits):
        logits[list(banned)] = -1e9
        return logits

    text = heldout_text(400_000)
    lines = text.splitlines(keepends=True)
    rng = np.random.default_rng(2)
    cands = [i for i in range(20, len(lines)) if len(lines[i].strip()) >= 8]
    picks = sorted(rng.choice(cands, size=min(n_lines, len(cands)), replace=False))
    em = {"off": 0, "on": 0}
    sim: dict[str, list[float]] = {"off": [], "on": []}
    changed = 0
    t = time.time()
    for n, i in enumerate(picks):
        ctx = llm.tokenize("".join(lines[max(0, i - 40) : i]).encode(), add_bos=True, special=False)[-400:]
        target = lines[i].strip()
        outs = {}
        for mode in ("off", "on"):
            procs = [ban] + ([wm.WatermarkProcessor(key, vocab_size=llm.n_vocab())] if mode == "on" else [])
            c = llm.create_completion(
                ctx, max_tokens=40, temperature=0.0, stop=["\n"], logits_processor=LogitsProcessorList(procs)
            )["choices"][0]["text"]
            outs[mode] = c
            em[mode] += c.strip() == target
            sim[mode].append(difflib.SequenceMatcher(None, c.strip(), target).ratio())
        changed += outs["on"] != outs["off"]
        if n % 25 == 0:
            log(f"gemma exact match {n}/{len(picks)}: off {em['off']} on {em['on']}")
    out: dict = {
        "model": str(model),
        "terms": TERMS,
        "exact_match": {
            "lines": len(picks),
            "em_off": em["off"] / len(picks),
            "em_on": em["on"] / len(picks),
            "similarity_off": float(np.mean(sim["off"])),
            "similarity_on": float(np.mean(sim["on"])),
            "outputs_changed": changed / len(picks),
            "seconds": round(time.time() - t, 1),
        },
    }
    log(f"gemma exact match: {out['exact_match']}")
    # detection on short completions (what an editor receives), at the corrected threshold
    scorer = wm.LlamaScorer(str(model), n_ctx=512)
    ptoks = llm.tokenize(text.encode(), add_bos=False, special=False)
    for temp in (0.2, 0.8):
        zs, det = [], 0
        t = time.time()
        for g in range(n_gen):
            s = int(rng.integers(0, len(ptoks) - 300))
            proc = wm.WatermarkProcessor(key, vocab_size=llm.n_vocab())
            txt = llm.create_completion(
                [llm.token_bos(), *ptoks[s : s + 128]],
                max_tokens=64,
                temperature=temp,
                top_k=0,
                top_p=1.0,
                seed=g,
                logits_processor=LogitsProcessorList([ban, proc]),
            )["choices"][0]["text"]
            res = wm.detect_text(txt, scorer.tokenize, {name: key}, scorer.entropies)[0]
            zs.append(res.z)
            det += res.detected
        stouffer = float(np.sum(zs) / math.sqrt(len(zs))) if zs else 0.0
        out[f"detection_T{temp}"] = {
            "generations": n_gen,
            "tokens": 64,
            "detected_alone": det / max(1, n_gen),
            "median_z": float(np.median(zs)),
            "stouffer_z": stouffer,
            "seconds": round(time.time() - t, 1),
        }
        log(f"gemma detection T={temp}: {out[f'detection_T{temp}']}")
    return out


# -- radioactivity (stretch) ----------------------------------------------------
def part_radio(n_cust: int, n_train_gen: int = 100, steps: int = 400) -> dict:
    """Train a small student on the watermarked bundled model's outputs; score the student's outputs."""
    import torch
    from llama_cpp import Llama, LogitsProcessorList

    from codemoat.train.model import Llama as TorchLlama  # the project's own nanoGPT-style model
    from codemoat.train.model import ModelConfig

    model, real = bundled_or_standin()
    customers(n_cust)
    keys = watermark_keys(n_cust)
    name = next(iter(keys))
    key, other = keys[name], keys[list(keys)[1]] if len(keys) > 1 else bytes(range(32))
    llm = Llama(str(model), n_ctx=512, verbose=False, n_threads=1, seed=0)
    banned = _banned(llm)

    def ban(_ids, logits):
        logits[banned] = -1e9
        return logits

    text = heldout_text(400_000)
    ptoks = llm.tokenize(text.encode(), add_bos=False, special=False)
    rng = np.random.default_rng(5)
    data: list[int] = []
    t = time.time()
    saved = WORK / "wm-generations.json"
    if saved.exists():  # the watermark part's generations (same key: the first customer)
        for txt in json.loads(saved.read_text())["texts"]:
            data += llm.tokenize(txt.encode(), add_bos=False, special=False)
    for g in range(n_train_gen):
        s = int(rng.integers(0, len(ptoks) - 100))
        proc = wm.WatermarkProcessor(key, vocab_size=llm.n_vocab())
        out = llm.create_completion(
            llm.detokenize(ptoks[s : s + 32]).decode(errors="replace"),
            max_tokens=256,
            temperature=0.8,
            top_k=0,
            top_p=1.0,
            seed=1000 + g,
            logits_processor=LogitsProcessorList([ban, proc]),
        )
        data += llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=False)
    gen_s = time.time() - t
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = dict(vocab_size=llm.n_vocab(), d_model=128, n_layer=2, n_head=4, n_kv_head=2, d_ff=352, n_ctx=128)
    try:
        student = TorchLlama(ModelConfig(**cfg))
    except TypeError as e:
        return {"skipped": f"codemoat.train.model.Llama has another signature: {e}"}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x_all = torch.tensor(data)
    for step in range(steps):
        st = torch.randint(0, len(x_all) - 129, (16,))
        x = torch.stack([x_all[s : s + 129] for s in st])
        logits = student(x[:, :-1])
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the student's own generations, sampled at T = 1, scored without entropies (the vendor has no student)
    student.eval()
    z_key, z_other = [], []
    with torch.no_grad():
        for g in range(50):
            s = int(rng.integers(0, len(ptoks) - 40))
            seq = list(ptoks[s : s + 16])
            for _ in range(200):
                lg = student(torch.tensor([seq[-128:]]))
                lg = (lg[0] if isinstance(lg, tuple) else lg)[0, -1]
                lg[banned] = -1e9
                seq.append(int(torch.multinomial(torch.softmax(lg, -1), 1)))
            gen = seq[16:]
            z_key.append(wm.detect(gen, key)[0])
            z_other.append(wm.detect(gen, other)[0])
    allgen_k = float(np.sum(z_key) / math.sqrt(len(z_key)))
    return {
        "teacher_generations": n_train_gen + (len(json.loads(saved.read_text())["texts"]) if saved.exists() else 0),
        "train_tokens": len(data),
        "student": cfg,
        "steps": steps,
        "final_loss": float(loss),
        "generation_seconds": round(gen_s, 1),
        "student_median_z_key": float(np.median(z_key)),
        "student_median_z_other_key": float(np.median(z_other)),
        "stouffer_z_50_generations_key": allgen_k,
        "stouffer_z_50_generations_other": float(np.sum(z_other) / math.sqrt(len(z_other))),
        "bundled": real,
        "description": _description(model),
    }


# -- report ---------------------------------------------------------------------
def _fmt_p(p: float) -> str:
    return "<1e-300" if p == 0 else f"{p:.1e}"


def render(res: dict) -> str:
    L = [
        "# Leak tracing: fingerprint robustness and cost, watermark errors",
        "",
        "`.venv/bin/python bench/trace.py` (parts: bundled, large, finetune, watermark, radio); raw numbers in "
        "`bench/results/trace.json`. One thread on a shared 2-core machine. Fingerprint: "
        f"α = {fingerprint.ALPHA} (mark = 1% of each row's RMS), scores over ≤ {detect.MAX_POSITIONS:,} weights, "
        "a customer named at Bonferroni-corrected p < 1e-9 (p from Hoeffding's bound, detect.py).",
        "",
    ]
    for part, title in (("bundled", "Bundled model"), ("large", "Random llama-shaped model, ≥ 100M parameters")):
        r = res.get(part)
        if not r:
            continue
        note = "" if r.get("bundled", True) else " — **stand-in**: the bundled model was not there; a random model of its shape"
        desc = f" ({r['description']})" if r.get("description") else ""
        L += [
            f"## {title}{note}",
            "",
            f"`{Path(r['model']).name}`{desc}, {r['params']:,} parameters, {r['customers']:,} "
            f"registered customers; leaker {r.get('leaker', A)}, colluder {r.get('colluder', B)}.",
            "",
        ]
        q = r["quality"]
        L += [
            f"Quality cost of the fingerprint over {q['tokens']:,} held-out tokens: next-token KL "
            f"**{q['kl_nats_per_token']:.2e} nats/token**, bits/byte {q['bpb_original']:.4f} → {q['bpb_other']:.4f} "
            f"(**{q['bpb_change_pct']:+.3f}%**)."
            + (
                " Random weights have no behaviour to preserve: a random deep network is chaotic (its bits/byte "
                "above shows it predicts nothing) and any perturbation swings its outputs, so this KL is not a "
                "quality figure; the quality target is measured on the trained bundled model."
                if part == "large"
                else ""
            ),
            "",
        ]
        has_kl = any("attack_kl" in a for a in r["attacks"].values())
        L += [
            "| leak | named | z (leaker) | max z (999 others) | min corrected p (others) | pass |"
            + (" attack's own KL | attack's bpb change |" if has_kl else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if has_kl else ""),
        ]
        for label, a in list(r["attacks"].items()) + [("clean original (no leak)", r["clean original"])]:
            z = ", ".join(f"{v}" for v in a["z_leaker"].values()) or "-"
            row = (
                f"| {label} | {', '.join(a['named']) or 'nobody'} | {z} | {a['max_z_other']} | {_fmt_p(a['min_p_adj_other'])} | "
                f"{'yes' if a['ok'] else '**no**'} |"
            )
            if has_kl:
                row += (
                    f" {a.get('attack_kl', 0):.2e} | {a.get('attack_bpb_change_pct', 0):+.2f}% |"
                    if "attack_kl" in a
                    else " - | - |"
                )
            L.append(row)
        L.append("")
    f = res.get("finetune")
    if f:
        L += ["## Fine-tuning the fingerprinted bundled model", ""]
        if "skipped" in f:
            L += [f"Not run: {f['skipped']}.", ""]
        else:
            L += [
                f"Model: {f.get('description', '')}.",
                "",
                f"{f['steps']} AdamW steps (lr {f['lr']}, {f['batch']}) on httpx + rich sources (not in the training set), "
                f"torch, {f['seconds']} s; loss {f['loss_first_10']:.3f} → {f['loss_last_10']:.3f}; median relative weight "
                f"change {f['weight_change_rel_median']:.3f} (the mark is {f['mark_rel']}).",
                "",
                f"Named: **{', '.join(f['named']) or 'nobody'}**, z = {f['z_leaker']}; max z of the other customers "
                f"{f['max_z_other']}, min corrected p {_fmt_p(f['min_p_adj_other'])}; pass: {'yes' if f['ok'] else '**no**'}.",
                "",
            ]
    w = res.get("watermark")
    if w:
        note = "" if w["bundled"] else " (**stand-in** random model: the bundled model was not there)"
        fp = res["fpr"]["fpr"] if "fpr" in res else w["fpr"]
        L += [
            f"## Output watermark{note}",
            "",
            f"γ = {w['gamma']}, δ = {w['delta']}, entropy threshold τ = {w['entropy_threshold']} nats (SWEET), "
            f"detection at corrected p < {w['threshold']:g}; model `{Path(w['model']).name}` ({w.get('description', '')}).",
            "",
            f"**False positives** on human-written code (stdlib + site-packages, first 512 tokens of each file, each "
            f"file against {fp['keys_per_file']} customer keys; files under 16 tokens skipped), {fp['seconds']} s"
            + (f", model {res['fpr'].get('description', '')}" if "fpr" in res else "")
            + ":",
            "",
            "| scoring | files | tests | above threshold | rate | with 1,000-customer correction | p < 1e-3 (chance expects) | z mean / sd / max | tokens scored (median) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, m in fp.items():
            if isinstance(m, dict):
                L.append(
                    f"| {mode} | {m['files']:,} | {m['tests']:,} | **{m['fp_at_threshold']}** | {m['fpr_at_threshold']:.1e} | "
                    f"{m['fp_at_corrected_threshold']} | {m['fp_at_p_1e-3']} ({m['expected_at_p_1e-3']:.1f}) | "
                    f"{m['mean_z']:.2f} / {m['std_z']:.2f} / {m['max_z']:.2f} | {m['median_scored_tokens']:.0f} |"
                )
        L.append("")
        for k in sorted(x for x in w if x.startswith("detection_T")):
            d = w[k]
            L.append(
                f"**Detection**, temperature {k[11:]}: {d['generations']} generations of {d['tokens']} tokens, "
                f"**{100 * d['detected_1000_customers']:.1f}% detected** at the 1,000-customer corrected threshold "
                f"({100 * d['detected_1_key']:.1f}% testing one key); median z {d['median_z']:.1f}, median "
                f"{d['median_scored_tokens']:.0f} tokens scored."
            )
        e = w.get("exact_match")
        if e:
            L += [
                "",
                f"**Single-line exact match** (greedy, {e['lines']} held-out lines): {100 * e['em_off']:.1f}% without, "
                f"{100 * e['em_on']:.1f}% with the watermark (**{100 * (e['em_on'] - e['em_off']):+.1f} points**); "
                f"{100 * e['outputs_changed']:.1f}% of completions changed.",
            ]
        L.append("")
    g = res.get("watermark-gemma")
    if g:
        e = g["exact_match"]
        L += [
            "## The watermark's quality cost on a real pretrained model",
            "",
            f"`.venv/bin/python bench/trace.py --parts watermark-gemma --em-lines {e['lines']}`: "
            f"`{Path(g['model']).name}` (Gemma 3 270M, Q4_K_M, from PyPI via bench/gemma.py). {g['terms']}",
            "",
            f"**Single-line completion, greedy**, {e['lines']} held-out lines (40 lines of context): exact match "
            f"{100 * e['em_off']:.1f}% without, {100 * e['em_on']:.1f}% with the watermark "
            f"(**{100 * (e['em_on'] - e['em_off']):+.1f} points**); mean similarity to the real line (difflib ratio) "
            f"{e['similarity_off']:.3f} → {e['similarity_on']:.3f}; {100 * e['outputs_changed']:.1f}% of completions "
            f"changed; {e['seconds']} s.",
            "",
        ]
        for k in sorted(x for x in g if x.startswith("detection_T")):
            d = g[k]
            L.append(
                f"**Detection**, temperature {k[11:]}: {d['generations']} completions of ≤ {d['tokens']} tokens, "
                f"{100 * d['detected_alone']:.0f}% detected alone (one key, p < threshold), median z {d['median_z']:.2f}, "
                f"all {d['generations']} pooled (Stouffer) z = {d['stouffer_z']:.1f}."
            )
        L.append("")
    rr = res.get("radio")
    if rr:
        L += ["## Stretch: radioactivity (Sander et al. 2024)", ""]
        if "skipped" in rr:
            L += [f"Not run: {rr['skipped']}.", ""]
        else:
            L += [
                f"Teacher: {rr.get('description', '')}.",
                "",
                f"A student ({rr['student']['n_layer']} layers, d = {rr['student']['d_model']}) trained {rr['steps']} steps on "
                f"{rr['train_tokens']:,} tokens of watermarked generations; 50 of its own 200-token samples scored "
                f"without entropies: median z {rr['student_median_z_key']:.2f} with the teacher's key vs "
                f"{rr['student_median_z_other_key']:.2f} with another key; combined over the 50 (Stouffer) "
                f"z = {rr['stouffer_z_50_generations_key']:.1f} vs {rr['stouffer_z_50_generations_other']:.1f}. "
                f"A favourable setting: the student saw only watermarked text and fits it closely (final loss "
                f"{rr['final_loss']:.2f}); Sander et al. find the signal weaker when watermarked text is a small part of "
                "a student's data.",
                "",
            ]
    L += ["## Notes", ""]
    if "fpr" in res or w:
        n = (res.get("fpr") or {}).get("fpr", (w or {}).get("fpr", {})).get("all tokens", {}).get("tests", 0)
        if n:
            L.append(
                f"- No false positive in {n:,} tests bounds the false-positive rate below {3 / n:.1e} with 95% "
                "confidence (rule of three). 'All tokens' is the detector without model entropies "
                "(`--no-entropy`); the gate only selects which positions count, so the null distribution is the same."
            )
    if w and w.get("exact_match", {}).get("em_off", 1) == 0:
        L.append(
            "- Exact match is 0% with and without the watermark: the 3.6M-parameter bundled model completes no held-out "
            "line exactly, so this bench cannot measure the watermark's cost there. Most greedy completions change "
            "because this weak model's next-token entropy is above τ almost everywhere; SWEET's gate leaves only "
            "low-entropy positions alone. Measure again on a real code model before relying on δ = 3."
        )
    if w and "bundled" in res and w.get("description") != res["bundled"].get("description"):
        L.append(
            "- The watermark part ran on an earlier checkpoint of the same training run (see its description): "
            "the final model landed too late for its generations to finish on this shared machine."
        )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="bundled,large,finetune,watermark,radio")
    ap.add_argument("--customers", type=int, default=1000)
    ap.add_argument("--no-snapshot", action="store_true", help="reuse the bundled model copied by an earlier run")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--em-lines", type=int, default=200)
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--entropy-files", type=int, default=300, help="FPR files also scored with model entropies")
    ap.add_argument("--temperatures", default="0.2,0.8")
    ap.add_argument("--gemma-generations", type=int, default=20, help="watermark-gemma: completions per temperature")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / "trace.json"
    res = json.loads(jpath.read_text()) if jpath.exists() else {}
    if not args.no_snapshot:
        snapshot_bundled()
    for part in args.parts.split(","):
        t = time.time()
        log(f"== {part}")
        if part == "bundled":
            res[part] = part_bundled(args.customers)
        elif part == "large":
            res[part] = part_large(args.customers)
        elif part == "finetune":
            res[part] = part_finetune(args.customers)
        elif part == "watermark":
            res[part] = part_watermark(
                args.files,
                args.generations,
                args.em_lines,
                args.keys,
                args.customers,
                args.entropy_files,
                [float(x) for x in args.temperatures.split(",")],
            )
        elif part == "fpr":  # false positives only, on more files than --files when some are too short
            res[part] = part_watermark(args.files, 0, 0, args.keys, args.customers, args.entropy_files, [])
        elif part == "radio":
            res[part] = part_radio(args.customers)
        elif part == "watermark-gemma":
            res[part] = part_watermark_gemma(args.em_lines, args.gemma_generations)
        else:
            raise SystemExit(f"unknown part {part}")
        res[part]["part_seconds"] = round(time.time() - t, 1)
        jpath.write_text(json.dumps(res, indent=2, default=float) + "\n")
        (RESULTS / "trace.md").write_text(render(res))
        log(f"== {part} done in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
