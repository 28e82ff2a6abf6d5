"""kvlab: a laboratory for KV-cache compression of language models.

    import kvlab
    model, tok = kvlab.load_model()                 # bundled SmolLM2-135M-Instruct, offline
    spec = kvlab.ModelSpec.from_model(model)
    method = kvlab.methods.get("full")
    with method.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
    cache.kv_bytes()                               # measured / theoretical / full bytes

Importing kvlab has no side effects: nothing is fetched or registered until asked.
"""

from . import methods
from .attention import attach
from .budget import KVBytes, kv_bytes
from .cache import FullLayer, KVLabCache, KVLayer
from .capture import Capture, capture
from .models import ModelSpec, load_model, tiny_model

__version__ = "0.1.0"
__all__ = ["methods", "attach", "KVBytes", "kv_bytes", "FullLayer", "KVLabCache", "KVLayer", "Capture", "capture",
           "ModelSpec", "load_model", "tiny_model", "__version__"]
