"""kvlab: a laboratory for KV-cache compression of language models.

    import kvlab
    model, tok = kvlab.load_model()                 # bundled SmolLM2-135M-Instruct, offline
    spec = kvlab.ModelSpec.from_model(model)
    method = kvlab.methods.get("full")
    with method.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
    cache.kv_bytes()                               # measured / theoretical / full bytes

Importing kvlab has no side effects and is cheap: submodules (and torch/transformers) load on first use; nothing
is fetched or registered until asked.
"""

import pkgutil
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "attach": "attention", "KVBytes": "budget", "kv_bytes": "budget", "FullLayer": "cache", "KVLabCache": "cache",
    "KVLayer": "cache", "Capture": "capturing", "capture": "capturing", "ModelSpec": "models", "load_model": "models",
    "tiny_model": "models",
}
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")


def __dir__():
    return __all__
