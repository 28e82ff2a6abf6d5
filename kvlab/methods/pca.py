"""PCA projection of keys and values per (layer, kv head): the training-free feature-axis baseline.

Bases are the eigenvectors of the calibration second moment of post-RoPE keys and of values
(:func:`kvlab.analysis.spectra.head_spectra`); the cache stores k @ U[:, :r] and v @ W[:, :r] (see
:class:`~kvlab.methods.projection.ProjectedLayer`). Two training-free remedies are options, because reconstruction
error on the tokens that receive most attention matters far more than average energy:

* ``sinks``: the first positions (attention sinks) stay at full rank and are left out of the moments;
* ``weighting="attention"``: each token's contribution to the moments is weighted by the attention it receives.

``budget`` is the fraction of features kept: rank r = round(budget * head_dim) for every head's keys and values
(or explicit per-head ``key_ranks`` / ``value_ranks`` from a rank search). Sink copies add ``sinks`` full-rank
entries per sequence; ``cache.kv_bytes()`` reports the measured total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..models import ModelSpec
from .base import Method
from .projection import ProjectedLayer


@dataclass
class PCA(Method):
    name: ClassVar[str] = "pca"
    axes: ClassVar[tuple[str, ...]] = ("feature",)

    budget: float = 0.5
    sinks: int = 4
    weighting: str | None = None  # None or "attention"
    centered: bool = False  # centring is worse here: the cache stores x, not x - mean
    corpus: str = "wiki"
    calib_chunks: int = 64
    chunk_len: int = 512
    key_ranks: list | None = None  # optional (L, H_kv) ranks; overrides budget
    value_ranks: list | None = None
    key_bases: torch.Tensor | None = field(default=None, repr=False)  # (L, H_kv, D, D) columns by importance
    value_bases: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.weighting not in (None, "attention"):
            raise ValueError(f"weighting must be None or 'attention', got {self.weighting!r}")

    @property
    def fitted(self) -> bool:
        return self.key_bases is not None

    def fit(self, model, calib: torch.Tensor) -> "PCA":
        """Eigenvectors of keys and values per (layer, kv head) over calibration token ids ``calib`` (N, T)."""
        from ..analysis.spectra import head_spectra

        spectra = head_spectra(model, calib, parts=("keys", "values"), centered=self.centered,
                               skip_first=self.sinks, weighting=self.weighting)
        self.key_bases, self.value_bases = spectra.eigenvectors["keys"], spectra.eigenvectors["values"]
        return self

    def prepare(self, model, tokenizer) -> "PCA":
        if not self.fitted:
            from ..data import text_chunks

            self.fit(model, text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len,
                                        n_chunks=self.calib_chunks, split="calib"))
        return self

    def ranks(self, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, H_kv) key and value ranks."""
        uniform = torch.full((spec.n_layers, spec.n_kv_heads), max(1, round(self.budget * spec.head_dim)))
        keys = torch.as_tensor(self.key_ranks) if self.key_ranks is not None else uniform
        values = torch.as_tensor(self.value_ranks) if self.value_ranks is not None else uniform
        for what, r in (("key_ranks", keys), ("value_ranks", values)):
            if r.shape != uniform.shape or r.min() < 1 or r.max() > spec.head_dim:
                raise ValueError(f"{what} must be {tuple(uniform.shape)} (layers, kv heads) with values in "
                                 f"1..{spec.head_dim}, got shape {tuple(r.shape)}")
        return keys, values

    def make_layer(self, layer_idx: int, spec: ModelSpec):
        if not self.fitted:
            raise RuntimeError("PCA has no bases yet: call .fit(model, calib_ids) or .prepare(model, tokenizer)")
        key_ranks, value_ranks = self.ranks(spec)
        heads = range(spec.n_kv_heads)
        return ProjectedLayer(
            layer_idx,
            [self.key_bases[layer_idx, h, :, : key_ranks[layer_idx, h]] for h in heads],
            [self.value_bases[layer_idx, h, :, : value_ranks[layer_idx, h]] for h in heads],
            sinks=self.sinks,
        )
