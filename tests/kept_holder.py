"""A `ModelHolder` for tests that build apps over a module's engine: the apps come and go, the engine stays."""

from __future__ import annotations

from codemoat.engines.holder import ModelHolder


class KeptHolder(ModelHolder):
    """Holds the module's engine without closing it when an app is done with it."""

    def close(self):
        pass
