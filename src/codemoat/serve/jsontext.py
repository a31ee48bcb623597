"""Is a parsed JSON document Unicode text? The one check shared by the FastAPI routers (`serve.body`)
and the key server's plain ASGI app (`serve.keyserver_app`), which must not import FastAPI.

JSON lets `"\\ud800"` through as a lone UTF-16 surrogate, and Python's decoder does the same with the
surrogate's raw bytes (it decodes with 'surrogatepass'): a str that no tokenizer, database, log or
JSON answer can encode, so a body holding one is refused where it is parsed, before any use.
"""

from __future__ import annotations

from typing import Any

SURROGATE_MESSAGE = (
    "request body is not valid JSON text: a string holds a lone UTF-16 surrogate "
    "(such as \\ud800), which is not a Unicode character"
)


class TooManyValues(ValueError):
    """The document holds more values than the caller's `max_values`."""


class TooManyObjects(TooManyValues):
    """The document holds more objects than the caller's `max_objects`."""


def lone_surrogate(doc: Any, max_values: int | None = None, max_objects: int | None = None) -> bool:
    """True when any key or string value in `doc` is not Unicode text; iterative, since bodies nest as
    deep as the decoder allows (about 2 us for a lease request: no shortcut on the raw bytes, which
    would have to know every encoding `json.loads` accepts). With `max_values`, raises `TooManyValues`
    once it has seen more values (objects, arrays and scalars) than that; with `max_objects`,
    `TooManyObjects` once it has seen more objects."""
    todo = [doc]
    seen = objects = 0
    while todo:
        d = todo.pop()
        seen += 1
        if max_values is not None and seen > max_values:
            raise TooManyValues(max_values)
        if isinstance(d, str):
            texts = (d,)
        elif isinstance(d, dict):
            objects += 1
            if max_objects is not None and objects > max_objects:
                raise TooManyObjects(max_objects)
            texts = d.keys()
            todo.extend(d.values())
        elif isinstance(d, list):
            todo.extend(d)
            continue
        else:
            continue
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False
