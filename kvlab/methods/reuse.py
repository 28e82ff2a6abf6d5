"""Cross-layer KV reuse (layer axis): a selected (layer, kv head) stores nothing and reads the entry of the layer below.

Paper: "KV-CAR: KV Cache Compression using Autoencoders and KV Reuse in Large Language Models" (2025). Its reuse
half: per kv head, measure how similar K and V of adjacent layers are on calibration data
(:func:`kvlab.analysis.similarity.layer_similarity`); where layer l's head h is close enough to layer l - 1's, layer
l does not store K/V for head h and its attention reads layer l - 1's stored K/V for that head instead. Chains
follow: if layer l - 1's head h is itself reused, the entry read is layer l - 2's, and so on (layer 0 always stores).
Post-RoPE keys are reused: positions are the same in every layer, so the rotation matches (also with left padding).

Cache (:class:`ReuseLayer`, one per model layer, linked to the layers below): each layer stores only its own heads,
keys and values (B, H_own, T, D); ``attend`` assembles (B, H_kv, T, D) from its own heads and the referenced layers'
heads and runs ordinary attention. Bytes saved: exactly the reused heads' share (every head holds the same bytes).

Which heads are reused (one of):

* ``heads``: an explicit (L, H_kv) bool list (row 0 all False);
* ``threshold``: every (l >= 1, h) whose adjacent similarity is >= threshold;
* ``budget`` < 1 (fraction of the full cache's bytes kept): the most similar adjacent (l, h) pairs until
  kept <= budget, i.e. ceil((1 - budget) L H_kv) heads. The lowest reachable budget is 1 / L (layer 0 stores).

Similarity: ``metric`` ("cka": linear CKA, rotation-invariant; "cosine": mean cosine of aligned tokens, what reuse
substitutes directly) of ``part`` ("both": the smaller of the keys' and the values' similarity, since a head is reused
as a whole; "keys" or "values" alone). Measured in ``prepare`` on ``calib_chunks`` x ``chunk_len`` tokens of the
corpus' calib split, sink positions (< ``skip_first``) left out.

    reuse = Reuse(budget=0.8).prepare(model, tok)
    reuse.to_frame()                     # which heads are reused and from which layer
    with reuse.apply(model) as cache:
        model(ids, past_key_values=cache)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from .. import attention
from ..analysis.similarity import METRICS, PARTS, RANGES, LayerSimilarity
from ..cache.base import FullLayer, KVLabCache
from ..models import ModelSpec
from .base import Method

SELECT_PARTS: tuple[str, ...] = ("both",) + PARTS


class ReuseLayer(FullLayer):
    """A layer storing keys/values (B, H_own, T, D) of its non-reused kv heads only; reused heads are read from the
    layer below that stores them (set by :meth:`link`)."""

    def __init__(self, layer_idx: int, reused: Sequence[bool], min_grow: int = 32):
        super().__init__(layer_idx, min_grow)
        self.reused = [bool(r) for r in reused]  # per kv head
        if layer_idx == 0 and any(self.reused):
            raise ValueError("layer 0 cannot reuse: there is no earlier layer; its row of reused heads must be all False")
        self.own = [h for h, r in enumerate(self.reused) if not r]  # heads stored here, in storage order
        self.slot = {h: i for i, h in enumerate(self.own)}  # kv head -> index in self.keys' head axis
        self.sources: dict[int, ReuseLayer] = {}  # reused head -> the layer below that stores it (see link)

    def reset(self) -> None:
        sources = self.sources
        self.__init__(self.layer_idx, self.reused, self.min_grow)
        self.sources = sources  # the links stay: the layers below are reset in place

    def link(self, layers: Sequence["ReuseLayer"]) -> None:
        """Point every reused head at the nearest layer below that stores it (``layers``: the cache's layers)."""
        self.sources = {}
        for h in range(len(self.reused)):
            if not self.reused[h]:
                continue
            m = self.layer_idx - 1
            while m > 0 and layers[m].reused[h]:
                m -= 1
            if len(layers[m].reused) != len(self.reused) or layers[m].reused[h]:
                raise ValueError(f"layer {self.layer_idx} reuses head {h} but no earlier layer stores it")
            self.sources[h] = layers[m]

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if len(self.reused) != self.n_heads:
            raise ValueError(f"layer {self.layer_idx}: reuse flags for {len(self.reused)} kv heads, the model has "
                             f"{self.n_heads}")
        if len(self.sources) != sum(self.reused):
            raise RuntimeError(f"layer {self.layer_idx} reuses heads but is not linked to the layers below: build the "
                               "cache with Reuse.new_cache(model) (or call link(layers))")

    def _store(self, key_states, value_states):
        if self.own:
            if len(self.own) == self.n_heads:
                super()._store(key_states, value_states)
            else:
                super()._store(key_states[:, self.own], value_states[:, self.own])  # (B, H_own, T_new, D)
        else:
            self.length += key_states.shape[-2]
        return key_states, value_states  # plain readers would see only the new entries; kvlab attention won't

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values (B, H_own, T, D) of the heads this layer stores, as attention reads them (subclasses that
        store them in another form, e.g. :class:`kvlab.methods.kvcar_reuse.CodedReuseLayer`, return them decoded)."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def stored(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values (B, T, D) this layer stores for kv ``head``."""
        keys, values = self.entries()
        return keys[:, self.slot[head]], values[:, self.slot[head]]

    def assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values (B, H_kv, T, D) as attention reads them: own heads plus the linked layers' heads."""
        if not self.sources:
            return self.entries()
        read: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer index -> its entries(), read once
        keys, values = [], []
        for h in range(self.n_heads):
            owner = self.sources.get(h, self)
            if owner.length != self.length or owner.batch_size != self.batch_size:
                raise RuntimeError(f"layer {self.layer_idx} holds {self.batch_size}x{self.length} tokens but layer "
                                   f"{owner.layer_idx}, whose head {h} it reuses, holds "
                                   f"{owner.batch_size}x{owner.length}")
            if owner.layer_idx not in read:
                read[owner.layer_idx] = owner.entries()
            k, v = read[owner.layer_idx]
            keys.append(k[:, owner.slot[h]])
            values.append(v[:, owner.slot[h]])
        return torch.stack(keys, 1), torch.stack(values, 1)  # (B, H_kv, T, D)

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        keys, values = self.assemble()
        return attention.sdpa(query, keys, values, mask, scaling)

    def tensors(self):
        return [t for t in (self.keys, self.values) if t is not None]

    def accounting(self):
        rows = super().accounting()
        for row in rows:  # a reused head stores nothing: it reads its source layer's entry
            source = self.sources.get(row["head"])
            row["reused_from"] = -1 if source is None else source.layer_idx
            if source is not None:
                row.update(theoretical=0, tokens_kept=0, dims_kept=0)
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self.batch_size = len(indices)


@dataclass
class Reuse(Method):
    """KV-CAR cross-layer reuse (see the module docstring).

    heads: optional (L, H_kv) bool, True = layer l reads head h from the layer below. similarity: the measured
    :class:`~kvlab.analysis.similarity.LayerSimilarity` (cka/cosine per part: (H_kv, L, L)).
    """

    name: ClassVar[str] = "reuse"
    axes: ClassVar[tuple[str, ...]] = ("layer",)

    budget: float = 1.0
    heads: list | None = None  # explicit (L, H_kv) bool; overrides the similarity
    metric: str = "cka"  # "cka" or "cosine"
    part: str = "both"  # "both" (min of keys and values), "keys" or "values"
    threshold: float | None = None  # reuse every adjacent pair at least this similar (instead of a budget)
    corpus: str = "wiki"
    calib_chunks: int = 8
    chunk_len: int = 256
    skip_first: int = 4  # sink positions left out of the similarity
    similarity: LayerSimilarity | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.part not in SELECT_PARTS:
            raise ValueError(f"part must be one of {', '.join(SELECT_PARTS)}, got {self.part!r}")
        if self.threshold is not None:
            low, high = RANGES[self.metric]
            if not low <= float(self.threshold) <= high:
                raise ValueError(f"threshold for metric {self.metric!r} must be in [{low:g}, {high:g}], got "
                                 f"{self.threshold}")
        chosen = [what for what, on in (("heads", self.heads is not None), ("threshold", self.threshold is not None),
                                        ("budget < 1", self.budget < 1.0)) if on]
        if len(chosen) > 1:
            raise ValueError(f"choose the reused heads one way: heads, threshold or budget < 1; got {' and '.join(chosen)}")
        if self.skip_first < 0:
            raise ValueError(f"skip_first must be >= 0, got {self.skip_first}")

    @property
    def needs_similarity(self) -> bool:
        return self.heads is None and (self.threshold is not None or self.budget < 1.0)

    def fit(self, model, calib: torch.Tensor) -> "Reuse":
        """Measure the cross-layer similarity over calibration token ids ``calib`` (N, T)."""
        from ..analysis.similarity import layer_similarity

        self.similarity = layer_similarity(model, calib, skip_first=self.skip_first)
        return self

    def prepare(self, model, tokenizer) -> "Reuse":
        """Measure the similarity on the corpus' calib split if the selection needs it and it is not there yet."""
        if self.needs_similarity and self.similarity is None:
            from ..data import text_chunks

            self.fit(model, text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len, n_chunks=self.calib_chunks,
                                        split="calib"))
        return self

    # ---- which heads
    def selection(self, spec: ModelSpec | None = None) -> torch.Tensor:
        """(L, H_kv) bool: True where layer l reads kv head h from the layer below and stores nothing for it."""
        shape = (spec.n_layers, spec.n_kv_heads) if spec is not None else None
        if self.heads is not None:
            heads = torch.as_tensor(self.heads)
            binary = heads.dtype == torch.bool or bool(((heads == 0) | (heads == 1)).all())
            if (shape is not None and tuple(heads.shape) != shape) or heads.ndim != 2 or not binary:
                want = f"{shape}" if shape is not None else "(layers, kv heads)"
                raise ValueError(f"heads must be a {want} list of bools (layers, kv heads), got shape "
                                 f"{tuple(heads.shape)} of {heads.dtype}")
            heads = heads.bool()
            if heads[0].any():
                raise ValueError("layer 0 cannot reuse: there is no earlier layer; heads[0] must be all False")
            return heads.clone()
        if not self.needs_similarity:
            shape = shape or (self.similarity.shape if self.similarity is not None else None)
            if shape is None:
                raise ValueError("no heads are reused at budget 1.0; pass the model's spec to get the (L, H_kv) shape")
            return torch.zeros(shape, dtype=torch.bool)
        if self.similarity is None:
            raise RuntimeError("Reuse has no similarity yet: call .fit(model, calib_ids) or .prepare(model, tokenizer),"
                               " or give heads=")
        if shape is not None and self.similarity.shape != shape:
            raise ValueError(f"the similarity was measured for (layers, kv heads) = {self.similarity.shape}, the model "
                             f"has {shape}")
        if self.threshold is not None:
            return self.similarity.reuse_candidates(self.threshold, self.metric, self.part)
        return self._by_budget()

    def _by_budget(self) -> torch.Tensor:
        layers, heads = self.similarity.shape
        lowest = 1.0 / layers
        if self.budget < lowest - 1e-12:
            raise ValueError(f"budget {self.budget} cannot be met by reuse alone: layer 0 always stores its {heads} kv "
                             f"head(s), so with {layers} layers at least 1/{layers} = {lowest:.4f} of the bytes are "
                             f"kept; allowed budgets: [{lowest:.4f}, 1]")
        n_reuse = min(math.ceil((1.0 - self.budget) * layers * heads - 1e-9), (layers - 1) * heads)
        scores = self.similarity.adjacent(self.part, self.metric).nan_to_num(nan=-float("inf"))  # (L-1, H)
        order = torch.argsort(scores.flatten(), descending=True, stable=True)[:n_reuse]
        out = torch.zeros(layers, heads, dtype=torch.bool)
        out[1:].view(-1)[order] = True
        return out

    def kept_fraction(self, spec: ModelSpec | None = None) -> float:
        """Fraction of the full cache's bytes kept: heads stored / all heads."""
        return 1.0 - self.selection(spec).double().mean().item()

    def to_frame(self, spec: ModelSpec | None = None):
        """One row per (layer, head): reused, the layer whose entry is read, and the adjacent similarities."""
        import pandas as pd

        chosen = self.selection(spec)
        layers, heads = chosen.shape
        adjacent = {}  # column -> (L-1, H)
        if self.similarity is not None:
            adjacent = {f"{m}_{p}": self.similarity.adjacent(p, m) for p in PARTS for m in METRICS}
        rows = []
        for h in range(heads):
            source = 0
            for l in range(layers):
                source = source if chosen[l, h] else l
                row = dict(layer=l, head=h, reused=bool(chosen[l, h]), read_from=source)
                row.update({k: float(v[l - 1, h]) if l > 0 else float("nan") for k, v in adjacent.items()})
                rows.append(row)
        return pd.DataFrame(rows).sort_values(["layer", "head"], ignore_index=True)

    # ---- cache
    def make_layer(self, layer_idx: int, spec: ModelSpec):
        return ReuseLayer(layer_idx, self.selection(spec)[layer_idx].tolist())

    def new_cache(self, model):
        spec = ModelSpec.from_model(model)
        chosen = self.selection(spec)
        layers = [ReuseLayer(i, chosen[i].tolist()) for i in range(spec.n_layers)]
        for layer in layers:
            layer.link(layers)
        return KVLabCache(layers)

    # ---- persistence
    def save(self, path: str | Path, model=None, metrics: dict | None = None) -> Path:
        """Write the measured similarity (safetensors) and a JSON record with the options beside it."""
        from . import artefacts

        if self.similarity is None:
            raise RuntimeError("nothing to save: Reuse has no similarity yet (fit or prepare first)")
        record = {"options": artefacts.jsonable_options({k: v for k, v in self.options().items() if k != "similarity"}),
                  "similarity": {"n_tokens": self.similarity.n_tokens, "skip_first": self.similarity.skip_first}}
        if model is not None:
            record["model"] = artefacts.model_fingerprint(model)
        if metrics:
            record["metrics"] = metrics
        return artefacts.write(path, self.name, self.similarity.tensors(), record)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "Reuse":
        """A method with the similarity of artefact ``path`` and the options of its record (``overrides`` win)."""
        import dataclasses

        from . import artefacts

        tensors, record = artefacts.read(path, cls.name)
        allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.repr}
        options = {k: v for k, v in record.get("options", {}).items() if k in allowed}
        similarity = LayerSimilarity.from_tensors(tensors, **record.get("similarity", {}))
        return cls(**{**options, **overrides, "similarity": similarity})
