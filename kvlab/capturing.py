"""Capture what attention sees, per layer and kv head, without touching model code.

Keys (post-RoPE) and values come through a recording kvlab cache layer, queries and attention probabilities through
kvlab attention, and pre-RoPE keys through a forward hook on the key projection (or the key norm, for models that
normalise keys before RoPE). Works on every supported architecture; for GPT-2 (no RoPE) pre- and post-RoPE keys
are the same tensor.

    cap = capture(model, input_ids, what=("keys", "keys_pre", "values", "queries", "probs"), layers=[0, 5])
    cap.keys[5]   # (B, H_kv, T, D)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import attention
from .cache.base import FullLayer, KVLabCache
from .models import ModelSpec

WHAT = ("keys", "keys_pre", "values", "queries", "probs")


@dataclass
class Capture:
    """Per-layer tensors: keys/keys_pre/values (B, H_kv, T, D), queries (B, H, T, D), probs (B, H, T, T)."""

    spec: ModelSpec
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    keys_pre: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the last recording layer: nothing after it (later layers, final norm, LM head) is needed."""


class _RecordingLayer(FullLayer):
    def __init__(self, layer_idx: int, capture: Capture, what: set[str], last: bool = False):
        super().__init__(layer_idx)
        self.capture, self.what, self.last = capture, what, last

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        c, i = self.capture, self.layer_idx
        if "keys" in self.what:
            c.keys[i] = key.detach().clone()
        if "values" in self.what:
            c.values[i] = value.detach().clone()
        if "queries" in self.what:
            c.queries[i] = query.detach().clone()
        if "probs" in self.what:
            c.probs[i] = attention_probs(query, key, mask, scaling)
        if self.last:
            raise _StopForward
        return super().attend(query, key, value, mask, scaling=scaling, **kwargs)


def attention_probs(query, key, mask, scaling) -> torch.Tensor:
    """softmax(q k^T * scale) with the boolean mask, GQA groups expanded: (B, H, Q, K)."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)  # (B, H, K, D)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0).detach()  # fully masked rows (padding) -> 0


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention module of every layer, by layer index (self-attention only)."""
    found = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and (hasattr(module, "k_proj") or hasattr(module, "c_attn")):
            if not getattr(module, "is_cross_attention", False):
                found[module.layer_idx] = module
    return found


def _pre_rope_hook(capture: Capture, layer_idx: int, n_kv: int, head_dim: int):
    def hook(_module, _inputs, output):
        if output.ndim == 3:  # projection output (B, T, H_kv * D)
            b, t, _ = output.shape
            output = output.view(b, t, n_kv, head_dim).transpose(1, 2)
        capture.keys_pre[layer_idx] = output.detach().clone()  # (B, H_kv, T, D)

    return hook


@torch.no_grad()
def capture(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    what: tuple[str, ...] = ("keys", "values"),
    layers: list[int] | None = None,
) -> Capture:
    """Run one forward pass over ``input_ids`` (B, T) and return the requested tensors for ``layers`` (default all)."""
    unknown = set(what) - set(WHAT)
    if unknown:
        raise ValueError(f"cannot capture {sorted(unknown)}; choose from {', '.join(WHAT)}")
    spec = ModelSpec.from_model(model)
    layers = list(range(spec.n_layers)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < spec.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {spec.n_layers} layers (0..{spec.n_layers - 1})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    result = Capture(spec=spec, attention_mask=attention_mask)
    wanted = set(what)
    post = wanted - {"keys_pre"}
    if "keys_pre" in wanted and not spec.rope:
        post.add("keys")
    # The forward stops right after the last requested layer has been recorded: the layers above it, the final norm
    # and the LM head (a fifth of SmolLM2's compute per token) would only be thrown away.
    stop = max(layers, default=spec.n_layers - 1)
    cache = KVLabCache([
        _RecordingLayer(i, result, post if i in layers else set(), last=i == stop) for i in range(spec.n_layers)
    ])
    hooks = []
    if "keys_pre" in wanted and spec.rope:
        modules = attention_modules(model)
        for i in layers:
            target = getattr(modules[i], "k_norm", None) or modules[i].k_proj
            hooks.append(target.register_forward_hook(_pre_rope_hook(result, i, spec.n_kv_heads, spec.head_dim)))
    position_ids = attention.padded_positions(attention_mask)
    try:
        with attention.attach(model):
            model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                  use_cache=True)
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    if "keys_pre" in wanted and not spec.rope:
        result.keys_pre = dict(result.keys)
        if "keys" not in wanted:
            result.keys = {}
    return result
