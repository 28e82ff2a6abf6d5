"""PCA projection of keys and values per (layer, kv head): the training-free feature-axis baseline.

Bases are the eigenvectors of the calibration second moment of post-RoPE keys and of values
(:func:`kvlab.analysis.spectra.head_spectra`); the cache stores k @ U[:, :r] and v @ W[:, :r] (see
:class:`~kvlab.cache.projected.ProjectedLayer`). Two training-free remedies are options, because reconstruction
error on the tokens that receive most attention matters far more than average energy:

* ``sinks``: the first positions (attention sinks) stay at full rank and are left out of the moments;
* ``weighting="attention"``: each token's contribution to the moments is weighted by the attention it receives.

``budget`` is the fraction of features kept. ``allocation="uniform"``: rank r = round(budget * head_dim) for every
head's keys and values; ``allocation="searched"``: per-(layer, head, K/V) ranks from the greedy search on measured
loss (:mod:`kvlab.fit.search`), whose mean is the budget; ``allocation="split"``: uniform over heads, but the budget split
between keys and values by held-out KL (:func:`kvlab.fit.search.search_split`; cheap pre-RoPE keys give their dims to
values); or explicit ``key_ranks`` / ``value_ranks``. The searches record their objective and held-out score in
``provenance["search"]`` (saved with the artefact). Sink copies add
``sinks`` full-rank entries per sequence; ``cache.kv_bytes()`` reports the measured total.

``keys="pre_rope"`` (RoPE models): the key bases are fitted on keys before rotary (lower rank: 9.9 vs 24.8 dims for
90 % energy on SmolLM2), the cache un-rotates on write and rotates the rebuilt keys back on read (see
:class:`~kvlab.cache.projected.ProjectedLayer`); ``"post_rope"`` fits and stores the keys the model caches.
Artefacts record their key mode; reading one fitted in the other mode is a ValueError.

``values="output_aware"``: value codes and reads minimise the error after each head's slice of ``o_proj``
(attention-weighted; a generalised eigenproblem, :mod:`kvlab.methods.output_aware`): the cache stores E^T v as
before (same bytes) and reads v_hat = F c with a decoder F beside the encoder E; ``"plain"``: orthonormal PCA.

Where the fitted tensors come from (``source``): ``"shipped"`` (default) uses the artefact committed under
``data/pca/`` when it was made for this model with the same fitting options, and fits otherwise; a path loads that
artefact; ``None`` always fits. ``save``/``load`` write and read safetensors + a JSON provenance record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..models import ModelSpec
from . import artefacts
from .base import Method
from .options import Rule
from ..cache.projected import ProjectedLayer, check_orthonormal
from ..rope import Rotary

ALLOCATIONS = ("uniform", "searched", "split")
KEY_MODES = ("pre_rope", "post_rope")
VALUE_MODES = ("plain", "output_aware")


@dataclass
class PCA(Method):
    name: ClassVar[str] = "pca"
    axes: ClassVar[tuple[str, ...]] = ("feature",)

    budget: float = 0.5
    keys: str = "post_rope"  # "pre_rope" (bases of keys before rotary, rotated back on read) or "post_rope"
    values: str = "plain"  # "output_aware" (error after o_proj, oblique encoder/decoder) or "plain" (PCA)
    sinks: int = 4
    weighting: str | None = "attention"  # None (plain second moment) or "attention" (the better one here)
    centered: bool = False  # centring is worse here: the cache stores x, not x - mean
    corpus: str = "wiki"
    calib_chunks: int = 64
    chunk_len: int = 512
    allocation: str = "uniform"  # "uniform" or "searched" (greedy on measured loss, kvlab.fit.search)
    search_chunks: int = 1  # calibration chunks (of search_chunk_len tokens) per sensitivity measurement
    search_chunk_len: int = 256
    key_ranks: list | None = None  # optional (L, H_kv) ranks; overrides budget and allocation
    value_ranks: list | None = None
    source: str | None = "shipped"  # "shipped", a path to an artefact, or None (always fit)
    key_bases: torch.Tensor | None = field(default=None, repr=False)  # (L, H_kv, D, D) columns by importance
    value_bases: torch.Tensor | None = field(default=None, repr=False)
    value_decoders: torch.Tensor | None = field(default=None, repr=False)  # (L, H_kv, D, D), output-aware only
    sensitivity: object | None = field(default=None, repr=False)  # kvlab.fit.search.Sensitivity of these bases

    FIT_OPTIONS: ClassVar[tuple[str, ...]] = ("keys", "values", "sinks", "weighting", "centered", "corpus", "calib_chunks", "chunk_len")
    OPTION_RULES: ClassVar[dict[str, Rule]] = {
        "keys": Rule(choices=KEY_MODES), "values": Rule(choices=VALUE_MODES), "sinks": Rule(low=0), "weighting": Rule(choices=(None, "attention")), "allocation": Rule(choices=ALLOCATIONS),
        "corpus": Rule(choices=("wiki", "c4")), "calib_chunks": Rule(low=1), "chunk_len": Rule(low=2),
        "search_chunks": Rule(low=1), "search_chunk_len": Rule(low=2)}

    def __post_init__(self):
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.weighting not in (None, "attention"):
            raise ValueError(f"weighting must be None or 'attention', got {self.weighting!r}")
        if self.keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {', '.join(KEY_MODES)}, got {self.keys!r}")
        if self.values not in VALUE_MODES:
            raise ValueError(f"values must be one of {', '.join(VALUE_MODES)}, got {self.values!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        self.provenance: dict = getattr(self, "provenance", None) or {}
        self.metrics: dict = getattr(self, "metrics", None) or {}

    @property
    def fitted(self) -> bool:
        return self.key_bases is not None

    def fit(self, model, calib: torch.Tensor) -> "PCA":
        """Eigenvectors of keys and values per (layer, kv head) over calibration token ids ``calib`` (N, T)."""
        from ..analysis.spectra import head_spectra

        self.check_model(model)
        part = "keys_pre" if self.keys == "pre_rope" else "keys"
        spectra = head_spectra(model, calib, parts=(part, "values"), centered=self.centered,
                               skip_first=self.sinks, weighting=self.weighting)
        from .output_aware import second_moments

        self.key_bases, self.value_bases = spectra.eigenvectors[part], spectra.eigenvectors["values"]
        self.value_decoders = None
        # (L, H_kv, D, D) weighted value moments, kept in memory (not saved): output-aware bases from the same fit
        self.value_moments = second_moments(spectra.eigenvalues["values"], spectra.eigenvectors["values"])
        if self.values == "output_aware":
            self.make_output_aware(model)
        self.sensitivity = None
        self.provenance["pca"] = {"calib_shape": list(calib.shape), "sinks_skipped": self.sinks,
                                  "weighting": self.weighting, "centered": self.centered, "keys": self.keys,
                                  "values": self.values}
        return self

    def make_output_aware(self, model) -> "PCA":
        """Switch the value bases of this fit to output-aware ones (:mod:`kvlab.methods.output_aware`), from the
        value moments of the last :meth:`fit` (no second pass over the data)."""
        from .output_aware import oblique_bases, output_metrics

        if getattr(self, "value_moments", None) is None:
            raise RuntimeError("output-aware value bases need the value moments of a fit in this session: call .fit")
        self.value_bases, self.value_decoders = oblique_bases(self.value_moments, output_metrics(model))
        self.values = "output_aware"
        self.sensitivity = None
        self.provenance.setdefault("pca", {})["values"] = "output_aware"
        return self

    def check_model(self, model) -> None:
        """ValueError when ``keys="pre_rope"`` meets a model without rotary embeddings."""
        if self.keys == "pre_rope" and not ModelSpec.from_model(model).rope:
            raise ValueError(f"keys='pre_rope' needs a RoPE model, but {ModelSpec.from_model(model).arch} has no "
                             "rotary position embedding; use keys='post_rope'")

    def rotaries(self, model) -> list[Rotary | None]:
        """Per layer the rotary embedding pre-RoPE key bases are rotated back with (None everywhere for post-RoPE)."""
        spec = ModelSpec.from_model(model)
        if self.keys == "post_rope":
            return [None] * spec.n_layers
        self.check_model(model)
        return [Rotary.from_model(model, i) for i in range(spec.n_layers)]

    def new_cache(self, model):
        from ..cache.base import KVLabCache

        spec = ModelSpec.from_model(model)
        return KVLabCache([self.make_layer(i, spec, rotary) for i, rotary in enumerate(self.rotaries(model))])
        return self

    def prepare(self, model, tokenizer) -> "PCA":
        """Ready to run: shipped or loaded tensors (``source``) or a fit on the corpus' calib split; with
        ``allocation="searched"`` and no sensitivity table yet, measure one (minutes on SmolLM2)."""
        if not self.fitted:
            path = self._source_path(model)
            if path is not None:
                self._adopt(path, model)
            else:
                self._fit_default(model, tokenizer)
        if self.allocation == "searched" and self.key_ranks is None and self.sensitivity is None:
            self.search(model, tokenizer)
        if self.allocation == "split" and self.key_ranks is None:
            self.search_split(model, tokenizer)
        return self

    def heldout(self, tokenizer, n_chunks: int = 4) -> torch.Tensor:
        """(n, search_chunk_len) ids from the end of the corpus' calib split: never used by the fit (which reads
        its first ``calib_chunks`` x ``chunk_len`` tokens) nor by evaluation (the eval split)."""
        from ..data import text_chunks

        chunks = text_chunks(self.corpus, tokenizer, chunk_len=self.search_chunk_len, split="calib")
        if (len(chunks) - n_chunks) * self.search_chunk_len < self.calib_chunks * self.chunk_len:
            raise ValueError(f"the {self.corpus} calib split is too short for {n_chunks} held-out chunks after the "
                             f"{self.calib_chunks} x {self.chunk_len} fit tokens")
        return chunks[-n_chunks:]

    def search_split(self, model, tokenizer=None, data: torch.Tensor | None = None, progress: bool = True) -> "PCA":
        """Pick uniform key and value ranks splitting the budget by held-out KL (:func:`kvlab.fit.search.search_split`)
        on ``data`` or :meth:`heldout` chunks; sets ``key_ranks``/``value_ranks`` and records the search."""
        from ..fit import search

        if data is None:
            if tokenizer is None:
                raise ValueError("search_split needs held-out token ids (data=) or a tokenizer to draw them")
            data = self.heldout(tokenizer)
        tic = time.perf_counter()
        k, v, rows = search.search_split(model, self, data, progress=progress)
        spec = ModelSpec.from_model(model)
        self.key_ranks = [[k] * spec.n_kv_heads for _ in range(spec.n_layers)]
        self.value_ranks = [[v] * spec.n_kv_heads for _ in range(spec.n_layers)]
        best = min(r["heldout_kl"] for r in rows)
        self.provenance["search"] = {"kind": "split", "objective": search.OBJECTIVE, "budget": self.budget,
                                     "heldout_shape": list(data.shape), "candidates": rows, "key_rank": k,
                                     "value_rank": v, "heldout_kl": best,
                                     "seconds": round(time.perf_counter() - tic, 1)}
        return self

    def _source_path(self, model) -> Path | None:
        if self.source is None:
            return None
        if self.source == "shipped":
            return artefacts.find_shipped(self.name, model, self.options(), self.FIT_OPTIONS)
        return Path(self.source)

    def _fit_default(self, model, tokenizer) -> None:
        import sys

        from ..data import text_chunks

        if self.source is not None:
            print(f"pca: no artefact for this model and these options (source={self.source!r}); fitting on "
                  f"{self.calib_chunks} x {self.chunk_len} calib tokens (to ship one: "
                  f"`{artefacts.fit_command(self.name, model, search=self.allocation == 'searched')}`)",
                  file=sys.stderr)

        self.fit(model, text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len, n_chunks=self.calib_chunks,
                                    split="calib"))

    def search(self, model, tokenizer=None, data: torch.Tensor | None = None, progress: bool = True, **kwargs) -> "PCA":
        """Measure the rank sensitivity of the current bases (:func:`kvlab.fit.search.measure_sensitivity`) on ``data``
        or ``search_chunks`` x ``search_chunk_len`` tokens of the corpus' calib split."""
        from ..fit import search

        if data is None:
            if tokenizer is None:
                raise ValueError("search needs calibration token ids (data=) or a tokenizer to draw them")
            from ..data import text_chunks

            data = text_chunks(self.corpus, tokenizer, chunk_len=self.search_chunk_len, n_chunks=self.search_chunks,
                               split="calib", seed=1)
        tic = time.perf_counter()
        self.sensitivity = search.measure_sensitivity(model, self, data, progress=progress, **kwargs)
        self.provenance["search"] = {"kind": "greedy", "objective": "greedy on per-unit KL(full || one unit "
                                     "truncated), additive over units", "data_shape": list(data.shape),
                                     "seconds": round(time.perf_counter() - tic, 1),
                                     "grid": self.sensitivity.grid.tolist()}
        if tokenizer is not None and self.allocation == "searched":  # the allocation's score on held-out ids
            held = self.heldout(tokenizer)
            self.provenance["search"].update(heldout_objective=search.OBJECTIVE, heldout_shape=list(held.shape),
                                             heldout_kl={str(self.budget): search.heldout_kl(model, self, held)})
        return self

    def ranks(self, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, H_kv) key and value ranks."""
        uniform = torch.full((spec.n_layers, spec.n_kv_heads), max(1, round(self.budget * spec.head_dim)))
        keys = values = uniform
        if self.key_ranks is None and self.allocation == "split":
            raise RuntimeError("allocation='split' needs its K/V split: call .prepare(model, tokenizer) or "
                               ".search_split(model, data=ids) first")
        if self.key_ranks is None and self.allocation == "searched":
            if self.sensitivity is None:
                raise RuntimeError("allocation='searched' needs a rank sensitivity table: call .prepare(model, "
                                   "tokenizer) or .search(model, data=ids) first")
            from ..fit.search import allocate

            keys, values = allocate(self.sensitivity, self.budget)
        keys = torch.as_tensor(self.key_ranks) if self.key_ranks is not None else keys
        values = torch.as_tensor(self.value_ranks) if self.value_ranks is not None else values
        for what, r in (("key_ranks", keys), ("value_ranks", values)):
            if r.shape != uniform.shape or r.min() < 1 or r.max() > spec.head_dim:
                raise ValueError(f"{what} must be {tuple(uniform.shape)} (layers, kv heads) with values in "
                                 f"1..{spec.head_dim}, got shape {tuple(r.shape)}")
        return keys, values

    def make_layer(self, layer_idx: int, spec: ModelSpec, rotary: Rotary | None = None):
        if not self.fitted:
            raise RuntimeError("PCA has no bases yet: call .fit(model, calib_ids) or .prepare(model, tokenizer)")
        self._check_rotary(rotary)
        key_ranks, value_ranks = self.ranks(spec)
        heads = range(spec.n_kv_heads)
        return ProjectedLayer(
            layer_idx,
            [self.key_bases[layer_idx, h, :, : key_ranks[layer_idx, h]] for h in heads],
            [self.value_bases[layer_idx, h, :, : value_ranks[layer_idx, h]] for h in heads],
            sinks=self.sinks, rotary=rotary,
            value_decoders=None if self.value_decoders is None else
            [self.value_decoders[layer_idx, h, :, : value_ranks[layer_idx, h]] for h in heads],
        )

    def _check_rotary(self, rotary) -> None:
        if self.keys == "pre_rope" and rotary is None:
            raise ValueError(f"{self.name} with keys='pre_rope' rotates the rebuilt keys with the model's rotary: "
                             "build caches with new_cache(model) (or pass rotary=Rotary.from_model(model, layer))")

    # ---- persistence
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"key_bases": self.key_bases, "value_bases": self.value_bases}
        if self.value_decoders is not None:
            tensors["value_decoders"] = self.value_decoders
        if self.sensitivity is not None:
            tensors.update(self.sensitivity.tensors())
        return tensors

    def _record(self, model=None) -> dict:
        record = {"options": artefacts.jsonable_options({k: v for k, v in self.options().items() if k != "source"}),
                  "metrics": self.metrics, "provenance": self.provenance}
        if model is not None:
            record["model"] = artefacts.model_fingerprint(model)
        return record

    def save(self, path: str | Path, model=None, metrics: dict | None = None) -> Path:
        """Write the fitted tensors to ``path`` (.safetensors) and the record to ``path`` with suffix .json. Pass
        the ``model`` they were fitted to so the record carries its fingerprint (needed for shipped artefacts)."""
        if not self.fitted:
            raise RuntimeError(f"nothing to save: {self.name} has no bases yet (fit or prepare first)")
        if metrics:
            self.metrics.update(metrics)
        return artefacts.write(path, self.name, self._tensors(), self._record(model))

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "PCA":
        """A method with the tensors of artefact ``path`` and the options of its record (``overrides`` win)."""
        return artefacts.load_method(cls, path, **overrides)

    def _adopt(self, path: Path, model) -> None:
        """Take the tensors of artefact ``path`` and its fit options into this method."""
        tensors, record = artefacts.read(path, self.name)
        artefacts.adopt_fit_options(self, path, record, self.FIT_OPTIONS)
        spec = ModelSpec.from_model(model)
        want = (spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.head_dim)
        if tuple(tensors["key_bases"].shape) != want:
            raise ValueError(f"{path} holds bases of shape {tuple(tensors['key_bases'].shape)}, the model needs {want}")
        self._take(tensors, record, path)

    def _take(self, tensors: dict, record: dict, path) -> None:
        from ..fit.search import Sensitivity

        keys, values = tensors.get("key_bases"), tensors.get("value_bases")
        if keys is None or values is None or keys.ndim != 4 or keys.shape != values.shape:
            raise ValueError(f"{path} must hold key_bases and value_bases of one shape (layers, kv heads, D, D)")
        decoders = tensors.get("value_decoders")
        if (decoders is not None) != (self.values == "output_aware"):
            fitted = "output_aware" if decoders is not None else "plain"
            raise ValueError(f"{path} holds values={fitted!r} bases but the method asks values={self.values!r}: use "
                             f"values={fitted!r} with this artefact, or fit one with values={self.values!r}")
        if decoders is not None and decoders.shape != values.shape:
            raise ValueError(f"{path}: value_decoders {tuple(decoders.shape)} must match value_bases {tuple(values.shape)}")
        for what in ("key_bases",) + (("value_bases",) if decoders is None else ()):
            for i, basis in enumerate(tensors[what].reshape(-1, *keys.shape[-2:])):
                check_orthonormal(basis, f"{path}:{what}[{i // keys.shape[1]}, {i % keys.shape[1]}]")
        fitted = record.get("options", {}).get("keys", "post_rope")  # artefacts before key modes: post-RoPE
        if fitted != self.keys:
            raise ValueError(f"{path} holds key bases fitted on {fitted} keys but the method asks keys={self.keys!r}: "
                             f"use keys={fitted!r} with this artefact, or fit one with keys={self.keys!r}")
        self.key_bases, self.value_bases, self.value_decoders = keys, values, decoders
        self.sensitivity = Sensitivity.from_tensors(tensors)
        self.provenance = record.get("provenance", {})
        self.metrics = record.get("metrics", {})
        self.provenance["loaded_from"] = str(path)
