"""The `transformers` engine: a Hugging Face causal LM loaded from safetensors bytes, CPU by default.

Weights arrive as bytes (`safetensors.torch.load`), so a sealed model decrypted in memory never
touches a disk path. The model is built from its config with `AutoModelForCausalLM.from_config`
and filled with `load_state_dict` (transformers 5.x; building on the meta device would leave
RoPE's `inv_freq` empty). One worker thread owns the model; each generation runs there with a
KV cache, applies the request's logits processors to numpy logits, samples with its own seeded
generator and checks its cancel flag between tokens.

    eng = TransformersEngine.from_dir("models/codemoat-tiny.hf")
    text = (await eng.complete("def add(a, b):", SamplingParams(temperature=0))).text
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CodemoatError
from .base import Chunk, FinishReason, SamplingParams
from .hf import HfModel, fit_context, read_config
from .worker import StopCutter, WorkerEngine


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token: greedy at temperature 0, else temperature → top-k → top-p (Holtzman et al. 2020)."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    k = params.top_k if params.top_k and params.top_k > 0 else len(z)
    idx = np.argpartition(-z, min(k, len(z)) - 1)[:k] if k < len(z) else np.arange(len(z))
    idx = idx[np.argsort(-z[idx], kind="stable")]
    p = np.exp(z[idx] - z[idx[0]])
    p /= p.sum()
    if 0 < params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        idx, p = idx[:keep], p[:keep] / p[:keep].sum()
    return int(idx[rng.choice(len(idx), p=p)])


class TransformersEngine(HfModel, WorkerEngine):
    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer_json: str,
        config: dict,
        *,
        model_id: str = "model",
        n_ctx: int | None = None,
        device: str = "cpu",
        n_threads: int | None = None,
    ):
        self._model = model
        self._config = config
        self._device = device
        self._threads = n_threads
        self._load_tokenizer(tokenizer_json)
        self._eog = self._eog_ids()
        self._n_ctx = fit_context(config, n_ctx, default=2048)
        self.model_id = model_id
        self._start_worker(f"transformers-{model_id}")

    # -- construction -----------------------------------------------------
    @classmethod
    def from_bytes(cls, weights: bytes, config: dict, tokenizer_json: str, **kw: Any) -> TransformersEngine:
        """Build from safetensors bytes, a config dict (config.json) and a tokenizer.json string."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..trace import st_io

        if kw.get("n_threads"):
            torch.set_num_threads(kw["n_threads"])
        device = kw.pop("device", "cpu")
        cfg_dict = {k: v for k, v in config.items() if k not in ("codemoat", "chat_template")}
        try:
            # codemoat's header check first (st_io: refused before it is decoded, in one line): a folder swapped on
            # disk with a 100 MB header of zero-size tensors peaked at 2,710 MB in safetensors.torch.load, 220 MB here
            st_io.buffer_header(memoryview(weights))
            model_type = cfg_dict.pop("model_type")
            hf_cfg = AutoConfig.for_model(model_type, **cfg_dict)
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
            sd = load(bytes(weights))
        except (KeyError, ValueError, OSError, SafetensorError, CodemoatError) as e:  # SafetensorError: not safetensors
            raise CodemoatError(f"cannot load transformers model: {e}") from None
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = {"lm_head.weight"} if getattr(hf_cfg, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise CodemoatError(
                f"weights do not match the config: missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        if tied:
            model.tie_weights()
        model.to(device).eval()
        kw.pop("n_gpu_layers", None)
        return cls(model, tokenizer_json, config, device=device, **kw)

    @classmethod
    def from_buffer(cls, buf: Any, parts: Any = None, **kw: Any) -> TransformersEngine:
        """A sealed model folder decrypted in `buf` (a `MemfdBuffer`), its files at `parts`
        (name → offset, size); `buf` is zeroed once the weights are loaded."""
        try:
            parts = dict(parts or {})
            wname = next((n for n in parts if n.endswith(".safetensors")), None)
            if wname is None:
                raise CodemoatError("the sealed model holds no .safetensors file")

            def part(name: str) -> bytes | None:
                if name not in parts:
                    return None
                off, size = parts[name]
                return bytes(buf.view[off : off + size])

            config = json.loads(part("config.json") or b"{}")
            tok = part("tokenizer.json")
            off, size = parts[wname]
            with buf.view[off : off + size] as weights:
                return cls.from_bytes(weights, config, tok.decode() if tok is not None else None, **kw)
        finally:
            buf.close(zero=True)

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> TransformersEngine:
        """Load a folder with model.safetensors, config.json and tokenizer.json."""
        p = Path(path)
        need = [p / "model.safetensors", p / "config.json", p / "tokenizer.json"]
        for f in need:
            if not f.is_file():
                raise CodemoatError(f"not a model folder: {f.name} missing in {p}")
        kw.setdefault("model_id", p.name.split(".")[0])
        return cls.from_bytes(need[0].read_bytes(), read_config(p), need[2].read_text(), **kw)

    @classmethod
    def from_path(cls, path: str | Path, **kw: Any) -> TransformersEngine:
        """A model folder, or a .gguf whose `<stem>.hf/` folder (written by `vendor train`) lies beside it."""
        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p, **kw)
        sibling = p.with_suffix(".hf")
        if sibling.is_dir():
            kw.setdefault("model_id", p.stem)
            return cls.from_dir(sibling, **kw)
        raise CodemoatError(f"the transformers engine needs a safetensors folder, not {p}")

    # -- worker -------------------------------------------------------------
    def _worker_setup(self) -> None:
        import torch

        if self._threads:
            torch.set_num_threads(self._threads)

    def _run_job(self, fn: Callable[[], Any]) -> Any:
        import torch

        with torch.inference_mode():
            return fn()

    def _forward(self, ids: list[int], past):
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self._device)
        out = self._model(input_ids=x, past_key_values=past, use_cache=True)
        return out.logits[0, -1].float().cpu().numpy(), out.past_key_values

    def _generate(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Chunk], None], cancel: threading.Event
    ) -> None:
        """Runs on the worker: sample with a KV cache, cut at stop strings."""
        rng = np.random.default_rng(params.seed)
        cutter = StopCutter(params.stop, emit, params.n_indent, params.time_limit_ms)
        ids = list(prompt_ids)
        out_ids: list[int] = []
        reason: FinishReason = "length"
        logits, past = self._forward(ids, None)
        while len(out_ids) < params.max_tokens:
            if cancel.is_set():
                reason = "cancelled"
                break
            for proc in params.logits_processors:
                logits = proc(ids, logits)
            if params.repeat_penalty and params.repeat_penalty != 1.0 and out_ids:
                logits = logits.copy()
                seen = np.unique(np.array(ids))
                vals = logits[seen]
                logits[seen] = np.where(vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty)
            tok = sample_token(logits, params, rng)
            if tok in self._eog or (tok in self._specials.values() and self._tok.id_to_token(tok) in params.stop):
                reason = "stop"  # a special token is never text; one a stop string names ends the answer
                break
            ids.append(tok)
            out_ids.append(tok)
            text = self.detokenize(out_ids)
            complete = len(text) - (1 if text.endswith("\ufffd") else 0)  # an unfinished UTF-8 sequence
            if cutter.feed(text, tok, complete):
                reason = "stop"
                break
            if len(ids) >= self._n_ctx:
                break
            logits, past = self._forward([tok], past)
        cutter.finish(reason)

    def logits(self, prompt: str) -> np.ndarray:
        """Next-token logits after `prompt` (float32)."""
        ids = self.tokenize(prompt)
        self.check_count(len(ids), 0)  # not empty (eval() of nothing leaves stale logits), fits the context
        return self._submit(lambda: self._forward(ids, None)[0].astype(np.float32)).result()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "queue": self.queued, "device": self._device}

    def close(self) -> None:
        """Stop the worker and drop the weights (zeroing the parameters this engine owns)."""
        if not self._stop_worker():
            return
        try:
            import torch

            with torch.no_grad():
                for p in self._model.parameters():
                    p.zero_()
        finally:
            self._model = None
