"""Inference behind one `Engine` interface (see `base.py`); heavy imports stay in each engine's module.

Registry: `ENGINES` maps a name to "module:Class"; adding an engine is one class and one entry.
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

    try:
        mod, cls = ENGINES[name].split(":")
    except KeyError:
        raise CodemoatError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)}") from None
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise CodemoatError(f"engine {name!r} is not installed here: {e}") from None
