"""Rotary position embedding of one layer, outside the model: rotate and un-rotate cached keys.

A RoPE model rotates each key by its position before it reaches the cache: k = R(p) k_pre (HF's rotate_half
convention: feature i pairs with i + D/2, cos/sin from the model's own rotary module, so scaled RoPE variants and
Gemma3's per-layer-type frequencies come out exactly as the model computes them). A cache that stores pre-RoPE keys
un-rotates what it is given, k_pre = R(p)^T k, and rotates back on read. The rotary module may scale cos and sin by
an attention factor s (cos = s cos(theta)); un-rotation divides by s^2 so that unrotate(rotate(x)) == x.
"""

from __future__ import annotations

import torch

from .models import ModelSpec


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """The rotary embedding of one layer: ``cos_sin(positions)``, ``rotate(x, positions)``, ``unrotate(...)``."""

    def __init__(self, module: torch.nn.Module, layer_type: str | None = None):
        self.module, self.layer_type = module, layer_type

    @classmethod
    def from_model(cls, model, layer_idx: int) -> "Rotary":
        """The rotary embedding layer ``layer_idx`` of ``model`` uses; ValueError for a model without RoPE."""
        spec = ModelSpec.from_model(model)
        if not spec.rope:
            raise ValueError(f"{spec.arch} has no rotary position embedding: pre-RoPE keys need a RoPE model "
                             "(llama, mistral, qwen2, qwen3, gemma3_text)")
        if not 0 <= layer_idx < spec.n_layers:
            raise ValueError(f"layer {layer_idx} out of range: the model has {spec.n_layers} layers")
        base = getattr(model, "model", model)
        module = getattr(base, "rotary_emb", None)
        if module is None:
            raise ValueError(f"{spec.arch}: no rotary_emb module found on the model")
        layer_type = spec.layer_types[layer_idx] if spec.arch == "gemma3_text" else None
        return cls(module, layer_type)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """cos, sin (B, 1, T, D) for integer positions (B, T) (or (T,))."""
        positions = positions if positions.ndim == 2 else positions[None]
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        args = (probe, positions) if self.layer_type is None else (probe, positions, self.layer_type)
        cos, sin = self.module(*args)
        return cos[:, None], sin[:, None]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """R(p) x for x (B, H, T, D) at positions (B, T)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return x * cos + rotate_half(x) * sin

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """R(p)^T x / s^2: the exact inverse of :meth:`rotate`."""
        cos, sin = self.cos_sin(positions, x.dtype)
        scale2 = (cos[..., :1] ** 2 + sin[..., :1] ** 2)  # s^2, the same for every pair
        return (x * cos - rotate_half(x) * sin) / scale2
