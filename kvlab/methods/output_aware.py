"""Output-aware value bases: the value error that matters is the one after each head's slice of ``o_proj``.

A kv head's value v (D,) reaches the residual stream as sum_g W_g (sum_t a_gt v_t) over the query heads g of its
GQA group, W_g = o_proj.weight[:, g D:(g+1) D] (hidden, D). For a reconstruction v_hat the output error is
sum_g W_g (attention-weighted error), whose expected square (errors of different tokens taken as uncorrelated, the
attention weights folded into the weighted second moment C = E_a[v v^T]) is

    E || M^(1/2) (v - v_hat) ||^2,    M = sum_g W_g^T W_g   (D, D), the output metric of the head.

The best rank-r code and reconstruction (reduced-rank regression in the metric M, a generalised eigenproblem
C M u = lambda u): with L = M^(1/2) and L C L = U S U^T (eigenvalues descending),

    code c = U_r^T L v = E_r^T v      (encoder E = L U, (D, D))
    v_hat  = L^-1 U_r c = F_r c       (decoder F = L^-1 U, (D, D))

so every prefix of columns is optimal at its rank and F E^T = I at full rank (exact). Plain PCA is the case M = I
(E = F orthonormal). The cache stores the same codes (r numbers per token and head), only the read changes.
"""

from __future__ import annotations

import torch

from ..models import ModelSpec


def _attention_module(model, layer: int):
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    blocks = getattr(base, "layers", None) or getattr(base, "h", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (model.layers or transformer.h)")
    block = blocks[layer]
    return getattr(block, "self_attn", None) or getattr(block, "attn")


@torch.no_grad()
def output_weights(model, layer: int) -> torch.Tensor:
    """The output projection of ``layer`` as (hidden, H * D): ``o_proj.weight`` (Llama-like) or GPT-2's ``c_proj``
    (a Conv1D whose weight is stored transposed)."""
    attn = _attention_module(model, layer)
    if hasattr(attn, "o_proj"):
        return attn.o_proj.weight.detach().float()
    if hasattr(attn, "c_proj"):
        return attn.c_proj.weight.detach().float().T
    raise ValueError(f"{type(attn).__name__}: no output projection (o_proj or c_proj) found")


@torch.no_grad()
def output_metrics(model) -> torch.Tensor:
    """(L, H_kv, D, D) float64: M = sum over the query heads g of kv head h of W_g^T W_g."""
    spec = ModelSpec.from_model(model)
    group = spec.n_heads // spec.n_kv_heads
    out = torch.zeros(spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.head_dim, dtype=torch.float64)
    for layer in range(spec.n_layers):
        w = output_weights(model, layer).double()  # (hidden, H * D)
        if w.shape[1] != spec.n_heads * spec.head_dim:
            raise ValueError(f"layer {layer}: output projection takes {w.shape[1]} inputs, expected "
                             f"{spec.n_heads} heads x {spec.head_dim}")
        heads = w.reshape(w.shape[0], spec.n_heads, spec.head_dim).permute(1, 0, 2)  # (H, hidden, D)
        per_head = heads.transpose(1, 2) @ heads  # (H, D, D)
        out[layer] = per_head.reshape(spec.n_kv_heads, group, spec.head_dim, spec.head_dim).sum(1)
    return out


def oblique_bases(second_moment: torch.Tensor, metric: torch.Tensor, ridge: float = 1e-6
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder E and decoder F (..., D, D) for value second moments C and output metrics M (..., D, D), columns by
    importance (see the module docstring). ``ridge`` x mean eigenvalue of M is added to M (a singular M would make
    L^-1 blow up)."""
    c, m = second_moment.double(), metric.double()
    dim = m.shape[-1]
    eye = torch.eye(dim, dtype=torch.float64)
    m = m + ridge * m.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye
    mvals, mvecs = torch.linalg.eigh(m)
    mvals = mvals.clamp_min(1e-30)
    root = mvecs @ torch.diag_embed(mvals.sqrt()) @ mvecs.transpose(-1, -2)  # L = M^(1/2), symmetric
    inv_root = mvecs @ torch.diag_embed(mvals.rsqrt()) @ mvecs.transpose(-1, -2)
    svals, svecs = torch.linalg.eigh(root @ c @ root)
    svecs = svecs.flip(-1)  # descending
    return (root @ svecs).float(), (inv_root @ svecs).float()


def second_moments(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> torch.Tensor:
    """C = V diag(lambda) V^T (..., D, D) back from a spectrum (eigenvalues (..., D), eigenvectors (..., D, D))."""
    v = eigenvectors.double()
    return v @ torch.diag_embed(eigenvalues.double()) @ v.transpose(-1, -2)
