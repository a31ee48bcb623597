"""Inference behind one `Engine` interface (see `base.py`); heavy imports stay in each engine's module.

Registry: `ENGINES` maps a name to "module:Class"; adding an engine is one class and one entry
(or `model.engine = "module:Class"` for one outside this package).
"""

ENGINES = {
    "llamacpp": "codemoat.engines.llamacpp:LlamaCppEngine",
    "transformers": "codemoat.engines.transformers_engine:TransformersEngine",
    "vllm": "codemoat.engines.vllm_engine:VllmEngine",
}


def engine_class(name: str):
    """The engine class registered under `name` (imported on first use)."""
    import importlib

    from ..errors import CodemoatError

    from .base import Engine

    target = ENGINES.get(name) or (name if ":" in name else None)  # "module:Class": an engine of one's own
    if target is None:
        raise CodemoatError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)} (or module:Class)")
    mod, cls = target.split(":", 1)
    try:
        found = getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise CodemoatError(f"engine {name!r} is not installed here: {e}") from None
    except AttributeError:
        raise CodemoatError(f"engine {name!r}: {mod} has no {cls}") from None
    if not (isinstance(found, type) and issubclass(found, Engine)):
        raise CodemoatError(f"engine {name!r} is not an Engine class")
    return found
