"""Forward compatibility with transformers' renames, decided once per callable from its signature.

transformers 5.24 renamed the key/value cache argument of every model forward, decoder layer and mask builder from
``past_key_values`` to ``cache`` (the old name warns and goes away in 5.40), and the outputs' field with it. Code that
hands a cache to a transformers callable goes through :func:`cache_kwargs` so it passes the name that callable
declares — the new one where it exists, the old one on older releases and on modules that still use it — and reads
the cache back with :func:`output_cache`. The test configuration turns transformers' deprecation warnings into
errors, so the next rename is caught by CI rather than by users.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

_NAMES: dict[Any, str] = {}


def cache_name(fn: Callable) -> str:
    """"cache" if `fn` (a module's forward, a module, or a function) declares it, else "past_key_values"."""
    key = type(fn) if not inspect.isfunction(fn) and not inspect.ismethod(fn) else getattr(fn, "__func__", fn)
    name = _NAMES.get(key)
    if name is None:
        target = getattr(fn, "forward", fn)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):  # a builtin without a signature: the old spelling is the safe one
            params = {}
        name = _NAMES[key] = "cache" if "cache" in params else "past_key_values"
    return name


def cache_kwargs(fn: Callable, cache) -> dict:
    """{name: cache} for calling `fn` with a key/value cache under the name it declares."""
    return {cache_name(fn): cache}


def output_cache(out):
    """The cache a model output carries (`cache` in transformers >= 5.24, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def output_cache_field(output_cls) -> str:
    """The name under which an output dataclass (e.g. CausalLMOutputWithPast) stores the cache."""
    import dataclasses

    return "cache" if "cache" in {f.name for f in dataclasses.fields(output_cls)} else "past_key_values"


def renamed(new_name: str, new_value, old_name: str, old_value, default=None, note: str = ""):
    """The value of a keyword renamed from `old_name` to `new_name` (one name per concept across the APIs): the new
    one, or the old one with a FutureWarning (it still works), or `default`. Both given: a typed error naming both.
    note: appended to the warning (e.g. how the old value maps to the new one)."""
    import warnings

    from .errors import InvalidInputError

    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise InvalidInputError(f"{new_name}= and {old_name}= name the same setting; pass only {new_name}=")
    warnings.warn(f"{old_name}= is the old spelling of {new_name}={note}; it still works, but pass {new_name}= "
                  "instead", FutureWarning, stacklevel=3)
    return old_value
