"""Turn `settings.model` into a `ModelHolder`: a GGUF path, a safetensors folder, or a sealed .moat."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..errors import CodemoatError
from . import engine_class
from .holder import ModelHolder


def engine_options(settings: Settings, model_id: str) -> dict:
    m = settings.model
    opts = {"model_id": model_id, "n_ctx": m.n_ctx}
    if m.engine == "llamacpp":
        opts.update(n_threads=m.n_threads, n_gpu_layers=m.n_gpu_layers, cpu_buffers=m.cpu_buffers)
    return opts


def open_model(settings: Settings) -> ModelHolder:
    """Load the configured model (verifying its license when sealed) and return its holder."""
    m = settings.model
    if not m.path:
        raise CodemoatError("no model given: pass --model PATH or set model.path in the config")
    path = Path(m.path).expanduser()
    if not path.exists():
        raise CodemoatError(f"model not found: {path}")
    model_id = m.id or path.name.split(".")[0]
    if path.suffix == ".moat":
        if not m.license:
            raise CodemoatError(f"{path.name} is sealed: pass --license FILE.lic")
        from .sealed import open_sealed

        return open_sealed(path, Path(m.license).expanduser(), settings=settings, model_id=model_id)
    cls = engine_class(m.engine)
    opts = engine_options(settings, model_id)
    holder = ModelHolder(model_id, loader=lambda: cls.from_path(path, **opts))
    holder.info.update({"path": str(path), "size": path.stat().st_size if path.is_file() else 0})
    holder.load()
    return holder
