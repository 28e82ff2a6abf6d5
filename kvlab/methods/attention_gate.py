"""Attention-Gate: a learned, in-context token eviction (one small gate per layer, per-kv-head keep flags).

Paper: Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate" (2024, arXiv:2410.12876). No public
code; this is kvlab's reading of the description, on the shared eviction storage
(:class:`~kvlab.cache.eviction.EvictionLayer`: per (row, kv head) the kept entries, a column index, ragged counts).

Gate (per layer ``l``, parameters only in :class:`GateWeights`; the model stays frozen)::

    x  = hidden states entering layer l's attention (B, T, d_model), after its input norm: the same tensor the
         K/V projections read, captured by a forward *pre-hook* on the attention module. The hooks exist only
         inside ``apply()``/``attached()`` and are removed on exit (no monkey-patching, nothing at import).
    x' = x / rms(x)                                          (parameter-free, so one init suits every model)
    s  = x' @ W_l + b_l                       (linear, ``hidden=0``)          -> (B, H_kv, T) scores, one per kv head
    s  = silu(x' @ W1_l + b1_l) @ W2_l + b2_l (tiny MLP, ``hidden=h``)

Masking rule (the same in training, teacher-forced passes and decoding): the query in column i sees key j < i iff
the model's own mask lets it (causality, padding, sliding windows) **and** token j's flag in that kv head is set,
or i - j < ``local`` (``local=1``: a token always sees itself and nothing else unflagged; ``local=w``: also the
w - 1 previous columns, padding columns included). The first ``sinks`` real tokens of a row are always flagged.
Padding is never flagged, stored, or counted.

Flags at inference (hard), ``selection``:

* ``"topk"`` (default): in every forward that feeds a row n >= 2 real tokens (the prefill, the teacher-forced
  pass, a continuation chunk), each (row, kv head) flags the ``max(1, round_half_up(budget x n))`` new real tokens
  with the highest scores (sinks first), so exactly ``budget`` of every chunk is kept in every head (mean over
  heads = budget) and heads keep equal counts. Ties go to the earlier token. A chunk's masks therefore use
  hindsight within the chunk (a token's flag depends on the scores of later tokens of the same chunk). A single
  new token (decoding) is flagged iff its score >= the lowest non-sink score flagged in that (row, head)'s last
  chunk (a per-(row, head) threshold, 4 bytes, calibrated on the prompt itself); so decoding keeps about the same
  fraction, and heads may then keep different counts.
* ``"threshold"``: a token is flagged iff its score > 0 (sigmoid > 1/2, the training rule): causal, so one
  teacher-forced pass equals prefill + token-by-token decoding exactly; the kept fraction is whatever the gate
  learned (``target``), not forced to ``budget``.

``budget=1.0`` flags everything (the full cache, exactly). After every forward the layer physically drops the
unflagged entries (keys, values and their column index are compacted into new tensors), except the last
``local - 1`` columns, which the next query still sees and which leave once they fall out of its window. Measured
bytes = kept entries + an int16 column index (+ (B, H_kv) thresholds): within 2 % of theoretical for head_dim >= 16
in fp32 after a prefill or continuation chunks of equal-length rows. Storage is dense per (row, head) up to the most
any head keeps, so rows of different lengths, or heads that keep different counts while decoding, leave empty slots
(allocated, so counted in measured bytes).

Protocols: ``"throughout"`` (one teacher-forced pass whose attention respects the flags: perplexity, zero-shot
tasks) and ``"context"`` (prefill with the flags, then continue; ``compress`` is a no-op, eviction already happened).

Training (:meth:`AttentionGate.fit`, continual pre-training on calibration text, model frozen) through the shared
loop :func:`kvlab.fit.train.distill`: loss = kl_weight KL(teacher || student) + ce_weight CE  +  sparsity, with

    sparsity = sparsity_weight * mean over (layer, kv head) of (keep_rate - target)^2,
    keep_rate = mean over the non-sink real tokens of the flags f,
    f = hard + p - p.detach(),   hard = [s > 0],   p = sigmoid(s)      (straight-through: hard forward, sigmoid grad)

The flags enter attention as the additive mask log(f) on the logits (0 or -inf), computed as a multiplicative mask on
exp(logits) so that its gradient at f = 0 is finite: d out_i / d f_j = e_ij (v_j - out_i) / sum_k f_k e_ik, the
effect of keeping token j. Each layer's sparsity term is collected during the forward and added to the loss by
:func:`kvlab.fit.train.distill` through ``auxiliary_loss()``; its value is logged per step (``history``: ``keep_rate``, ``sparsity``, ``total``). The gate reads its hidden states detached:
gradients reach gate l only through its own flags (their effect on the loss downstream, and its sparsity term), not
through the way earlier gates changed layer l's input.

    gate = AttentionGate(budget=0.5).prepare(model, tok)      # shipped artefact for this model, or trains (minutes)
    with gate.apply(model) as cache:
        model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    gate.save("runs/gate.safetensors", model=model); AttentionGate.load("runs/gate.safetensors")
"""

from __future__ import annotations

import dataclasses
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F

from .. import attention
from ..cache.base import KVLabCache
from ..capturing import attention_modules
from ..models import ModelSpec
from . import artefacts
from .base import Method
from ..cache.eviction import EvictionLayer

SELECTIONS = ("topk", "threshold")
LINEAR = ("w", "b")
MLP = ("w1", "b1", "w2", "b2")


# ------------------------------------------------------------------------------------------------------ the gate


class GateWeights(torch.nn.Module):
    """Per-layer gates, batched over layers: ``forward(layer, x (B, T, d)) -> scores (B, H_kv, T)`` (float32).

    ``hidden=0``: w (L, d, H_kv), b (L, H_kv); else w1 (L, d, h), b1 (L, h), w2 (L, h, H_kv), b2 (L, H_kv)."""

    def __init__(self, n_layers: int, hidden_size: int, n_kv_heads: int, hidden: int = 0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        L, d, H = n_layers, hidden_size, n_kv_heads
        if hidden == 0:
            self.w = torch.nn.Parameter(torch.randn(L, d, H, generator=g) * d**-0.5)
            self.b = torch.nn.Parameter(torch.zeros(L, H))
        else:
            self.w1 = torch.nn.Parameter(torch.randn(L, d, hidden, generator=g) * d**-0.5)
            self.b1 = torch.nn.Parameter(torch.zeros(L, hidden))
            self.w2 = torch.nn.Parameter(torch.randn(L, hidden, H, generator=g) * hidden**-0.5)
            self.b2 = torch.nn.Parameter(torch.zeros(L, H))

    @property
    def linear(self) -> bool:
        return hasattr(self, "w")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, d_model, kv heads, hidden)."""
        if self.linear:
            return (*self.w.shape, 0)
        L, d, h = self.w1.shape
        return L, d, self.w2.shape[-1], h

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, T, d) unit RMS
        if self.linear:
            s = x @ self.w[layer] + self.b[layer]
        else:
            s = F.silu(x @ self.w1[layer] + self.b1[layer]) @ self.w2[layer] + self.b2[layer]
        return s.transpose(1, 2)  # (B, H_kv, T)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str = "gate") -> "GateWeights":
        names = LINEAR if set(LINEAR) <= set(tensors) else MLP
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{where} must hold gate tensors {', '.join(LINEAR)} (linear) or {', '.join(MLP)} (MLP); "
                             f"missing {', '.join(missing)}")
        if names == LINEAR:
            L, d, H = tensors["w"].shape
            module = cls(L, d, H, 0)
        else:
            L, d, h = tensors["w1"].shape
            module = cls(L, d, tensors["w2"].shape[-1], h)
        with torch.no_grad():
            for name in names:
                param = getattr(module, name)
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise ValueError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                                     f"{tuple(param.shape)}")
                param.copy_(tensors[name].float())
        return module


def weighted_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                       weight: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Softmax attention with a multiplicative key mask, differentiable in ``weight``; fp32.

    query (B, H, Q, D); keys/values (B, H_kv, C, D/Dv); allowed bool (B, 1 or H_kv, Q, C) (the model's mask);
    weight (B, H_kv, Q, C) in [0, 1]: probs_ij = weight_ij exp(l_ij) / sum_k weight_ik exp(l_ik), i.e. logits + log(w).
    Returns (B, Q, H, Dv); rows with no allowed key (padding) get zeros."""
    batch, heads, n_query, dim = query.shape
    n_kv = keys.shape[1]
    group = heads // n_kv
    scale = scaling if scaling is not None else dim**-0.5
    q = query.float().reshape(batch, n_kv, group, n_query, dim)  # (B, H_kv, G, Q, D)
    logits = (q @ keys.float().unsqueeze(2).transpose(-1, -2)) * scale  # (B, H_kv, G, Q, C)
    logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    top = logits.detach().amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(logits - top) * weight.unsqueeze(2)  # (B, H_kv, G, Q, C)
    probs = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    out = probs @ values.float().unsqueeze(2)  # (B, H_kv, G, Q, Dv)
    return out.reshape(batch, heads, n_query, -1).transpose(1, 2).to(query.dtype)


# ------------------------------------------------------------------------------------------------------ cache layer


class GateLayer(EvictionLayer):
    """An eviction layer whose flags come from its method's gate at every forward; see the module docstring.

    Beyond :class:`EvictionLayer`'s storage: ``tau`` (B, H_kv) float32, the flag threshold for tokens after the
    first forward, and ``recent`` (B, H_kv, <= local - 1) bool, the flags of the last columns (still in the window)."""

    def __init__(self, layer_idx: int, policy: "AttentionGate"):
        super().__init__(layer_idx, policy)
        self.compressed = True  # eviction happens at every forward: the cache is always at its budget
        self.tau = None
        self.recent = None
        self._keep = None  # (B, H_kv, C) bool: slots to keep after the current forward

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        gate: AttentionGate = self.policy
        batch, _, n_query, _ = query.shape
        start = self.seen - n_query  # column of the first query
        full = self._full_mask(mask, batch, n_query)  # (B, 1, Q, seen)
        steps = torch.arange(n_query, device=query.device)
        real = full[:, 0, steps, start + steps]  # (B, Q): a token that does not see itself is padding
        before = self.real_seen.clone()
        self.real_seen += real.sum(-1)
        if not bool(real.all()):
            new = self.index[:, :, -n_query:]
            self.index[:, :, -n_query:] = new.masked_fill(~real[:, None, :], -1)
        slot_mask = self._slot_mask(full)  # (B, 1 or H_kv, Q, C)

        live = gate._live
        with torch.set_grad_enabled(live and torch.is_grad_enabled()):
            hidden = gate.take_hidden(self.layer_idx, batch, n_query).detach()  # the gate's own input: no gradient
            scores = gate.scores(self.layer_idx, hidden)  # (B, H_kv, Q)
        ordinal = before[:, None] + real.long().cumsum(-1) - 1  # (B, Q) rank among the row's real tokens
        sink = (real & (ordinal < gate.sinks))[:, None, :]  # (B, 1, Q)
        real3 = real[:, None, :]
        if live:
            hard = (scores > 0) | sink
            p = torch.sigmoid(scores)
            flags_new = (hard.float() + (p - p.detach()) * (~sink).float()) * real3.float()  # STE, (B, H_kv, Q)
        else:
            flags_new = self._hard_flags(scores.detach(), real3, sink)  # bool (B, H_kv, Q)

        heads, slots = self.index.shape[1], self.index.shape[2]
        cols = self.index.long()  # (B, H_kv, C), -1 = empty
        old = slots - n_query
        recent = self.recent
        window = max(int(gate.local) - 1, 0)
        flags_old = torch.ones(batch, heads, old, dtype=torch.bool, device=query.device)
        if window and recent is not None and recent.shape[-1] and old:
            first = start - recent.shape[-1]  # column of recent[..., 0]
            old_cols = cols[:, :, :old]
            inside = old_cols >= first
            look = (old_cols - first).clamp(min=0, max=recent.shape[-1] - 1)
            flags_old = torch.where(inside, recent.gather(-1, look), flags_old)
        if live:
            slot_flags = torch.cat([flags_old.float(), flags_new], dim=-1)  # (B, H_kv, C)
        else:
            slot_flags = torch.cat([flags_old, flags_new], dim=-1)
        qcols = (start + steps)[None, None, :, None]  # (1, 1, Q, 1)
        near = (qcols - cols[:, :, None, :]) < max(int(gate.local), 1)  # (B, H_kv, Q, C) within the local window
        if live:
            allowed = slot_mask.expand(batch, heads, n_query, slots)
            weight = torch.where(near, torch.ones_like(slot_flags[:, :, None, :]), slot_flags[:, :, None, :])
            weight = weight * allowed.float()
            out = weighted_attention(query, self.keys, self.values, allowed, weight, scaling)
            self._add_sparsity(flags_new, real3 & ~sink)
        else:
            visible = slot_mask & (slot_flags[:, :, None, :] | near)  # (B, H_kv, Q, C)
            out = attention.sdpa(query, self.keys, self.values, self._per_query_head(visible, query), scaling)

        hard_slots = slot_flags > 0.5 if live else slot_flags
        if window:
            self.recent = torch.cat([recent if recent is not None else hard_slots[:, :, :0],
                                     (hard_slots[:, :, old:] & real3)], dim=-1)[..., -window:].detach()
        in_window = cols >= self.seen - window  # the next query still sees these
        self._keep = (cols >= 0) & (hard_slots.detach() | in_window)
        self.evict(self._keep.sum(-1))
        self._keep = None
        return out

    def _hard_flags(self, scores: torch.Tensor, real3: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        """Inference flags (B, H_kv, Q) for the new tokens; sets ``tau`` at the first forward (see module doc)."""
        gate: AttentionGate = self.policy
        batch, heads, n_query = scores.shape
        if float(gate.budget) >= 1.0:
            if self.tau is None:
                self.tau = scores.new_full((batch, heads), float("-inf"))
            return real3.expand(batch, heads, n_query).clone()
        if gate.selection == "threshold":
            if self.tau is None:
                self.tau = scores.new_zeros(batch, heads)
            return ((scores > self.tau[..., None]) | sink) & real3
        n_real = real3[:, 0].sum(-1)  # (B,)
        k = torch.floor(float(gate.budget) * n_real.double() + 0.5).long().clamp(min=1)  # (B,)
        priority = torch.where(sink, torch.full_like(scores, float("inf")), scores)
        priority = priority.masked_fill(~real3, float("-inf"))
        order = priority.argsort(dim=-1, descending=True, stable=True)  # ties: the earlier token
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_query, device=scores.device)
                                                .expand_as(order))
        top = (rank < k[:, None, None]) & real3  # (B, H_kv, Q)
        tau = scores.masked_fill(~(top & ~sink), float("inf")).amin(-1)  # (B, H_kv); inf: only sinks kept
        if self.tau is None:  # the first forward: top-k for every row
            self.tau = tau
            return top
        chunk = (n_real >= 2)[:, None]  # rows feeding several real tokens: top-k; single tokens: the threshold
        flags = torch.where(chunk[..., None], top, ((scores >= self.tau[..., None]) | sink) & real3)
        self.tau = torch.where(chunk, tau, self.tau)
        return flags

    def _add_sparsity(self, flags: torch.Tensor, counted: torch.Tensor) -> None:
        """Collect this layer's sparsity term for the step (``AttentionGate.auxiliary_loss``)."""
        gate: AttentionGate = self.policy
        weight = counted.float()  # (B, 1, Q)
        n = weight.sum()
        if not float(n):
            return
        rate = (flags * weight).sum(dim=(0, 2)) / n  # (H_kv,) keep rate of the non-sink real tokens
        loss = float(gate.sparsity_weight) * (rate - gate.train_target).pow(2).mean() / gate._n_layers
        gate._stats.append((self.layer_idx, rate.detach().clone(), loss.detach().item()))
        if float(gate.sparsity_weight) and loss.requires_grad:
            gate._aux.append(loss)

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.policy)

    def tensors(self):
        return [*super().tensors(), *[t for t in (self.tau, self.recent) if t is not None]]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is None:
            return
        super().batch_select_indices(indices)
        indices = indices.to(self.keys.device)
        for name in ("tau", "recent"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices].contiguous())


# ------------------------------------------------------------------------------------------------------ the method


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_fraction(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] ({what}), got {value!r}")


@dataclass(eq=False)
class AttentionGate(Method):
    """``attention_gate``: learned in-context token eviction (see the module docstring for the rules and shapes)."""

    name: ClassVar[str] = "attention_gate"
    axes: ClassVar[tuple[str, ...]] = ("token",)
    protocols: ClassVar[tuple[str, ...]] = ("throughout", "context")
    decode: ClassVar[bool] = True  # the gate decides for every new token

    budget: float = 0.5
    selection: str = "topk"  # "topk" (exactly budget of the prefill per head) or "threshold" (score > 0)
    sinks: int = 4  # first real tokens of a row, always kept (counted in the budget)
    local: int = 16  # a query always sees the keys of its last `local` columns (1: itself only)
    hidden: int = 0  # gate MLP width; 0 = one linear layer per layer
    target: float | None = None  # training keep-rate target; None = budget
    sparsity_weight: float = 100.0
    corpus: str = "wiki"
    train_chunk_len: int = 256
    train_chunks: int = 128
    steps: int = 60
    lr: float = 1e-2
    batch_size: int = 2
    kl_weight: float = 0.25
    ce_weight: float = 0.75
    seed: int = 0
    source: str | None = "shipped"  # "shipped", a path to an artefact, or None (always train)
    gate: GateWeights | None = field(default=None, repr=False)

    FIT_OPTIONS: ClassVar[tuple[str, ...]] = (
        "hidden", "sinks", "local", "target", "sparsity_weight", "corpus", "train_chunk_len", "train_chunks", "steps",
        "lr", "batch_size", "kl_weight", "ce_weight", "seed")

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        _check_int("sinks", self.sinks, 0)
        _check_int("local", self.local, 1)
        _check_int("hidden", self.hidden, 0)
        if self.target is not None:
            _check_fraction("target", self.target, "training keep-rate target; None = budget")
        if isinstance(self.sparsity_weight, bool) or not isinstance(self.sparsity_weight, (int, float)) \
                or self.sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be a number >= 0, got {self.sparsity_weight!r}")
        self._check_training_options()
        if self.gate is not None and not isinstance(self.gate, GateWeights):
            raise ValueError(f"gate must be a GateWeights module or None, got {type(self.gate).__name__}")
        self._hidden: dict[int, torch.Tensor] = {}
        self._live = False
        self._stats: list[tuple[int, float, float]] = []
        self._aux: list[torch.Tensor] = []  # sparsity terms of the current student pass (training only)
        self._n_layers = 1
        self.history = None
        self.provenance: dict = getattr(self, "provenance", None) or {}
        self.provenance.setdefault("runs", [])
        self.metrics: dict = getattr(self, "metrics", None) or {}

    def _check_training_options(self) -> None:
        for name in ("steps",):
            _check_int(name, getattr(self, name), 0)
        for name in ("batch_size", "train_chunk_len", "train_chunks"):
            _check_int(name, getattr(self, name), 1 if name != "train_chunk_len" else 2)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ValueError(f"kl_weight and ce_weight must be >= 0 and not both 0, got {self.kl_weight}, "
                             f"{self.ce_weight}")

    @property
    def train_target(self) -> float:
        """The keep rate training pushes every (layer, kv head) to: ``target``, or the budget."""
        return float(self.target if self.target is not None else self.budget)

    @property
    def fitted(self) -> bool:
        return self.gate is not None

    # ---- hidden states (forward pre-hooks, only inside attached()/apply())
    @contextmanager
    def attached(self, model) -> Iterator[None]:
        """kvlab attention plus a forward pre-hook on every attention module that hands its input hidden states
        (B, T, d) to this method's cache layers; both are removed on exit."""
        modules = attention_modules(model)
        if not modules:
            raise ValueError(f"attention_gate found no attention modules (with layer_idx and k_proj/c_attn) in "
                             f"{type(model).__name__}")
        handles = [module.register_forward_pre_hook(self._hook(idx), with_kwargs=True)
                   for idx, module in modules.items()]
        try:
            with attention.attach(model):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._hidden.clear()

    @contextmanager
    def apply(self, model) -> Iterator:
        with self.attached(model):
            yield self.new_cache(model)

    def _hook(self, layer_idx: int):
        def hook(_module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(x, torch.Tensor):
                self._hidden[layer_idx] = x
            return None

        return hook

    def take_hidden(self, layer_idx: int, batch: int, n_query: int) -> torch.Tensor:
        x = self._hidden.pop(layer_idx, None)
        if x is None:
            raise RuntimeError("attention_gate: no hidden states reached the gate of layer "
                               f"{layer_idx}; run the model inside `method.apply(model)` or `method.attached(model)` "
                               "(kvlab.attach alone does not install the gate's hooks)")
        if x.shape[0] != batch or x.shape[1] != n_query:
            raise RuntimeError(f"attention_gate: layer {layer_idx} got hidden states {tuple(x.shape)} for "
                               f"{batch} rows x {n_query} new tokens")
        return x

    def scores(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Gate scores (B, H_kv, T) of layer ``layer_idx`` for hidden states (B, T, d)."""
        if self.gate is None:
            raise RuntimeError("attention_gate has no gate yet: call .prepare(model, tokenizer), .fit(model, ids), "
                               ".init_gate(model) (untrained) or AttentionGate.load(path)")
        return self.gate(layer_idx, hidden)

    # ---- caches
    def _check_gate(self, spec: ModelSpec) -> None:
        if self.gate is None:
            self.scores(0, None)  # raises the "no gate" error
        L, d, H, hidden = self.gate.shape
        if (L, d, H) != (spec.n_layers, spec.hidden_size, spec.n_kv_heads):
            raise ValueError(f"the gate is for (layers, d_model, kv heads) = {(L, d, H)}, the model has "
                             f"{(spec.n_layers, spec.hidden_size, spec.n_kv_heads)}")

    def make_layer(self, layer_idx: int, spec: ModelSpec) -> GateLayer:
        return GateLayer(layer_idx, self)

    def new_cache(self, model):
        spec = ModelSpec.from_model(model)
        self._check_gate(spec)
        self._n_layers = spec.n_layers
        return KVLabCache([self.make_layer(i, spec) for i in range(spec.n_layers)])

    def compress(self, cache, **context) -> None:
        """No-op (the layers evict at every forward); checks that ``cache`` comes from this method."""
        layers = list(getattr(cache, "layers", []))
        if not layers or not all(isinstance(layer, GateLayer) for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers}) or ["none"]
            raise ValueError(f"attention_gate.compress needs a cache from attention_gate.new_cache/apply (gate "
                             f"layers), got layers {kinds}")
        if any(layer.policy is not self for layer in layers):
            raise ValueError("this cache was built by another attention_gate instance: compress it with that one")

    # EvictionLayer's policy interface (what evict() asks)
    def records(self, compressed: bool) -> None:
        return None

    def priority(self, layer: EvictionLayer) -> torch.Tensor:
        return layer._keep.double()

    def keep_counts(self, layer: EvictionLayer) -> torch.Tensor:
        return layer._keep.sum(-1)

    def with_budget(self, budget: float | None = None, **changes) -> "AttentionGate":
        """The same trained gate with another budget (or inference options such as ``selection``)."""
        if budget is not None:
            changes["budget"] = budget
        other = dataclasses.replace(self, **changes)
        other.provenance, other.metrics, other.history = self.provenance, dict(self.metrics), self.history
        return other

    # ---- training
    def init_gate(self, model, seed: int | None = None) -> "AttentionGate":
        """Create an untrained gate for ``model`` (random W ~ N(0, 1/d), zero bias) unless one exists."""
        spec = ModelSpec.from_model(model)
        if self.gate is None:
            self.gate = GateWeights(spec.n_layers, spec.hidden_size, spec.n_kv_heads, self.hidden,
                                    seed=self.seed if seed is None else seed)
        self._check_gate(spec)
        return self

    def trainable(self) -> GateWeights:
        if self.gate is None:
            self.scores(0, None)
        return self.gate

    @contextmanager
    def train_mode(self) -> Iterator[GateWeights]:
        """Inside: caches use straight-through flags (hard [s > 0] forward, sigmoid backward), the multiplicative
        mask attention and the sparsity term; gradients reach ``gate``."""
        module = self.trainable()
        module.requires_grad_(True)
        self._live, self._stats, self._aux = True, [], []
        try:
            yield module
        finally:
            self._live = False
            module.requires_grad_(False)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The sparsity terms collected during the last student pass (for :func:`kvlab.fit.train.distill`)."""
        terms, self._aux = self._aux, []
        return torch.stack(terms).sum() if terms else None

    def _step_stats(self) -> dict:
        stats, self._stats = self._stats, []
        if not stats:
            return {}
        return {"keep_rate": float(torch.stack([s[1] for s in stats]).mean()), "sparsity": sum(s[2] for s in stats)}

    def fit(self, model, calib: torch.Tensor | None = None, *, steps: int | None = None, lr: float | None = None,
            batch_size: int | None = None, sparsity_weight: float | None = None, kl_weight: float | None = None,
            ce_weight: float | None = None, seed: int | None = None, train_data: torch.Tensor | None = None,
            eval_data: torch.Tensor | None = None, max_seconds: float | None = None, callback=None,
            progress: bool = True) -> "AttentionGate":
        """Train the gate for ``steps`` steps of :func:`kvlab.fit.train.distill` on the rows of ``train_data`` (default
        ``calib``, (N, T) ids), creating it first if needed; calling again continues. With ``eval_data``, the
        inference-time distillation loss and kept fraction are measured before and after (``metrics``)."""
        from ..fit import train

        with self.overridden(steps=steps, lr=lr, batch_size=batch_size, sparsity_weight=sparsity_weight,
                             kl_weight=kl_weight, ce_weight=ce_weight, seed=seed):
            self._check_training_options()
            if isinstance(self.sparsity_weight, bool) or not self.sparsity_weight >= 0:
                raise ValueError(f"sparsity_weight must be a number >= 0, got {self.sparsity_weight!r}")
            data = train_data if train_data is not None else calib
            if data is None:
                raise ValueError("fit needs token ids: calib or train_data, a (N, T) LongTensor")
            data = train.check_tokens(data, "train_data")
            if self.batch_size > data.shape[0]:
                raise ValueError(f"batch_size={self.batch_size} but train_data has only {data.shape[0]} rows")
        self.init_gate(model)
        if eval_data is not None:
            self.metrics.setdefault("eval_before", self.evaluate(model, eval_data))
        if self.steps:
            def logged(step, method):
                row = self._step_stats()
                if callback is not None:
                    row.update(callback(step, method) or {})
                return row

            result = train.distill(model, self, data, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                                   kl_weight=self.kl_weight, ce_weight=self.ce_weight, seed=self.seed,
                                   max_seconds=max_seconds, callback=logged, progress=progress)
            self._log_run(result)
        if eval_data is not None:
            self.metrics["eval_after"] = self.evaluate(model, eval_data)
        return self

    def evaluate(self, model, data: torch.Tensor, batch_size: int | None = None) -> dict:
        """Inference-time distillation loss (:func:`kvlab.fit.train.evaluate_loss`) and the kept fraction of tokens."""
        from ..fit import train
        from ..budget import kv_bytes

        out = train.evaluate_loss(model, self, data, batch_size=batch_size or self.batch_size,
                                  kl_weight=self.kl_weight, ce_weight=self.ce_weight)
        with torch.no_grad(), self.apply(model) as cache:
            ids = data[: batch_size or self.batch_size]
            train.forward_logits(model, ids, cache)
            out["kept_fraction"] = kv_bytes(cache).theoretical_budget
        return out

    def _log_run(self, result) -> None:
        import pandas as pd

        done = self.trained_steps
        history = result.history.assign(step=result.history["step"] + done)
        if "sparsity" in history:
            history = history.assign(total=history["loss"] + history["sparsity"])
        self.history = history if self.history is None else pd.concat([self.history, history], ignore_index=True)
        cols = [c for c in ("step", "loss", "kl", "ce", "keep_rate", "sparsity", "total", "tokens", "seconds")
                if c in history]
        self.provenance["runs"].append({**result.summary(), "target": self.train_target,
                                        "sparsity_weight": self.sparsity_weight, "sinks": self.sinks,
                                        "local": self.local, "history": history[cols].round(6).to_dict("records")})

    @property
    def trained_steps(self) -> int:
        return sum(run["steps"] for run in self.provenance.get("runs", []))

    @property
    def trained_tokens(self) -> int:
        return sum(run["tokens"] for run in self.provenance.get("runs", []))

    # ---- prepare / persistence (safetensors + JSON record, see kvlab.methods.artefacts)
    def _fit_options(self) -> dict:
        options = {k: v for k, v in self.options().items() if k != "source"}
        options["target"] = self.train_target  # what the gate was trained for, resolved
        return options

    def prepare(self, model, tokenizer) -> "AttentionGate":
        """Ready to run: the shipped or given artefact (``source``), or training on the corpus' calib split."""
        if self.gate is None:
            path = self._source_path(model)
            if path is not None:
                self._adopt(path, model)
            else:
                from ..data import text_chunks

                chunks = text_chunks(self.corpus, tokenizer, chunk_len=self.train_chunk_len,
                                     n_chunks=self.train_chunks, split="calib")
                if self.steps:
                    print(f"attention_gate: no artefact for this model and these options (source={self.source!r}); "
                          f"training {self.steps} steps (to ship one: `{artefacts.fit_command(self.name, model)}`)",
                          file=sys.stderr)
                self.fit(model, train_data=chunks)
        self._check_gate(ModelSpec.from_model(model))
        return self

    def _source_path(self, model) -> Path | None:
        if self.source is None:
            return None
        if self.source == "shipped":
            return artefacts.find_shipped(self.name, model, self._fit_options(), self.FIT_OPTIONS)
        return Path(self.source)

    def _record(self, model=None) -> dict:
        record = {"options": artefacts.jsonable_options(self._fit_options()), "metrics": self.metrics,
                  "provenance": self.provenance, "trained_steps": self.trained_steps,
                  "trained_tokens": self.trained_tokens,
                  "train_seconds": round(sum(run["seconds"] for run in self.provenance.get("runs", [])), 2)}
        if model is not None:
            record["model"] = artefacts.model_fingerprint(model)
        return record

    def save(self, path: str | Path, model=None, metrics: dict | None = None) -> Path:
        """Write the gate to ``path`` (.safetensors) and its record to ``path`` with suffix .json; pass ``model`` so
        the record carries its fingerprint (needed for shipped artefacts)."""
        if self.gate is None:
            raise RuntimeError("nothing to save: attention_gate has no gate yet (fit, prepare or init_gate first)")
        if metrics:
            self.metrics.update(metrics)
        return artefacts.write(path, self.name, self.gate.tensors(), self._record(model))

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "AttentionGate":
        """A method with the gate of artefact ``path`` and the options of its record (``overrides`` win)."""
        return artefacts.load_method(cls, path, **overrides)

    def _adopt(self, path: Path, model) -> None:
        tensors, record = artefacts.read(path, self.name)
        artefacts.adopt_fit_options(self, path, record, self.FIT_OPTIONS)
        self._take(tensors, record, path)
        self._check_gate(ModelSpec.from_model(model))

    def _take(self, tensors: dict, record: dict, path) -> None:
        self.gate = GateWeights.from_tensors(tensors, str(path)).requires_grad_(False)
        self.provenance = record.get("provenance", {}) or {}
        self.provenance.setdefault("runs", [])
        self.metrics = record.get("metrics", {}) or {}
        self.provenance["loaded_from"] = str(path)


__all__ = ["AttentionGate", "GateLayer", "GateWeights", "weighted_attention", "SELECTIONS"]
