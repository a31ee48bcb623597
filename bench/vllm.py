"""The vLLM engine, side by side in one run: is codemoat's layer free, and when does vLLM beat llama.cpp?

Parts (each one run of a few minutes; `--part all` runs both):
  serve   streamed /v1/completions at 1, 8 and 32 concurrent clients against
            vllm-serve        vLLM's own OpenAI server (`vllm serve`) on models/codemoat-tiny.hf
            codemoat-vllm     `codemoat serve --engine vllm` on the same folder, the same engine flags
            codemoat-llama    `codemoat serve` (llama.cpp, batched) on models/codemoat-tiny.gguf
          greedy 64-token completions of the same prompts, so every server writes the same text:
          characters per second compare like tokens per second; p50 latency and time to first token.
  engine  in one process: vLLM start to first token from the plaintext folder vs from a sealed
          container (decrypt, memfd hand-off, codemoat's loader); then one engine, batches of 32
          requests alternating watermark-keyed and unkeyed (throughput ratio).
  lora    in one process: a tuned adapter's cost (issue 22). Two engines up at once, the plain one
          and one with a rank-16 adapter on every linear layer (`enable_lora`, `codemoat tune`'s
          layout, handed over from a memfd as served); rounds in rotating order of greedy 32-token
          completions with a fresh prompt each round: base on the plain engine, base, adapter and
          half-adapter (every other request; a mixed batch) requests on the LoRA engine; 1 client,
          then 8 concurrent. p50 latency and ms per token. The adapter is folded into the weights
          for steps where every token has it (`model.fold_adapters`, engines.vllm_fold) unless `--no-fold`.
          `--lora-model random-100m` runs it on a random-weight llama of 12 layers, 768 wide (~100M
          parameters, the bundled tokenizer) written to a temporary folder, as well as the bundled one.

    .venv/bin/python bench/vllm.py --part serve --seconds 8
    git archive REV src | tar -x -C /tmp/before    # an older codemoat beside the working tree's, in one run:
    .venv/bin/python bench/vllm.py --part serve --seconds 8 --rounds 3 --before /tmp/before/src
    .venv/bin/python bench/vllm.py --part engine
    .venv/bin/python bench/vllm.py --part lora --rounds 20

Writes bench/results/vllm.md (the command, the date and the load average with the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path and this file would shadow the vllm package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
HF = ROOT / "models" / "codemoat-tiny.hf"
GGUF = ROOT / "models" / "codemoat-tiny.gguf"
PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    "def add(a, b):\n    return",
    "class Config:\n    def __init__(self, path):\n",
    "for i in range(10):\n    print(",
]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "CODEMOAT_VAULT__TPM": "off"}
#: after a load, vLLM's EngineCore and worker keep spinning on their shared-memory queues for 1 s
#: (`SpinCondition.busy_loop_s`), two busy processes on these two cores: each load waits that out, so
#: one server's (or engine's) spin does not fall on the next one measured
SETTLE_S = 1.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


async def load(url: str, model: str, token: str | None, clients: int, seconds: float) -> dict:
    """`clients` loops of streamed greedy completions for `seconds`: chars/s, p50 latency, p50 TTFT."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lat, ttft, chars = [], [], 0
    end = time.monotonic() + seconds

    async def one(c: httpx.AsyncClient, i: int) -> None:
        nonlocal chars
        while time.monotonic() < end:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 64, "temperature": 0, "stream": True}
            t0, first = time.monotonic(), None
            async with c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text = "".join(ch.get("text", "") for ch in json.loads(line[6:]).get("choices", []))
                        if text and first is None:
                            first = time.monotonic() - t0
                        chars += len(text)
            lat.append(time.monotonic() - t0)
            ttft.append(first or lat[-1])
            i += clients

    t = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as c:
        await asyncio.gather(*(one(c, i) for i in range(clients)))
    wall = time.monotonic() - t
    return {"chars_s": chars / wall, "p50": statistics.median(lat), "ttft": statistics.median(ttft), "n": len(lat)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def start(kind: str, home: Path, before: Path | None = None) -> tuple[subprocess.Popen, str, str, str | None, float]:
    """Start one server; `codemoat-vllm-before` runs the older checkout `before` (its src/, via PYTHONPATH)."""
    port = free_port()
    home = home / kind
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ENV, CODEMOAT_HOME=str(home))
    if kind == "codemoat-vllm-before":
        env["PYTHONPATH"] = str(before)
    log = open(home / f"{kind}.log", "w")
    if kind == "vllm-serve":
        # vLLM's own OpenAI server as `vllm serve` runs it (vllm-cpu's `vllm` script looks for a "vllm" distribution and fails)
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(HF),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        cmd += ["--max-model-len", "512", "--enforce-eager", "--served-model-name", "tiny"]
        model, token = "tiny", None
    else:
        token = json.loads(
            subprocess.run(
                [sys.executable, "-m", "codemoat.cli.main", "tokens", "create", "--name", "bench", "--json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["token"]
        engine = ["--engine", "vllm", "--model", str(HF)] if kind.startswith("codemoat-vllm") else ["--model", str(GGUF)]
        cmd = [sys.executable, "-m", "codemoat.cli.main", "serve", "--port", str(port), *engine]
        env["CODEMOAT_MODEL__N_CTX"] = "512"
        model = "codemoat-tiny"
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    took = wait(url, proc)
    return proc, url, model, token, took


def part_serve(
    seconds: float,
    out: list[str],
    before: Path | None = None,
    rounds: int = 1,
    counts: tuple[int, ...] = (1, 8, 32),
    llama: bool = True,
) -> None:
    """Every server up at once; each (clients, round) loads them one after the other, the order
    alternating, so that the machine's other work falls on all of them alike. Medians over rounds."""
    home = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    kinds = ["vllm-serve", "codemoat-vllm", *(["codemoat-vllm-before"] if before else []), *(["codemoat-llama"] if llama else [])]
    runs: dict[tuple[str, int], list[dict]] = {}
    servers: dict[str, tuple] = {}
    try:
        for kind in kinds:
            proc, url, model, token, took = servers[kind] = start(kind, home, before)
            print(f"{kind}: ready in {took:.0f} s", flush=True)
            asyncio.run(load(url, model, token, 1, 2))  # warm-up
        for r in range(rounds):
            for clients in counts:
                order = kinds if (r + clients) % 2 == 0 else kinds[::-1]
                for kind in order:
                    if kind == "codemoat-llama" and clients == 8:
                        continue
                    proc, url, model, token, _ = servers[kind]
                    time.sleep(SETTLE_S)
                    c0 = cpu_seconds(proc.pid)
                    res = asyncio.run(load(url, model, token, clients, seconds))
                    res["api_ms"] = (cpu_seconds(proc.pid) - c0) / max(1, res["n"]) * 1000  # the HTTP server's process only
                    runs.setdefault((kind, clients), []).append(res)
                    print(kind, clients, {k: round(v, 3) for k, v in res.items()}, flush=True)
    finally:
        for proc, *_ in servers.values():
            proc.terminate()
        for proc, *_ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = {
        k: {m: statistics.median(x[m] for x in rs) for m in ("chars_s", "p50", "ttft", "n", "api_ms")}
        for k, rs in sorted(runs.items(), key=lambda kv: (kinds.index(kv[0][0]), kv[0][1]))
    }
    if before is not None or rounds > 1:
        out.append(
            f"All servers up at once; per (clients, round) loaded one after the other, order alternating, {SETTLE_S} s apart; {rounds} round(s), "
            + ("medians; " if rounds > 1 else "")
            + (f"codemoat-vllm-before = the code of `{before}` (PYTHONPATH), codemoat-vllm = the working tree." if before else "")
        )
        out.append("")
    out.append("| server | clients | chars/s | p50 latency (s) | p50 TTFT (s) | requests | server process CPU per request (ms) |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for (kind, c), r in rows.items():
        out.append(f"| {kind} | {c} | {r['chars_s']:.0f} | {r['p50']:.3f} | {r['ttft']:.3f} | {r['n']:.0f} | {r['api_ms']:.1f} |")
    out.append("")
    out.append("| ratio | clients | throughput | p50 latency | p50 TTFT | server CPU per request |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    pairs = [("codemoat-vllm", "vllm-serve", (1, 8, 32))]
    if before is not None:
        pairs += [("codemoat-vllm-before", "vllm-serve", (1, 8, 32)), ("codemoat-vllm", "codemoat-vllm-before", (1, 8, 32))]
    pairs += [("codemoat-vllm", "codemoat-llama", (1, 32)), ("codemoat-llama", "codemoat-vllm", (1, 32))]
    for a, b, cs in pairs:
        for c in cs:
            if (a, c) in rows and (b, c) in rows:
                x, y = rows[a, c], rows[b, c]
                out.append(
                    f"| {a} / {b} | {c} | {x['chars_s'] / y['chars_s']:.2f} | {x['p50'] / y['p50']:.2f} | "
                    f"{x['ttft'] / y['ttft']:.2f} | {x['api_ms'] / y['api_ms']:.2f} |"
                )
    out.append("")


def part_engine(out: list[str]) -> None:
    """Sealed vs plaintext start, and watermark on/off, in this process."""
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.memfd import MemfdBuffer
    from codemoat.engines.vllm_engine import VllmEngine

    greedy = SamplingParams(max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, stop=[])

    async def first_token(eng) -> None:
        async for _ in eng.stream(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0)):
            pass

    async def started(build) -> tuple[object, float]:
        # one event loop per engine for its whole life: vLLM's output handler is bound to the loop
        t = time.monotonic()
        eng = build()
        await first_token(eng)
        return eng, time.monotonic() - t

    async def plain_run() -> float:
        eng, took = await started(lambda: VllmEngine.from_path(HF, n_ctx=512))
        eng.close()
        return took

    t_plain = asyncio.run(plain_run())
    # the sealed path from the memfd on: decrypting is measured by bench/vault.py
    files = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]
    data, parts = b"", {}
    for f in files:
        b = (HF / f).read_bytes()
        parts[f], data = (len(data), len(b)), data + b

    async def batch(eng, key: bytes | None) -> tuple[int, float]:
        p = SamplingParams(**{**greedy.__dict__, "watermark": key, "stop": [], "logits_processors": []})
        t = time.monotonic()
        done = await asyncio.gather(*(eng.complete(PROMPTS[i % 4], p) for i in range(32)))
        return sum(d.completion_tokens for d in done), time.monotonic() - t

    async def sealed_run() -> tuple[float, dict[str, list[float]]]:
        eng, took = await started(lambda: VllmEngine.from_buffer(MemfdBuffer.from_bytes(data), parts, n_ctx=512))
        res: dict[str, list[float]] = {"off": [], "on": []}
        try:
            await batch(eng, None)
            for i in range(6):
                order = (("off", None), ("on", os.urandom(32))) if i % 2 == 0 else (("on", os.urandom(32)), ("off", None))
                for name, key in order:
                    n, s = await batch(eng, key)
                    res[name].append(n / s)
        finally:
            eng.close()
        return took, res

    t_sealed, res = asyncio.run(sealed_run())
    out.append("| vLLM start to first token | seconds |")
    out.append("| --- | --- |")
    out.append(f"| plaintext folder | {t_plain:.1f} |")
    out.append(f"| sealed (memfd hand-off, codemoat loader) | {t_sealed:.1f} |")
    out.append(f"| ratio sealed / plaintext | {t_sealed / t_plain:.2f} |")
    out.append("")
    on, off = statistics.median(res["on"]), statistics.median(res["off"])
    out.append("| 32 concurrent greedy 64-token requests, one engine | tokens/s (median of 6 alternating batches) |")
    out.append("| --- | --- |")
    out.append(f"| watermark off | {off:.0f} |")
    out.append(f"| watermark on (every request keyed) | {on:.0f} |")
    out.append(f"| ratio on / off | {on / off:.2f} |")
    out.append("")


def random_hf(folder: Path) -> Path:
    """A random-weight llama folder of ~100M parameters with the bundled model's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HF / f, folder / f)
    return folder


def lora_adapter(model: Path = HF, rank: int = 16) -> tuple[bytes, str]:
    """(adapter_model.safetensors, adapter_config.json) as `codemoat tune` writes them: peft on every
    linear layer of the bundled model, B drawn small (a trained adapter's size, not tune's zero start)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codemoat.tune.lora import safetensors_bytes, wrap

    torch.manual_seed(0)
    pm = wrap(AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32), rank=rank)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return safetensors_bytes(pm)


def part_lora(out: list[str], rounds: int, models: list[str], fold: bool = True) -> None:
    """p50 of a completion with the adapter vs without, under vLLM (see the module's text)."""
    for name in models:
        with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
            folder = HF if name == "tiny" else random_hf(Path(tmp) / "random-100m")
            out.append(f"**{'codemoat-tiny (5 layers, 192 wide)' if name == 'tiny' else 'random 100M (12 layers, 768 wide)'}**")
            out.append("")
            lora_run(out, rounds, folder, fold)


def lora_run(out: list[str], rounds: int, model: Path, fold: bool = True) -> None:
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.vllm_engine import VllmEngine

    st, cfg = lora_adapter(model)
    fd = os.memfd_create("bench-lora")
    os.write(fd, st)
    variants = ("plain engine, base", "LoRA engine, base", "LoRA engine, adapter", "LoRA engine, half adapter")
    lat: dict[tuple[str, int], list[float]] = {(v, c): [] for v in variants for c in (1, 8)}
    per_tok: dict[tuple[str, int], list[float]] = {(v, c): [] for v in variants for c in (1, 8)}

    async def one(eng, prompt: str, adapter: str | None) -> tuple[float, int]:
        p = SamplingParams(max_tokens=32, temperature=0.0, top_k=0, top_p=1.0, stop=[], adapter=adapter)
        t = time.monotonic()
        done = await eng.complete(prompt, p)
        return time.monotonic() - t, done.completion_tokens

    async def run() -> None:
        plain = VllmEngine.from_path(model, n_ctx=512)
        tuned = VllmEngine.from_path(model, n_ctx=512, adapters={"pay": (fd, cfg)}, fold_adapters=fold)
        # the last: every other request has the adapter (a batch mixing both; one client: alternating)
        engines = {
            variants[0]: (plain, None),
            variants[1]: (tuned, None),
            variants[2]: (tuned, "pay"),
            variants[3]: (tuned, "half"),
        }
        try:
            for eng, a in list(engines.values())[:3]:  # warm: the adapter is added to vLLM by the first request
                await one(eng, PROMPTS[0], a)
            for r in range(rounds):
                order = variants[r % 4 :] + variants[: r % 4]
                for clients in (1, 8):
                    for v in order:
                        eng, a = engines[v]
                        await asyncio.sleep(SETTLE_S)  # the other engine's spin is over
                        # a fresh prompt per (round, variant, client): no prefix cache helps anyone
                        got = await asyncio.gather(
                            *(
                                one(
                                    eng,
                                    f"# r{r} v{variants.index(v)} c{k}\n" + PROMPTS[(r + k) % 4],
                                    a if a != "half" else (None, "pay")[(r + k) % 2],
                                )
                                for k in range(clients)
                            )
                        )
                        for s, n in got:
                            lat[v, clients].append(s)
                            per_tok[v, clients].append(s / max(1, n))
        finally:
            plain.close()
            tuned.close()

    try:
        asyncio.run(run())
    finally:
        os.close(fd)
    out.append(
        f"{rounds} rounds (variants {SETTLE_S} s apart), rank-16 adapter on all 7 linear layers ({len(st) / 1e6:.1f} MB safetensors), 32 greedy tokens, "
        f"adapter folded into the weights for all-adapter steps: {'yes' if fold else 'no (--no-fold)'}."
    )
    out.append("")
    out.append("| variant | p50 ms, 1 client | ms/token, 1 client | p50 ms, 8 clients | ms/token, 8 clients |")
    out.append("| --- | --- | --- | --- | --- |")
    med = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    mpt = {k: statistics.median(v) * 1000 for k, v in per_tok.items()}
    for v in variants:
        out.append(f"| {v} | {med[v, 1]:.1f} | {mpt[v, 1]:.2f} | {med[v, 8]:.1f} | {mpt[v, 8]:.2f} |")
    a, b, p = variants[2], variants[1], variants[0]
    out.append(
        f"| ratio adapter / plain engine | {med[a, 1] / med[p, 1]:.2f} | {mpt[a, 1] / mpt[p, 1]:.2f} | "
        f"{med[a, 8] / med[p, 8]:.2f} | {mpt[a, 8] / mpt[p, 8]:.2f} |"
    )
    out.append(
        f"| ratio adapter / base, LoRA engine | {med[a, 1] / med[b, 1]:.2f} | {mpt[a, 1] / mpt[b, 1]:.2f} | "
        f"{med[a, 8] / med[b, 8]:.2f} | {mpt[a, 8] / mpt[b, 8]:.2f} |"
    )
    out.append(
        f"| ratio base on LoRA engine / plain engine | {med[b, 1] / med[p, 1]:.2f} | {mpt[b, 1] / mpt[p, 1]:.2f} | "
        f"{med[b, 8] / med[p, 8]:.2f} | {mpt[b, 8] / mpt[p, 8]:.2f} |"
    )
    h = variants[3]
    out.append(
        f"| ratio half adapter / plain engine | {med[h, 1] / med[p, 1]:.2f} | {mpt[h, 1] / mpt[p, 1]:.2f} | "
        f"{med[h, 8] / med[p, 8]:.2f} | {mpt[h, 8] / mpt[p, 8]:.2f} |"
    )
    out.append("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["serve", "engine", "lora", "all"], default="all")
    ap.add_argument("--seconds", type=float, default=8.0, help="load per (server, clients)")
    ap.add_argument("--before", type=Path, help="src/ of an older checkout, served too as codemoat-vllm-before (serve part)")
    ap.add_argument("--lora-model", default="tiny", help="lora part: tiny, random-100m, or both (tiny,random-100m)")
    ap.add_argument("--no-fold", action="store_true", help="lora part: model.fold_adapters off (engines.vllm_fold)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the serve part, or of the lora part (medians)")
    ap.add_argument("--clients", default="1,8,32", help="serve part: the client counts loaded (a short run: --clients 32)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm.md", help="results file (appended to)")
    ap.add_argument("--no-llama", action="store_true", help="serve part: leave out codemoat-llama (llama.cpp)")
    args = ap.parse_args()
    out: list[str] = []
    load0 = os.getloadavg()
    if args.part in ("serve", "all"):
        counts = tuple(int(c) for c in args.clients.split(","))
        part_serve(args.seconds, out, args.before, args.rounds, counts, not args.no_llama)
    if args.part in ("engine", "all"):
        part_engine(out)
    if args.part in ("lora", "all"):
        part_lora(out, max(3, args.rounds), args.lora_model.split(","), not args.no_fold)
    load1 = os.getloadavg()
    path = args.out
    head = (
        f"## `bench/vllm.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"{os.cpu_count()} CPUs; load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end "
        "(other work shared the cores: ratios within this run are what compares).\n\n"
    )
    old = path.read_text() if path.exists() else "# bench/vllm.py: codemoat over vLLM, side by side\n\n"
    path.write_text(old + head + "\n".join(out) + "\n")
    print(head + "\n".join(out))


if __name__ == "__main__":
    main()
