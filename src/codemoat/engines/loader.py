"""Turn `settings.model` into a `ModelHolder`: a GGUF path, a safetensors folder, or a sealed .moat."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..errors import CodemoatError
from .factory import build_engine
from .holder import ModelHolder


def open_model(settings: Settings) -> ModelHolder:
    """Load the configured model (verifying its license when sealed) and return its holder."""
    m = settings.model
    if not m.path:
        raise CodemoatError("no model given: pass --model PATH or set model.path in the config")
    path = Path(m.path).expanduser()
    if not path.exists():
        raise CodemoatError(f"model not found: {path}")
    stem = path.name.split(".")[0]
    if path.suffix == ".moat":
        if not m.license:
            raise CodemoatError(f"{path.name} is sealed: pass --license FILE.lic")
        from .sealed import open_sealed

        # served under the manifest's model id (or model.id); the file's stem is accepted too
        return open_sealed(path, Path(m.license).expanduser(), settings=settings, model_id=m.id, aliases=[stem])
    model_id = m.id or stem
    holder = ModelHolder(model_id, loader=lambda: build_engine(settings, path, model_id))
    holder.status.path, holder.status.size = str(path), path.stat().st_size if path.is_file() else 0
    holder.load()
    return holder
