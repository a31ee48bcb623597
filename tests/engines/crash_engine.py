"""A test-only engine: the real llama.cpp engine, plus prompt markers that kill the engine's process.

Served with `--engine crash_engine:CrashingEngine` and this folder on PYTHONPATH. In a supervised
engine process the marker kills only that process; inline (`model.isolation = "inline"`), it kills
the whole server, which is what the supervisor exists to prevent.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from codemoat.engines.llamacpp import LlamaCppEngine

CRASH = "<<crash>>"  # SIGSEGV in the engine's process
CRASH_UNLESS_SAFE = "<<crash-unless-safe>>"  # SIGSEGV unless built with the safe options (use_extra_bufts=False)
SLOW = "<<slow>>"  # chunks paced 50 ms apart: a stream still running when another request crashes the engine


class CrashingEngine(LlamaCppEngine):
    def __init__(self, model_path: str, *, use_extra_bufts: bool | None = None, **kw: Any):
        self.safe = use_extra_bufts is False
        super().__init__(model_path, use_extra_bufts=use_extra_bufts, **kw)

    async def stream(self, prompt, params):
        text = prompt if isinstance(prompt, str) else self.detokenize(prompt)  # the server sends token ids
        if CRASH in text or (CRASH_UNLESS_SAFE in text and not self.safe):
            os.kill(os.getpid(), signal.SIGSEGV)
        async for chunk in super().stream(prompt, params):
            if SLOW in text:
                await asyncio.sleep(0.05)
            yield chunk

    def health(self) -> dict[str, Any]:
        return {**super().health(), "built_safe": self.safe}
