"""Everything that differs between the transformers releases planner supports, in one place.

This file is copied next to every saved model (its code imports it), so it depends on torch and transformers
only, and it runs on whatever transformers the user has, not the one the model was saved with.

The KV cache's name. transformers 5.24 renamed the forward argument `past_key_values` to `cache` (models,
decoder layers and attention modules alike; the old name is deprecated until 5.40 and ignored where both are
passed) and the output field `past_key_values` to `cache`. Code that passes the cache by the old name to a
5.24 layer that also receives `cache=None` runs without it; code that reads the old field of a 5.24 output
gets a deprecation warning. The helpers below ask the callee which name it takes instead of the version number,
so a backport or a later rename in either direction needs no change here.
"""
import functools
import inspect

CACHE_NAMES = ("cache", "past_key_values")    # the current name first


@functools.lru_cache(maxsize=256)
def _cache_name_of(fn) -> str:
    params = inspect.signature(fn).parameters                  # follows functools.wraps (deprecate_kwarg)
    return next((n for n in CACHE_NAMES if n in params), CACHE_NAMES[0])


def cache_name(forward) -> str:
    """The keyword under which `forward` (a model's, layer's or attention module's bound forward) takes the KV
    cache: "cache" (transformers >= 5.24) or "past_key_values" (earlier)."""
    fn = getattr(forward, "__func__", forward)                 # bound method -> function: one cache entry per class
    return _cache_name_of(fn)


def cache_kwargs(model, cache) -> dict:
    """{name: cache} to pass the KV cache to `model(...)` by the name its forward takes."""
    return {cache_name(model.forward): cache}


def output_cache(out):
    """The KV cache a model returned (`out.cache` on transformers >= 5.24, `out.past_key_values` before); None
    when it returned none."""
    for name in CACHE_NAMES:
        try:
            value = out[name] if name in out.keys() else None
        except (AttributeError, TypeError):                     # not a ModelOutput: a plain object or tuple
            value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def cache_from_kwargs(kwargs: dict):
    """The KV cache a layer was handed by its caller, under either name (None: no cache). A layer's caller
    uses the name of its own transformers release, so a stand-in layer accepts both."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
