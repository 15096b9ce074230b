"""Model adapters, registered by `config.model_type`.

An adapter holds all model knowledge: where the blocks are, which linear consumes each prunable
structure (attention heads -> output projection, FFN neurons -> down projection), how to shrink a block
in place, and how to save a portable checkpoint. Algorithms never look inside a model themselves.
"""
from __future__ import annotations

from ..errors import UnsupportedModel
from .base import Adapter

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Make `adapter` the one for each of its model types; a type that already has an adapter is refused."""
    taken = [t for t in adapter.model_types if t in _REGISTRY and _REGISTRY[t] is not adapter]
    if taken:
        raise ValueError(f"model_type {', '.join(map(repr, taken))} already has an adapter "
                         f"({type(_REGISTRY[taken[0]]).__name__}); unregister it first")
    for t in adapter.model_types:
        _REGISTRY[t] = adapter
    return adapter


def unregister(model_type: str) -> None:
    """Forget the adapter of `model_type` (to replace a built-in one with your own)."""
    _REGISTRY.pop(model_type, None)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_type: str) -> Adapter:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}") from None


def adapter_for(model) -> Adapter:
    return get_adapter(model.config.model_type)


from . import (  # noqa: E402,F401
    bert,  # noqa: E402,F401  (registers itself)
    gpt2,
    llama,  # noqa: E402,F401
    opt,
)
