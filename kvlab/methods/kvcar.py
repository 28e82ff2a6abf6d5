"""KV-CAR autoencoders (feature axis): the cache stores a d-dimensional code of every key and value vector.

Paper: "KV-CAR: KV Cache Compression using Autoencoders and KV Reuse in Large Language Models" (2025); no public
code, so this follows the paper's description. Its reuse half is :class:`~kvlab.methods.reuse.Reuse`.

What is stored. For every *compressed* layer l there is one encoder/decoder pair for keys and one for values,
**shared by all kv heads of the layer** (the heads' vectors are pooled for training). A key or value vector
x (D = head_dim) is stored as its code c = enc(x) (d < D features, at the cache dtype) and attention reads the
decoded dec(c) (:class:`AutoencodedLayer`); uncompressed layers keep a :class:`~kvlab.cache.FullLayer`. Keys are
compressed **post-RoPE** (what the cache holds, as in kvlab's PCA): decoding needs no positions and no second
rotation, at the price of the encoder seeing position-rotated vectors. New entries are encoded when attention
reads them, so the current step's own entries are read through their code too ("compressed attention
throughout"). Optionally the first ``sinks`` positions of every sequence stay uncompressed (kvlab's remedy for
attention sinks, shared with PCA; not in the paper; ``sinks=0`` is the paper's plain autoencoder).

Architectures (``arch``), each acting on x normalised by fixed per-(layer, K/V) calibration statistics,
x_n = (x - shift) / scale (shift: the mean vector, scale: the RMS of x - shift), and undone after decoding:

* ``"linear"``: enc(x) = x_n A + a (D -> d), dec(c) = (c B + b) * scale + shift (d -> D), with biases;
* ``"mlp"``: one hidden layer of ``hidden`` units (default D) with GELU in each of encoder and decoder:
  D -> hidden -> d and d -> hidden -> D.

Training (:meth:`KVCAR.fit`):

1. reconstruction: keys/values of the calibration chunks are captured (:func:`kvlab.capture`, positions < sinks
   left out) and every (layer, K/V) autoencoder minimises the relative MSE ||dec(enc(x)) - x||^2 / ||x - shift||^2
   (Adam, ``recon_steps`` steps of ``recon_batch`` vectors, cosine-decayed ``recon_lr``; 1/8 of the vectors held
   out for ``metrics["recon"]``). ``init="pca"`` (the default for ``linear``) starts the linear autoencoder at the
   top-d principal components of x_n, which *is* the exact minimiser of this loss, so no gradient steps are run for
   it; ``init="random"`` (the only choice for ``mlp``) starts from nn.Linear's initialisation and takes the steps;
2. distillation: ``steps`` steps of :func:`kvlab.fit.train.distill` (model frozen, only the autoencoders of the
   compressed layers learn; 0.25 KL(teacher || student) + 0.75 CE by default).

Budget rule (the fraction of the full cache's bytes kept). With L layers, head_dim D and n compressed layers at
code dimension d, codes keep 1 - n (1 - d/D) / L of the bytes (sink copies, if any, come on top, as in PCA):

* ``layers`` given (list of layer indices): d = floor(D (1 - (1 - budget) L / n)), the largest code meeting the
  budget (d = D at budget 1: an autoencoder that saves nothing, useful to check it is lossless);
* ``layers=None``: d = ``code_dim`` (an int in 1..D-1 or a fraction of D in (0, 1); default
  min(D/4, floor(budget D)), rounded) and n = ceil((1 - budget) L / (1 - d/D)), the fewest layers meeting the
  budget. Which n layers: the n with the lowest measured cost ``layer_scores`` (``selection="kl"``: KL(full ||
  model with only that layer autoencoded) on ``score_chunks`` calibration chunks, after stage 1; ``"mse"``: the
  held-out relative reconstruction error of its keys and values, averaged). Costs are assumed additive, as in
  :mod:`kvlab.fit.search`, so picking the cheapest layers is the greedy choice. All layers get an autoencoder in
  stage 1 (the selection needs them); stage 2 trains those of the selected layers. ``budget=1`` compresses no
  layer: exactly the full cache.

Give ``code_dim`` or ``layers``, not both: the other follows from the budget.

Where the fitted tensors come from (``source``): ``"shipped"`` (default) uses an artefact under ``data/kvcar/``
made for this model with the same ``FIT_OPTIONS``, else fits; a path loads that artefact; None always fits.
``save``/``load``: safetensors + a JSON provenance record (:mod:`kvlab.methods.artefacts`).

    press = KVCAR(budget=0.5, steps=50).prepare(model, tok)          # capture, reconstruct, select, distil
    press = KVCAR(budget=0.5, layers=[4, 5, 6]).fit(model, calib_ids, steps=0)
    with press.apply(model) as cache:
        model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    press.save("runs/kvcar.safetensors", model=model); press = KVCAR.load("runs/kvcar.safetensors")
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F

from .. import attention
from ..cache.base import FullLayer, KVLabCache
from ..models import ModelSpec
from . import artefacts
from .base import Method
from ..cache.coded import CodedLayer

ARCHS = ("linear", "mlp")
INITS = ("pca", "random")
SELECTIONS = ("kl", "mse")
PARTS = ("K", "V")  # group g of the stacked weights = 2 * slot + part (0 keys, 1 values)


def _weights(arch: str, head_dim: int, code_dim: int, hidden: int) -> list[tuple[str, int, int]]:
    """(name, fan_in, fan_out) of the affine maps of one autoencoder."""
    if arch == "linear":
        return [("enc", head_dim, code_dim), ("dec", code_dim, head_dim)]
    return [("enc1", head_dim, hidden), ("enc2", hidden, code_dim), ("dec1", code_dim, hidden),
            ("dec2", hidden, head_dim)]


class Autoencoders(torch.nn.Module):
    """The keys' and values' autoencoders of ``layers``, weights stacked over groups g = 2 * slot + (0 K, 1 V).

    Parameters ``<map>_w`` (G, fan_in, fan_out) and ``<map>_b`` (G, fan_out); buffers ``shift`` (G, D), ``scale``
    (G,) (the input normalisation) and ``layer_index`` (n,). ``encode(x, g)``/``decode(c, g)`` act on the last axis
    of x (..., D) for one group; with ``g=None`` on x (G, N, D) for every group at once (batched matmuls).
    """

    def __init__(self, layers: list[int], head_dim: int, code_dim: int, arch: str = "linear",
                 hidden: int | None = None, seed: int = 0):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
        if not 1 <= code_dim <= head_dim:
            raise ValueError(f"code_dim must be in 1..{head_dim} (head_dim), got {code_dim}")
        self.arch, self.head_dim, self.code_dim = arch, int(head_dim), int(code_dim)
        self.hidden = int(hidden or head_dim) if arch == "mlp" else 0
        self.layers = [int(l) for l in layers]
        self.slot = {l: i for i, l in enumerate(self.layers)}
        groups = 2 * len(self.layers)
        g = torch.Generator().manual_seed(seed)
        for name, fan_in, fan_out in _weights(arch, self.head_dim, self.code_dim, self.hidden):
            bound = fan_in ** -0.5  # nn.Linear's default initialisation
            self.register_parameter(f"{name}_w", torch.nn.Parameter((torch.rand(groups, fan_in, fan_out, generator=g)
                                                                     * 2 - 1) * bound))
            self.register_parameter(f"{name}_b", torch.nn.Parameter((torch.rand(groups, fan_out, generator=g)
                                                                     * 2 - 1) * bound))
        self.register_buffer("shift", torch.zeros(groups, self.head_dim))
        self.register_buffer("scale", torch.ones(groups))
        self.register_buffer("layer_index", torch.tensor(self.layers, dtype=torch.long))
        self.requires_grad_(False)  # trainable only inside KVCAR.train_mode() / stage 1

    def group(self, layer: int, part: int) -> int:
        return 2 * self.slot[layer] + part

    def _affine(self, x: torch.Tensor, name: str, g: int | None) -> torch.Tensor:
        w, b = getattr(self, f"{name}_w"), getattr(self, f"{name}_b")
        if g is None:
            return torch.baddbmm(b[:, None], x, w)  # (G, N, fan_out)
        return x @ w[g] + b[g]  # (..., fan_out)

    def _norm(self, g: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if g is None:
            return self.shift[:, None], self.scale[:, None, None]  # broadcast over (G, N, D)
        return self.shift[g], self.scale[g]

    def encode(self, x: torch.Tensor, g: int | None = None) -> torch.Tensor:
        shift, scale = self._norm(g)
        x = (x - shift) / scale
        if self.arch == "linear":
            return self._affine(x, "enc", g)
        return self._affine(F.gelu(self._affine(x, "enc1", g)), "enc2", g)

    def decode(self, code: torch.Tensor, g: int | None = None) -> torch.Tensor:
        shift, scale = self._norm(g)
        if self.arch == "linear":
            y = self._affine(code, "dec", g)
        else:
            y = self._affine(F.gelu(self._affine(code, "dec1", g)), "dec2", g)
        return y * scale + shift

    @torch.no_grad()
    def set_normalisation(self, data: torch.Tensor) -> None:
        """shift = mean, scale = RMS of (x - mean), per group, from data (G, N, D)."""
        self.shift.copy_(data.mean(1))
        self.scale.copy_((data - self.shift[:, None]).pow(2).mean((1, 2)).sqrt().clamp_min(1e-6))

    @torch.no_grad()
    def init_pca(self, data: torch.Tensor) -> None:
        """Linear autoencoders at the top-d principal components of the normalised data (G, N, D): the exact
        minimiser of the reconstruction MSE (call set_normalisation first)."""
        if self.arch != "linear":
            raise ValueError("init='pca' needs arch='linear' (an MLP has no closed-form start); use init='random'")
        x = (data - self.shift[:, None]) / self.scale[:, None, None]  # (G, N, D), centred
        cov = x.transpose(1, 2).double() @ x.double() / x.shape[1]  # (G, D, D)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        top = vectors.flip(-1)[..., : self.code_dim].float()  # (G, D, d)
        self.enc_w.copy_(top)
        self.dec_w.copy_(top.transpose(1, 2))
        self.enc_b.zero_()
        self.dec_b.zero_()

    def tensors(self, prefix: str = "ae.") -> dict[str, torch.Tensor]:
        return {prefix + k: v.detach() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "ae.") -> "Autoencoders | None":
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not own:
            return None
        arch = "linear" if "enc_w" in own else "mlp"
        needed = {f"{name}_{x}" for name, *_ in _weights(arch, 1, 1, 1) for x in "wb"} | {"shift", "scale",
                                                                                           "layer_index"}
        if not needed <= set(own):
            raise ValueError(f"autoencoder tensors are incomplete: found {sorted(own)}")
        head_dim = own["shift"].shape[1]
        code_dim = own["enc_w" if arch == "linear" else "enc2_w"].shape[2]
        hidden = own["enc1_w"].shape[2] if arch == "mlp" else None
        module = cls(own["layer_index"].long().tolist(), head_dim, code_dim, arch, hidden)
        own["layer_index"] = own["layer_index"].long()
        module.load_state_dict(own, strict=True)
        return module


class AutoencodedLayer(CodedLayer):
    """A cache layer storing codes (B, H_kv, T, d) of its keys and values; attention reads the decoded (B, H_kv,
    T, D). The first ``sinks`` positions are also kept uncompressed (:class:`~kvlab.cache.coded.CodedLayer`)."""

    def __init__(self, layer_idx: int, autoencoders: Autoencoders, sinks: int = 0):
        super().__init__(layer_idx, sinks)
        if layer_idx not in autoencoders.slot:
            raise ValueError(f"no autoencoder for layer {layer_idx}; it has layers {autoencoders.layers}")
        self.autoencoders = autoencoders
        self.code_dim = autoencoders.code_dim
        self.key_codes = self.value_codes = None  # (B, H_kv, T, d)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.autoencoders, self.sinks)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        dim = self.autoencoders.head_dim
        if self.head_dim != dim or self.value_dim != dim:
            raise ValueError(f"layer {self.layer_idx}: autoencoders for head_dim {dim}, the model's keys/values have "
                             f"{self.head_dim}/{self.value_dim}")

    def _code(self, x: torch.Tensor, part: int) -> torch.Tensor:
        ae = self.autoencoders
        return ae.encode(x.to(ae.shift.dtype), ae.group(self.layer_idx, part)).to(x.dtype)  # (B, H_kv, T, d)

    def _decoded(self, code: torch.Tensor, part: int) -> torch.Tensor:
        ae = self.autoencoders
        return ae.decode(code.to(ae.shift.dtype), ae.group(self.layer_idx, part)).to(code.dtype)  # (B, H_kv, T, D)

    def _append_codes(self, keys, values) -> None:
        k_code, v_code = self._code(keys, 0), self._code(values, 1)
        if self.length:
            k_code, v_code = torch.cat([self.key_codes, k_code], dim=2), torch.cat([self.value_codes, v_code], dim=2)
        self.key_codes, self.value_codes = k_code, v_code

    def _decode_all(self):
        keys, values = self._decoded(self.key_codes, 0), self._decoded(self.value_codes, 1)
        if self.sink_slots is not None:  # sinks are written in place; decoded tensors may be saved for backward
            keys, values = keys.clone(), values.clone()
        return keys, values

    def code_tensors(self):
        return [t for t in (self.key_codes, self.value_codes) if t is not None]

    def dims_kept(self, part: str, head: int) -> int:
        return self.code_dim

    def _select_codes(self, indices) -> None:
        self.key_codes, self.value_codes = self.key_codes[indices], self.value_codes[indices]


@dataclass(eq=False)
class KVCAR(Method):
    """KV-CAR autoencoders (see the module docstring). ``autoencoders``: the fitted :class:`Autoencoders`;
    ``layer_scores``: (L,) measured cost of compressing each layer alone (lower = compressed first)."""

    name: ClassVar[str] = "kvcar"
    axes: ClassVar[tuple[str, ...]] = ("feature",)

    budget: float = 0.5
    code_dim: int | float | None = None  # layers=None: the code size (int or fraction of D); default min(D/4, bD)
    layers: list | None = None  # explicit compressed layers (code size then follows from the budget)
    arch: str = "linear"  # "linear" or "mlp"
    hidden: int | None = None  # mlp hidden units (default head_dim)
    init: str | None = None  # "pca" (linear only) or "random"; None: pca for linear, random for mlp
    sinks: int = 4  # first positions kept uncompressed (0: the paper's plain autoencoder)
    selection: str = "kl"  # how layers are chosen when layers=None: "kl" (measured) or "mse" (reconstruction)
    corpus: str = "wiki"
    calib_chunks: int = 8  # stage 1: chunks of chunk_len tokens of the corpus' calib split
    chunk_len: int = 512
    recon_steps: int = 1000
    recon_lr: float = 3e-3
    recon_batch: int = 1024
    score_chunks: int = 2  # layer selection: chunks of score_chunk_len tokens
    score_chunk_len: int = 256
    steps: int = 50  # stage 2 (distillation) steps
    lr: float = 1e-3
    batch_size: int = 2
    train_chunk_len: int = 256
    train_chunks: int = 256
    kl_weight: float = 0.25
    ce_weight: float = 0.75
    seed: int = 0
    source: str | None = "shipped"  # "shipped", a path to an artefact, or None (always fit)
    autoencoders: Autoencoders | None = field(default=None, repr=False)
    layer_scores: torch.Tensor | None = field(default=None, repr=False)

    FIT_OPTIONS: ClassVar[tuple[str, ...]] = (
        "budget", "code_dim", "layers", "arch", "hidden", "init", "sinks", "selection", "corpus", "calib_chunks",
        "chunk_len", "recon_steps", "recon_lr", "recon_batch", "score_chunks", "score_chunk_len", "steps", "lr",
        "batch_size", "train_chunk_len", "train_chunks", "kl_weight", "ce_weight", "seed")

    def __post_init__(self):
        super().__post_init__()
        self._check_options()
        self.provenance: dict = getattr(self, "provenance", None) or {}
        self.provenance.setdefault("runs", [])
        self.metrics: dict = getattr(self, "metrics", None) or {}
        self.history = None  # pandas DataFrame of every distillation step so far

    # ---- options
    def _check_options(self) -> None:
        def positive_int(name, zero_ok=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
                raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} int, got {value!r}")

        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.init not in (None,) + INITS:
            raise ValueError(f"unknown init {self.init!r}; allowed: None, {', '.join(INITS)}")
        if self.init == "pca" and self.arch != "linear":
            raise ValueError("init='pca' needs arch='linear'; arch='mlp' allows init='random' (or None)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; allowed: {', '.join(SELECTIONS)}")
        if self.hidden is not None:
            positive_int("hidden")
        c = self.code_dim
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))
                              or (isinstance(c, int) and c < 1) or (isinstance(c, float) and not 0 < c < 1)):
            raise ValueError(f"code_dim must be None, an int >= 1 (features) or a fraction of head_dim in (0, 1), "
                             f"got {c!r}")
        if self.layers is not None:
            ok = isinstance(self.layers, (list, tuple)) and len(self.layers) > 0 and all(
                isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in self.layers)
            if not ok or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be None or a non-empty list of distinct layer indices >= 0, "
                                 f"got {self.layers!r}")
            if c is not None:
                raise ValueError("give code_dim or layers, not both: with layers the code size follows from the "
                                 "budget, with code_dim the number of layers does")
        for name in ("sinks", "calib_chunks", "chunk_len", "recon_steps", "steps", "train_chunks",
                     "train_chunk_len", "score_chunks", "score_chunk_len"):
            positive_int(name, zero_ok=name in ("sinks", "recon_steps", "steps"))
        positive_int("recon_batch")
        positive_int("batch_size")
        for name in ("lr", "recon_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ValueError(f"kl_weight and ce_weight must be >= 0 and not both 0, got {self.kl_weight}, "
                             f"{self.ce_weight}")

    @property
    def init_used(self) -> str:
        return self.init or ("pca" if self.arch == "linear" else "random")

    # ---- the budget rule
    def resolved_code_dim(self, spec: ModelSpec) -> int:
        """The code dimension for ``layers=None`` (``code_dim`` resolved, or the default min(D/4, bD))."""
        dim = spec.head_dim
        if self.code_dim is None:
            return max(1, min(round(dim / 4), math.floor(self.budget * dim + 1e-9)))
        d = round(self.code_dim * dim) if isinstance(self.code_dim, float) else self.code_dim
        if not 1 <= d < dim:
            raise ValueError(f"code_dim must be in 1..{dim - 1} (head_dim {dim}; a code of {dim} features saves "
                             f"nothing) or a fraction in (0, 1), got {self.code_dim!r} -> {d}")
        return d

    def _checked_layers(self, spec: ModelSpec) -> list[int]:
        bad = [l for l in self.layers if not 0 <= l < spec.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {spec.n_layers} layers "
                             f"(allowed 0..{spec.n_layers - 1})")
        return sorted(self.layers)

    def n_compressed(self, spec: ModelSpec) -> int:
        """How many layers the budget needs at the code dimension (``layers=None``)."""
        if self.budget >= 1.0:
            return 0
        n_layers, dim = spec.n_layers, spec.head_dim
        d = self.resolved_code_dim(spec)
        n = math.ceil((1.0 - self.budget) * n_layers / (1.0 - d / dim) - 1e-9)
        if n > n_layers:
            lowest = d / dim
            raise ValueError(f"budget {self.budget} cannot be met with code_dim {d} of {dim}: even all {n_layers} "
                             f"layers compressed keep {lowest:.4f}; allowed budgets: [{lowest:.4f}, 1], or a smaller "
                             f"code_dim")
        return n

    def plan(self, spec: ModelSpec) -> tuple[list[int], int]:
        """(compressed layers ascending, code dimension) at this budget; see the module docstring for the rule."""
        n_layers, dim = spec.n_layers, spec.head_dim
        if self.layers is not None:
            layers = self._checked_layers(spec)
            n = len(layers)
            d = math.floor(dim * (1.0 - (1.0 - self.budget) * n_layers / n) + 1e-9)
            if d < 1:
                lowest = 1.0 - n * (1.0 - 1.0 / dim) / n_layers
                raise ValueError(f"budget {self.budget} cannot be met by compressing only layers {layers}: a code of "
                                 f"1 feature keeps {lowest:.4f}; allowed budgets: [{lowest:.4f}, 1], or compress "
                                 f"more layers")
            return layers, d
        n = self.n_compressed(spec)
        d = self.resolved_code_dim(spec) if n else dim
        if n in (0, n_layers):
            return list(range(n)), d
        if self.layer_scores is None:
            raise RuntimeError(f"KVCAR needs measured layer costs to choose {n} of {n_layers} layers: call "
                               ".fit(model, calib_ids) or .prepare(model, tokenizer), or give layers=")
        scores = torch.as_tensor(self.layer_scores, dtype=torch.float64).nan_to_num(nan=math.inf)
        if scores.shape != (n_layers,):
            raise ValueError(f"layer_scores are for {tuple(scores.shape)} layers, the model has {n_layers}")
        return sorted(torch.argsort(scores, stable=True)[:n].tolist()), d

    def kept_fraction(self, spec: ModelSpec) -> float:
        """Fraction of the full cache's bytes the codes keep (sink copies not counted)."""
        layers, d = self.plan(spec)
        return 1.0 - len(layers) * (1.0 - d / spec.head_dim) / spec.n_layers

    def _fit_layers(self, spec: ModelSpec) -> tuple[list[int], int]:
        """(layers that get an autoencoder in stage 1, code dim): explicit layers, else every layer."""
        if self.layers is not None:
            return self.plan(spec)
        n = self.n_compressed(spec)
        return (list(range(spec.n_layers)), self.resolved_code_dim(spec)) if n else ([], spec.head_dim)

    # ---- caches
    def _fits(self, spec: ModelSpec, layers: list[int], code_dim: int) -> bool:
        ae = self.autoencoders
        return (ae is not None and ae.head_dim == spec.head_dim and ae.code_dim == code_dim
                and set(layers) <= set(ae.layers))

    def _ready_autoencoders(self, spec: ModelSpec) -> tuple[list[int], Autoencoders | None]:
        layers, d = self.plan(spec)
        if not layers:
            return layers, None
        if self.autoencoders is None:
            raise RuntimeError("KVCAR has no autoencoders yet: call .fit(model, calib_ids) or .prepare(model, "
                               "tokenizer)")
        if not self._fits(spec, layers, d):
            ae = self.autoencoders
            raise ValueError(f"the autoencoders are for head_dim {ae.head_dim}, code_dim {ae.code_dim}, layers "
                             f"{ae.layers}; budget {self.budget} on this model needs head_dim {spec.head_dim}, "
                             f"code_dim {d}, layers {layers}: refit (fit/prepare) or change the budget")
        return layers, self.autoencoders

    def make_layer(self, layer_idx: int, spec: ModelSpec):
        layers, ae = self._ready_autoencoders(spec)
        return AutoencodedLayer(layer_idx, ae, self.sinks) if layer_idx in layers else FullLayer(layer_idx)

    def new_cache(self, model):
        spec = ModelSpec.from_model(model)
        layers, ae = self._ready_autoencoders(spec)
        return KVLabCache([AutoencodedLayer(i, ae, self.sinks) if i in layers else FullLayer(i)
                           for i in range(spec.n_layers)])

    def with_budget(self, budget: float) -> "KVCAR":
        """The same autoencoders at another budget (``layers=None``: reselected from ``layer_scores``)."""
        other = dataclasses.replace(self, budget=budget)
        other.provenance, other.metrics, other.history = self.provenance, dict(self.metrics), self.history
        return other

    # ---- training hooks of kvlab.fit.train.distill
    def trainable(self) -> Autoencoders:
        if self.autoencoders is None:
            raise RuntimeError("KVCAR has no autoencoders yet: call .fit(model, calib_ids) or .prepare(model, "
                               "tokenizer)")
        return self.autoencoders

    @contextmanager
    def train_mode(self) -> Iterator[Autoencoders]:
        """Inside: the autoencoders' parameters require grad (caches read them live); frozen again on exit."""
        module = self.trainable()
        module.requires_grad_(True)
        try:
            yield module
        finally:
            module.requires_grad_(False)

    # ---- fitting
    def fit(self, model, calib: torch.Tensor, *, train_data: torch.Tensor | None = None,
            score_data: torch.Tensor | None = None, eval_data: torch.Tensor | None = None, steps: int | None = None,
            recon_steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
            seed: int | None = None, max_seconds: float | None = None, callback=None,
            progress: bool = True) -> "KVCAR":
        """Stage 1 (reconstruction on K/V captured from ``calib`` (N, T) ids) unless fitting autoencoders exist,
        the layer costs if the selection needs them (on ``score_data``, default the first ``score_chunks`` rows of
        ``calib`` cut to ``score_chunk_len``), then ``steps`` distillation steps on ``train_data`` (default
        ``calib``). Keyword options override (and update) the fields; fitting again continues stage 2. With
        ``eval_data`` the distillation loss is measured before and after (``metrics``)."""
        from ..fit import train

        spec = ModelSpec.from_model(model)
        with self.overridden(steps=steps, recon_steps=recon_steps, lr=lr, batch_size=batch_size, seed=seed):
            self._check_options()
            calib = train.check_tokens(calib, "calib")
            train_data = train.check_tokens(train_data if train_data is not None else calib, "train_data")
            if self.steps and self.batch_size > train_data.shape[0]:
                raise ValueError(f"batch_size={self.batch_size} but train_data has only {train_data.shape[0]} rows")
            if calib.shape[1] <= self.sinks:
                raise ValueError(f"calib chunks of {calib.shape[1]} tokens leave nothing after the {self.sinks} sinks")
            fit_layers, d = self._fit_layers(spec)  # clear budget errors before any work
        if not fit_layers:
            self.provenance["note"] = "budget 1 with layers=None compresses no layer: nothing to fit"
            return self
        if not self._fits(spec, fit_layers, d):
            self._reconstruction_stage(model, calib, fit_layers, d, progress)
            self.layer_scores = None
        if self.layers is None and self.layer_scores is None and self.n_compressed(spec) < spec.n_layers:
            if score_data is None:
                score_data = calib[: self.score_chunks, : self.score_chunk_len]
            self.score_layers(model, train.check_tokens(score_data, "score_data"))
        if eval_data is not None:
            self.metrics.setdefault("eval_before", train.evaluate_loss(
                model, self, eval_data, batch_size=self.batch_size, kl_weight=self.kl_weight,
                ce_weight=self.ce_weight))
        if self.steps:
            result = train.distill(model, self, train_data, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                                   kl_weight=self.kl_weight, ce_weight=self.ce_weight, seed=self.seed,
                                   max_seconds=max_seconds, callback=callback, progress=progress)
            self._log_run(result, spec)
        if eval_data is not None:
            self.metrics["eval_after"] = train.evaluate_loss(
                model, self, eval_data, batch_size=self.batch_size, kl_weight=self.kl_weight, ce_weight=self.ce_weight)
        return self

    @torch.no_grad()
    def _collect(self, model, ids: torch.Tensor, layers: list[int], batch: int = 4) -> torch.Tensor:
        """Keys and values of ``layers`` over ``ids``, positions < sinks left out: (G = 2 n, N, D)."""
        from ..capturing import capture

        parts: list[list[torch.Tensor]] = [[] for _ in range(2 * len(layers))]
        for start in range(0, ids.shape[0], batch):
            cap = capture(model, ids[start: start + batch], what=("keys", "values"), layers=layers)
            for slot, l in enumerate(layers):
                for part, store in enumerate((cap.keys, cap.values)):
                    x = store[l][:, :, self.sinks:].float()  # (B, H_kv, T - sinks, D)
                    parts[2 * slot + part].append(x.reshape(-1, x.shape[-1]))
        return torch.stack([torch.cat(p) for p in parts])  # (G, N, D)

    def _reconstruction_stage(self, model, calib: torch.Tensor, layers: list[int], code_dim: int,
                              progress: bool) -> None:
        """Stage 1: fresh autoencoders for ``layers`` trained (or, linear + pca, solved) on reconstruction."""
        from tqdm.auto import tqdm

        tic = time.perf_counter()
        spec = ModelSpec.from_model(model)
        data = self._collect(model, calib, layers)  # (G, N, D)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(data.shape[1], generator=generator)
        n_held = data.shape[1] // 8  # held out for the metrics (none if there are fewer than 8 vectors)
        fit = data[:, order[n_held:]]
        held = data[:, order[:n_held]] if n_held else fit
        ae = Autoencoders(layers, spec.head_dim, code_dim, self.arch, self.hidden, seed=self.seed)
        ae.set_normalisation(fit)
        before = self._relative_error(ae, held)
        steps, history = 0, []
        if self.init_used == "pca":
            ae.init_pca(fit)
        elif self.recon_steps:
            params = list(ae.parameters())
            ae.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=self.recon_lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / self.recon_steps)))
            batch = min(self.recon_batch, fit.shape[1])
            try:
                for step in tqdm(range(self.recon_steps), desc="kvcar reconstruction", disable=not progress):
                    rows = torch.randint(fit.shape[1], (batch,), generator=generator)
                    x = fit[:, rows]  # (G, b, D)
                    err = (ae.decode(ae.encode(x)) - x).pow(2).mean((1, 2)) / ae.scale.pow(2)  # (G,) relative MSE
                    loss = err.sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    steps += 1
                    if step % max(1, self.recon_steps // 20) == 0 or step == self.recon_steps - 1:
                        history.append({"step": step, "relative_mse": round(loss.item() / len(err), 6)})
            finally:
                ae.requires_grad_(False)
        after = self._relative_error(ae, held)
        self.autoencoders = ae
        self.metrics["recon"] = {"layers": layers, "before": before.tolist(), "after": after.tolist(),
                                 "parts": "per layer: [K, V] relative MSE on held-out vectors"}
        self.provenance["recon"] = {"calib_shape": list(calib.shape), "vectors": int(fit.shape[1]),
                                    "held_out": int(held.shape[1]), "init": self.init_used, "steps": steps,
                                    "code_dim": code_dim, "seconds": round(time.perf_counter() - tic, 2),
                                    "history": history}

    @staticmethod
    @torch.no_grad()
    def _relative_error(ae: Autoencoders, data: torch.Tensor) -> torch.Tensor:
        """(n, 2) relative MSE ||dec(enc(x)) - x||^2 / ||x - shift||^2 per (layer, K/V) over data (G, N, D)."""
        err = (ae.decode(ae.encode(data)) - data).pow(2).sum((1, 2))
        energy = (data - ae.shift[:, None]).pow(2).sum((1, 2)).clamp_min(1e-30)
        return (err / energy).view(-1, 2)

    def reconstruction_error(self, model, ids: torch.Tensor) -> torch.Tensor:
        """(n, 2) relative reconstruction MSE of every fitted layer's [keys, values] on K/V captured from ``ids``."""
        ae = self.trainable()
        return self._relative_error(ae, self._collect(model, ids, ae.layers))

    @torch.no_grad()
    def score_layers(self, model, data: torch.Tensor) -> torch.Tensor:
        """Measure ``layer_scores`` (L,): per fitted layer, ``selection="kl"``: KL(full || model with only that
        layer autoencoded) over ``data`` (N, T) ids; ``"mse"``: its held-out relative reconstruction error (mean of
        K and V). Layers without an autoencoder score inf."""
        from ..fit import train
        from ..eval.forward import forward

        tic = time.perf_counter()
        spec = ModelSpec.from_model(model)
        ae = self.trainable()
        scores = torch.full((spec.n_layers,), math.inf, dtype=torch.float64)
        if self.selection == "mse":
            if "recon" not in self.metrics:
                raise RuntimeError("selection='mse' needs the held-out reconstruction errors of stage 1 (refit)")
            errors = torch.tensor(self.metrics["recon"]["after"], dtype=torch.float64)
            layers = self.metrics["recon"]["layers"]
            for slot, l in enumerate(layers):
                scores[l] = errors[slot].mean()
        else:
            batch = self.batch_size
            targets = [train.teacher_logprobs(model, data[s: s + batch]) for s in range(0, data.shape[0], batch)]
            with attention.attach(model):
                for l in ae.layers:
                    total = 0.0
                    for target, s in zip(targets, range(0, data.shape[0], batch)):
                        ids = data[s: s + batch]
                        cache = KVLabCache([AutoencodedLayer(i, ae, self.sinks) if i == l else FullLayer(i)
                                            for i in range(spec.n_layers)])
                        mask = torch.ones_like(ids)
                        pos = torch.arange(ids.shape[1]).expand_as(ids)
                        _, kl, _ = train.distill_loss(forward(model, ids, mask, pos, cache), target, ids, 1.0, 0.0)
                        total += kl.item() * ids.shape[0]
                    scores[l] = total / data.shape[0]
        self.layer_scores = scores.float()
        self.provenance["scores"] = {"selection": self.selection, "data_shape": list(data.shape),
                                     "seconds": round(time.perf_counter() - tic, 2)}
        return self.layer_scores

    def _log_run(self, result, spec: ModelSpec) -> None:
        import pandas as pd

        done = self.trained_steps
        history = result.history.assign(step=result.history["step"] + done)
        self.history = history if self.history is None else pd.concat([self.history, history], ignore_index=True)
        layers, d = self.plan(spec)
        self.provenance["runs"].append({
            **result.summary(), "budget": self.budget, "layers": layers, "code_dim": d, "sinks": self.sinks,
            "history": history[[c for c in ("step", "loss", "kl", "ce", "tokens", "seconds")
                                if c in history]].round(6).to_dict("records"),
        })

    @property
    def trained_steps(self) -> int:
        return sum(run["steps"] for run in self.provenance.get("runs", []))

    @property
    def trained_tokens(self) -> int:
        return sum(run["tokens"] for run in self.provenance.get("runs", []))

    def to_frame(self, spec: ModelSpec):
        """One row per layer: compressed at this budget, its measured score and held-out reconstruction errors."""
        import pandas as pd

        layers, d = self.plan(spec)
        recon = self.metrics.get("recon", {})
        errors = dict(zip(recon.get("layers", []), recon.get("after", [])))
        rows = []
        for l in range(spec.n_layers):
            k, v = errors.get(l, (float("nan"), float("nan")))
            rows.append(dict(layer=l, compressed=l in layers, code_dim=d if l in layers else spec.head_dim,
                             score=float(self.layer_scores[l]) if self.layer_scores is not None else float("nan"),
                             key_error=k, value_error=v))
        return pd.DataFrame(rows)

    # ---- ready to run
    @property
    def fitted(self) -> bool:
        return self.autoencoders is not None

    def _ready(self, spec: ModelSpec) -> bool:
        try:
            self._ready_autoencoders(spec)
        except (RuntimeError, ValueError):
            return False
        return True

    def prepare(self, model, tokenizer) -> "KVCAR":
        """Ready to run: nothing to do at budget 1 (layers=None) or with fitting autoencoders; else the artefact
        of ``source``, or a fit on the corpus' calib split (stage 1, selection, ``steps`` of stage 2)."""
        spec = ModelSpec.from_model(model)
        if self.layers is not None:  # budget errors before any work
            self.plan(spec)
        else:
            self.n_compressed(spec)
        if self._ready(spec):
            return self
        path = self._source_path(model)
        if path is not None:
            self._adopt(path, model)
            self._ready_autoencoders(spec)  # a loaded artefact that does not serve this budget says so
        else:
            self._fit_default(model, tokenizer)
        return self

    def _source_path(self, model) -> Path | None:
        if self.source is None:
            return None
        if self.source == "shipped":
            return artefacts.find_shipped(self.name, model, self.options(), self.FIT_OPTIONS)
        return Path(self.source)

    def _fit_default(self, model, tokenizer) -> None:
        from ..data import text_chunks

        calib = text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len, n_chunks=self.calib_chunks, split="calib")
        score = text_chunks(self.corpus, tokenizer, chunk_len=self.score_chunk_len, n_chunks=self.score_chunks,
                            split="calib", seed=1)
        chunks = None
        if self.steps:
            chunks = text_chunks(self.corpus, tokenizer, chunk_len=self.train_chunk_len, n_chunks=self.train_chunks,
                                 split="calib")
        print(f"kvcar: no artefact for this model and these options (source={self.source!r}); fitting "
              f"(reconstruction, then {self.steps} distillation steps; to ship one: "
              f"`{artefacts.fit_command(self.name, model)}`)", file=sys.stderr)
        self.fit(model, calib, train_data=chunks, score_data=score)

    # ---- persistence (safetensors + JSON record, see kvlab.methods.artefacts)
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.autoencoders.tensors()
        if self.layer_scores is not None:
            tensors["layer_scores"] = self.layer_scores
        return tensors

    def _record(self, model=None) -> dict:
        options = {k: v for k, v in self.options().items() if k != "source"}
        record = {"options": artefacts.jsonable_options(options), "metrics": self.metrics,
                  "provenance": self.provenance, "trained_steps": self.trained_steps,
                  "trained_tokens": self.trained_tokens,
                  "train_seconds": round(sum(run["seconds"] for run in self.provenance.get("runs", [])), 2),
                  "autoencoders": {"arch": self.autoencoders.arch, "layers": self.autoencoders.layers,
                                   "head_dim": self.autoencoders.head_dim, "code_dim": self.autoencoders.code_dim,
                                   "hidden": self.autoencoders.hidden}}
        if model is not None:
            record["model"] = artefacts.model_fingerprint(model)
        return record

    def save(self, path: str | Path, model=None, metrics: dict | None = None) -> Path:
        """Write the autoencoders (+ layer scores) to ``path`` (.safetensors) and the record to ``path`` with suffix
        .json. Pass the ``model`` they were fitted to so the record carries its fingerprint."""
        if self.autoencoders is None:
            raise RuntimeError("nothing to save: kvcar has no autoencoders yet (fit or prepare first)")
        if metrics:
            self.metrics.update(metrics)
        return artefacts.write(path, self.name, self._tensors(), self._record(model))

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "KVCAR":
        """A method with the tensors of artefact ``path`` and the options of its record (``overrides`` win)."""
        return artefacts.load_method(cls, path, **overrides)

    def _adopt(self, path: Path, model) -> None:
        """Take the tensors of artefact ``path`` and its fit options into this method."""
        tensors, record = artefacts.read(path, self.name)
        artefacts.adopt_fit_options(self, path, record, self.FIT_OPTIONS)
        self._take(tensors, record, path)
        spec = ModelSpec.from_model(model)
        ae = self.autoencoders
        if ae.head_dim != spec.head_dim or max(ae.layers) >= spec.n_layers:
            raise ValueError(f"{path} holds autoencoders for head_dim {ae.head_dim} and layers {ae.layers}; the model "
                             f"has head_dim {spec.head_dim} and {spec.n_layers} layers")

    def _take(self, tensors: dict, record: dict, path) -> None:
        ae = Autoencoders.from_tensors(tensors)
        if ae is None:
            raise ValueError(f"{path} holds no autoencoder tensors (ae.*)")
        self.autoencoders = ae
        self.layer_scores = tensors.get("layer_scores")
        self.provenance = record.get("provenance", {})
        self.provenance.setdefault("runs", [])
        self.metrics = record.get("metrics", {})
        self.provenance["loaded_from"] = str(path)
