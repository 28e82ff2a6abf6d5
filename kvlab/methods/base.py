"""The shared base of every method: one dataclass per method with ``fit``, ``new_cache``, ``compress`` and ``apply``.

A method says which axes of the cache (layer, head, token, feature) it compresses, builds the kvlab cache that
stores what it keeps, and optionally compresses a filled cache (the "compress the context, then continue" protocol).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import ClassVar, Iterator

from transformers import DynamicCache

from .. import attention
from ..cache.base import FullLayer, KVLabCache
from ..models import ModelSpec
from . import options as _options
from .options import Rule


@dataclass
class Method:
    """Base class. Subclasses set ``name``/``axes`` and override ``make_layer`` (and ``fit``/``compress`` if needed)."""

    name: ClassVar[str] = ""
    axes: ClassVar[tuple[str, ...]] = ()
    # Ranges / allowed values of options, by field name (kvlab.methods.options); subclasses add their own table or
    # declare a rule on the field itself with options.option(default, low=..., choices=...).
    OPTION_RULES: ClassVar[dict[str, Rule]] = {
        "source": Rule(artefact=True, special=("shipped",), help="where fitted tensors come from"),
    }
    budget: float = 1.0

    def __post_init__(self):
        _options.check(self)  # types from the annotations, then declared ranges: before any comparison below
        if not (0.0 < float(self.budget) <= 1.0):
            raise ValueError(f"budget must be in (0, 1] (fraction of the full cache's bytes kept), got {self.budget}")

    def fit(self, model, calib=None) -> "Method":
        """Learn what the method needs from calibration data (no-op for training-free methods)."""
        return self

    def prepare(self, model, tokenizer) -> "Method":
        """Make the method ready to run on ``model`` (fit on the default calibration data if it needs to)."""
        return self

    def check(self, spec: ModelSpec) -> None:
        """Raise ValueError if an option does not fit the model's geometry (called before any work on it)."""

    def make_layer(self, layer_idx: int, spec: ModelSpec):
        return FullLayer(layer_idx)

    def new_cache(self, model):
        """A fresh, empty cache for one batch of sequences."""
        spec = ModelSpec.from_model(model)
        return KVLabCache([self.make_layer(i, spec) for i in range(spec.n_layers)])

    def compress(self, cache, **context) -> None:
        """Compress a filled cache to the budget (the "compress the context, then continue" protocol)."""

    @contextmanager
    def apply(self, model) -> Iterator:
        """Run ``model`` through this method: yields a fresh cache to pass as ``past_key_values``."""
        with attention.attach(model):
            yield self.new_cache(model)

    @contextmanager
    def attached(self, model) -> Iterator[None]:
        """Switch ``model`` to what this method reads with, without creating a cache."""
        with attention.attach(model):
            yield

    @contextmanager
    def overridden(self, **overrides) -> Iterator[None]:
        """Set the fields given (None = leave as is) for good: ``fit(steps=...)`` updates the method. If the block
        raises ValueError (a bad option found while checking), every field is restored first, so bad input leaves
        the method as it was."""
        previous = {key: getattr(self, key) for key in overrides}
        for key, value in overrides.items():
            if value is not None:
                setattr(self, key, value)
        try:
            yield
        except ValueError:
            for key, value in previous.items():
                setattr(self, key, value)
            raise

    def options(self) -> dict:
        """The user-facing options (fields shown in repr; fitted tensors and tables are not options)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}


@dataclass
class NoCompression(Method):
    """``none``: the plain Hugging Face model (its own attention and ``DynamicCache``), the reference baseline."""

    name: ClassVar[str] = "none"

    def new_cache(self, model):
        return DynamicCache(config=model.config)

    @contextmanager
    def attached(self, model) -> Iterator[None]:
        yield

    @contextmanager
    def apply(self, model) -> Iterator:
        yield self.new_cache(model)


@dataclass
class Full(Method):
    """``full``: kvlab's cache and attention at 100 % budget; must reproduce ``none`` exactly."""

    name: ClassVar[str] = "full"

    def __post_init__(self):
        super().__post_init__()
        if self.budget != 1.0:
            raise ValueError(f"method 'full' keeps everything: budget must be 1.0, got {self.budget}")
