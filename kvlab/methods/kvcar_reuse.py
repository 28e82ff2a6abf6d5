"""KV-CAR composed: cross-layer reuse (layer axis) and autoencoded codes (feature axis) in one cache.

Paper: "KV-CAR: KV Cache Compression using Autoencoders and KV Reuse in Large Language Models" (2025), which applies
its two halves together: :class:`~kvlab.methods.reuse.Reuse` and :class:`~kvlab.methods.kvcar.KVCAR`.

What is stored. Every layer is a :class:`CodedReuseLayer`: a reused (layer l, kv head h) stores nothing and reads the
entry of the nearest layer below that stores head h, *as that layer's attention reads it* (decoded from its codes if
that layer is compressed); a stored head keeps its keys/values (B, H_own, T, D) in full, or, in the layers the plan
compresses, as KV-CAR codes (B, H_own, T, d) with the layer's shared autoencoder (plus full copies of the first
``sinks`` positions, as KVCAR). Bytes: a reused head 0, a coded head d/D of a full head (+ sink copies), a full head 1.

Budget rule (``budget`` = the overall fraction of the full cache's bytes kept, measured on the cache). With L layers,
H kv heads and head_dim D:

1. reuse takes the share ``reuse_share`` s of the saving: the ceil((1 - b_r) L H) most similar adjacent heads are
   reused, b_r = 1 - s (1 - budget) (clamped at Reuse's floor 1/L); or, with ``heads``/``threshold`` in
   ``reuse_options``, exactly those heads (then ``reuse_share`` is not used);
2. KV-CAR covers the rest: the layers of the fitted KVCAR are compressed at its code dimension d in the order of its
   measured ``layer_scores`` (cheapest first; a layer whose heads are all reused is skipped, it saves nothing),
   until kept = (1/LH) sum over stored (l, h) of (d/D if l is compressed else 1) <= budget. Overlap is counted
   exactly: compressing a layer saves only its stored heads.

So ``reuse_share=0`` is KVCAR alone (the same layers KVCAR's own rule picks at this budget) and ``reuse_share=1`` is
Reuse alone at this budget (no layer compressed). Sink copies come on top, as for KVCAR.

Fitted parts: ``kvcar`` (a :class:`KVCAR` whose autoencoders, code dimension and layer costs are used; by default
``KVCAR(**kvcar_options)``, prepared with its own ``source``, i.e. the shipped artefact under ``data/kvcar/`` when one
matches, else fitted) and ``similarity`` (the :class:`~kvlab.analysis.similarity.LayerSimilarity`, measured on the
corpus of ``reuse_options`` when missing). ``kvcar_options["budget"]`` picks the artefact and the code dimension,
not the overall budget. Only what the plan needs is prepared: with nothing to compress, no KVCAR is loaded or fitted.

    both = KVCARReuse(budget=0.5, reuse_share=0.5).prepare(model, tok)
    both.plan(spec)                          # (reused (L, H) bool, compressed layers, code dim)
    with both.apply(model) as cache:
        model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    cache.kv_bytes().budget                  # <= 0.5 (+ sink copies)

Registry name: ``"kvcar+reuse"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .. import attention
from ..analysis.similarity import LayerSimilarity
from ..cache.base import KVLabCache
from ..models import ModelSpec
from .base import Method
from .kvcar import KVCAR, AutoencodedLayer, Autoencoders
from .reuse import Reuse, ReuseLayer

REUSE_OPTIONS = ("heads", "threshold", "metric", "part", "corpus", "calib_chunks", "chunk_len", "skip_first")


class CodedReuseLayer(ReuseLayer):
    """A :class:`ReuseLayer` whose own heads are stored as KV-CAR codes when ``autoencoders`` is given (the layer is
    compressed), else in full (then it is exactly a ReuseLayer). The codes live in an inner
    :class:`AutoencodedLayer` over the own heads only: (B, H_own, T, d) + sink copies (B, H_own, S, D)."""

    def __init__(self, layer_idx: int, reused: Sequence[bool], autoencoders: Autoencoders | None = None,
                 sinks: int = 0, min_grow: int = 32):
        super().__init__(layer_idx, reused, min_grow)
        self.autoencoders, self.sinks = autoencoders, int(sinks)
        self.inner = AutoencodedLayer(layer_idx, autoencoders, sinks) if autoencoders is not None and self.own else None

    @property
    def compressed(self) -> bool:
        return self.inner is not None

    def reset(self) -> None:
        sources = self.sources
        self.__init__(self.layer_idx, self.reused, self.autoencoders, self.sinks, self.min_grow)
        self.sources = sources  # the links stay: the layers below are reset in place

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.inner is not None:
            self.inner.lazy_initialization(key_states[:, self.own], value_states[:, self.own])

    def _store(self, key_states, value_states):
        if self.inner is None:
            return super()._store(key_states, value_states)
        self.inner._store(key_states[:, self.own], value_states[:, self.own])  # (B, H_own, T_new, D), coded on read
        self.inner.seen += key_states.shape[-2]
        return key_states, value_states  # plain readers would see uncompressed new entries; kvlab attention won't

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is None:
            return super().entries()
        return self.inner.reconstruct()  # (B, H_own, T, D), decoded, sinks restored

    def attend(self, query, key, value, mask, *, scaling, position_ids=None, **kwargs):
        if self.inner is not None and self.inner._pending is not None:
            self.inner._commit(position_ids, mask)  # the layers below committed theirs in their own attend
            self.length = self.inner.length
        keys, values = self.assemble()
        return attention.sdpa(query, keys, values, mask, scaling)

    def get_seq_length(self) -> int:
        return self.inner.get_seq_length() if self.inner is not None else self.length

    def tensors(self):
        return list(self.inner.tensors()) if self.inner is not None else super().tensors()

    def accounting(self):
        if self.inner is None:
            return super().accounting()
        rows = []
        for row in self.inner.accounting():  # own heads, numbered by their slot
            rows.append({**row, "head": self.own[row["head"]], "full": self.full_bytes_per_head(row["part"]),
                         "tokens_seen": self.seen, "reused_from": -1})
        for h, source in self.sources.items():  # a reused head stores nothing
            for part, dim in (("K", self.head_dim), ("V", self.value_dim)):
                rows.append(dict(head=h, part=part, full=self.full_bytes_per_head(part), theoretical=0,
                                 tokens_seen=self.seen, tokens_kept=0, dims_full=dim, dims_kept=0,
                                 reused_from=source.layer_idx))
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.inner is None:
            return super().batch_select_indices(indices)
        self.inner.batch_select_indices(indices)
        self.batch_size = len(indices)

    def crop(self, tokens_to_remove: int) -> None:
        if self.inner is not None:
            raise NotImplementedError(f"layer {self.layer_idx} stores KV-CAR codes, which cannot be cropped")
        super().crop(tokens_to_remove)


@dataclass(eq=False)
class KVCARReuse(Method):
    """KV-CAR reuse + autoencoders in one cache (see the module docstring for the budget rule).

    ``kvcar``: the fitted :class:`KVCAR` whose autoencoders are used; ``similarity``: the measured layer similarity
    the reuse selection reads. Both are made in :meth:`prepare` when missing (and needed).
    """

    name: ClassVar[str] = "kvcar+reuse"
    axes: ClassVar[tuple[str, ...]] = ("layer", "feature")

    budget: float = 0.5
    reuse_share: float = 0.5  # share of the saving (1 - budget) asked of reuse; KV-CAR codes cover the rest
    reuse_options: dict = field(default_factory=dict)  # Reuse options: metric, part, corpus, ..., or heads/threshold
    kvcar_options: dict = field(default_factory=dict)  # KVCAR options for loading/fitting its autoencoders
    kvcar: KVCAR | None = field(default=None, repr=False)
    similarity: LayerSimilarity | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.reuse_share, bool) or not 0.0 <= float(self.reuse_share) <= 1.0:
            raise ValueError(f"reuse_share must be in [0, 1] (share of the saving asked of reuse), got "
                             f"{self.reuse_share!r}")
        bad = set(self.reuse_options) - set(REUSE_OPTIONS)
        if bad:
            raise ValueError(f"unknown reuse_options {', '.join(sorted(bad))}; allowed: {', '.join(REUSE_OPTIONS)} "
                             "(the reuse budget follows from budget and reuse_share)")
        self.reuse_part()  # option errors now, not at the first forward

    # ---- the two parts
    @property
    def reuse_budget(self) -> float:
        """The budget asked of reuse: 1 - reuse_share (1 - budget) (1 with explicit heads or threshold)."""
        return 1.0 - float(self.reuse_share) * (1.0 - float(self.budget))

    def reuse_part(self, spec: ModelSpec | None = None) -> Reuse:
        """The :class:`Reuse` that picks the reused heads (its budget clamped at 1/L when ``spec`` is known)."""
        fixed = "heads" in self.reuse_options or "threshold" in self.reuse_options
        budget = 1.0 if fixed else self.reuse_budget
        if spec is not None:
            budget = max(budget, 1.0 / spec.n_layers)
        return Reuse(budget=budget, similarity=self.similarity, **self.reuse_options)

    def kvcar_part(self) -> KVCAR:
        if self.kvcar is None:
            self.kvcar = KVCAR(**self.kvcar_options)
        return self.kvcar

    @property
    def provenance(self) -> dict:  # what `evaluate` reports as the artefact used
        return self.kvcar.provenance if self.kvcar is not None else {}

    # ---- the plan
    def plan(self, spec: ModelSpec) -> tuple[torch.Tensor, list[int], int]:
        """(reused (L, H_kv) bool, compressed layers ascending, code dimension) at this budget."""
        reused = self.reuse_part(spec).selection(spec)
        layers, heads, dim = spec.n_layers, spec.n_kv_heads, spec.head_dim
        own = (~reused).sum(1).tolist()  # stored heads per layer
        kept = sum(own) / (layers * heads)
        if kept <= self.budget + 1e-9:
            return reused, [], dim
        kvcar = self.kvcar
        if kvcar is None or kvcar.autoencoders is None:
            raise RuntimeError(f"reuse keeps {kept:.4f} of the bytes; budget {self.budget} needs KV-CAR codes, but "
                               "there are no autoencoders yet: call .prepare(model, tokenizer) or give kvcar=")
        ae = kvcar.autoencoders
        if ae.head_dim != dim or max(ae.layers) >= layers:
            raise ValueError(f"the autoencoders are for head_dim {ae.head_dim} and layers {ae.layers}; the model has "
                             f"head_dim {dim} and {layers} layers")
        d = ae.code_dim
        if kvcar.layer_scores is not None:
            scores = torch.as_tensor(kvcar.layer_scores, dtype=torch.float64).nan_to_num(nan=math.inf)
            order = [l for l in torch.argsort(scores, stable=True).tolist() if l in ae.slot]
        else:  # explicit KVCAR layers, no measured costs: in the order given
            order = list(ae.layers)
        chosen = []
        for l in order:
            if kept <= self.budget + 1e-9:
                break
            if own[l]:
                chosen.append(l)
                kept -= own[l] * (1.0 - d / dim) / (layers * heads)
        if kept > self.budget + 1e-9:
            raise ValueError(f"budget {self.budget} cannot be met: reusing {int(reused.sum())} heads and coding every "
                             f"layer with an autoencoder ({len(ae.layers)}) at d = {d} of {dim} keeps {kept:.4f}; "
                             f"allowed budgets: [{kept:.4f}, 1], or a larger reuse_share or smaller code_dim")
        return reused, sorted(chosen), d

    def kept_fraction(self, spec: ModelSpec) -> float:
        """Fraction of the full cache's bytes the plan keeps (sink copies not counted)."""
        reused, layers, d = self.plan(spec)
        scale = torch.ones(spec.n_layers, dtype=torch.float64)
        scale[layers] = d / spec.head_dim
        return float(((~reused).double() * scale[:, None]).mean())

    def to_frame(self, spec: ModelSpec):
        """One row per (layer, head): reused, read_from, compressed (stored as codes), dims kept."""
        import pandas as pd

        reused, layers, d = self.plan(spec)
        rows = []
        for h in range(spec.n_kv_heads):
            source = 0
            for l in range(spec.n_layers):
                source = source if reused[l, h] else l
                coded = l in layers and not reused[l, h]
                rows.append(dict(layer=l, head=h, reused=bool(reused[l, h]), read_from=source, compressed=coded,
                                 dims_kept=0 if reused[l, h] else (d if coded else spec.head_dim)))
        return pd.DataFrame(rows).sort_values(["layer", "head"], ignore_index=True)

    # ---- fitting
    def prepare(self, model, tokenizer) -> "KVCARReuse":
        """Measure the similarity if the reuse selection needs it, then load/fit the KVCAR if the plan needs codes."""
        spec = ModelSpec.from_model(model)
        reuse = self.reuse_part(spec)
        if reuse.needs_similarity and self.similarity is None:
            self.similarity = reuse.prepare(model, tokenizer).similarity
        reused = self.reuse_part(spec).selection(spec)
        if (~reused).double().mean().item() > self.budget + 1e-9:
            self.kvcar_part().prepare(model, tokenizer)
        self.plan(spec)  # budget errors now
        return self

    def fit(self, model, calib: torch.Tensor) -> "KVCARReuse":
        """Measure the similarity on ``calib`` (N, T) ids; the KVCAR is fitted (or loaded) on its own."""
        self.similarity = self.reuse_part().fit(model, calib).similarity
        return self

    # ---- cache
    def new_cache(self, model):
        spec = ModelSpec.from_model(model)
        reused, layers, _ = self.plan(spec)
        ae = self.kvcar.autoencoders if layers else None
        sinks = self.kvcar.sinks if layers else 0
        cache = [CodedReuseLayer(i, reused[i].tolist(), ae if i in layers else None, sinks)
                 for i in range(spec.n_layers)]
        for layer in cache:
            layer.link(cache)
        return KVLabCache(cache)

    def make_layer(self, layer_idx: int, spec: ModelSpec):
        raise NotImplementedError("kvcar+reuse layers are linked to one another: build the cache with new_cache(model)")
