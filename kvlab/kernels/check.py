"""A correctness summary of the kernels, for notebooks and reports (the exhaustive checks live in
tests/test_kernels.py, which also runs every Triton kernel in Triton's interpreter).

:func:`correctness` runs each op's torch reference against dense attention (or the explicit projection) over a few
odd shapes and, when a CUDA device and triton are present, the compiled Triton kernels against the references.
Every row states the op, the case, what it was compared with, the dtype and the max absolute error.
"""

from __future__ import annotations

import torch

from . import dispatch
from .paged_attention import reference as paged_ref
from .project_append import reference as append_ref
from .projected_attention import reference as proj_ref

# name: (batch, GQA ratio, D, Dv, key ranks, value ranks, T, lengths)
PROJECTED = {"ragged GQA 2": (3, 2, 24, 20, [5, 24, 1], [3, 11, 20], 37, [37, 0, 20]),
             "SmolLM2-like": (2, 3, 64, 64, [32, 32, 32], [32, 32, 32], 300, [300, 123])}
# name: (GQA ratio, D, Dv, block size, lengths (B, H_kv))
PAGED = {"ragged heads": (2, 24, 8, 5, [[7, 1, 12], [0, 20, 3]]), "SmolLM2-like": (3, 64, 64, 16, [[250, 97, 16]])}
# name: (batch, H_kv, T_new, T_cap, D, Dv, key ranks, value ranks, positions)
APPEND = {"decode": (2, 3, 1, 40, 64, 64, [32, 32, 32], [32, 32, 32], [39, 5]),
          "ragged prefill": (2, 2, 30, 40, 20, 20, [20, 6], [4, 20], [10, 0])}


def _bases(dim: int, ranks, g: torch.Generator):
    parts = [torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, :r] for r in ranks]
    return proj_ref.pack_ragged(parts)  # (D, sum r), offsets


def dense_attention(query, keys, values, lengths, scale):
    """Ordinary attention of query (B, H, D) over keys (B, H_kv, T, D), values (B, H_kv, T, Dv), float32."""
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1).float(), values.repeat_interleave(group, 1).float()
    scores = torch.einsum("bhd,bhtd->bht", query.float(), keys) * scale
    visible = torch.arange(keys.shape[2]) < lengths[:, None, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bht,bhtd->bhd", probs, values)


def _projected_inputs(case, seed=0):
    batch, group, dim, vdim, key_ranks, value_ranks, tokens, lengths = case
    g = torch.Generator().manual_seed(seed)
    (u, k_off), (w, v_off) = _bases(dim, key_ranks, g), _bases(vdim, value_ranks, g)
    query = torch.randn(batch, len(key_ranks) * group, dim, generator=g)
    key_codes = torch.randn(batch, tokens, u.shape[1], generator=g)
    value_codes = torch.randn(batch, tokens, w.shape[1], generator=g)
    return (query, key_codes, value_codes, u, w, k_off, v_off), torch.tensor(lengths)


def _paged_inputs(case, seed=0):
    group, dim, vdim, block, lengths = case
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    batch, n_kv = lengths.shape
    need = (lengths + block - 1) // block
    n_blocks = int(need.sum()) + 2
    tables = torch.full((batch, n_kv, int(need.max()) + 1), -1, dtype=torch.int32)
    used = torch.arange(tables.shape[2]) < need[..., None]
    tables[used] = torch.randperm(n_blocks, generator=g)[: int(need.sum())].to(torch.int32)
    query = torch.randn(batch, n_kv * group, dim, generator=g)
    keys, values = torch.randn(n_blocks, block, dim, generator=g), torch.randn(n_blocks, block, vdim, generator=g)
    return query, keys, values, tables, lengths.to(torch.int32)


def _gather_paged(keys, values, tables, lengths):
    """Dense (B, H_kv, max length, D/Dv) copies of the paged tokens (zeros past each length)."""
    batch, n_kv, _ = tables.shape
    block, longest = keys.shape[1], int(lengths.max())
    dense_k = keys.new_zeros(batch, n_kv, longest, keys.shape[2])
    dense_v = values.new_zeros(batch, n_kv, longest, values.shape[2])
    for b in range(batch):
        for h in range(n_kv):
            for t in range(int(lengths[b, h])):
                dense_k[b, h, t] = keys[tables[b, h, t // block], t % block]
                dense_v[b, h, t] = values[tables[b, h, t // block], t % block]
    return dense_k, dense_v


def _append_inputs(case, seed=0):
    batch, n_kv, new, capacity, dim, vdim, key_ranks, value_ranks, positions = case
    g = torch.Generator().manual_seed(seed)
    (u, k_off), (w, v_off) = _bases(dim, key_ranks, g), _bases(vdim, value_ranks, g)
    keys, values = torch.randn(batch, n_kv, new, dim, generator=g), torch.randn(batch, n_kv, new, vdim, generator=g)
    key_codes, value_codes = torch.zeros(batch, capacity, u.shape[1]), torch.zeros(batch, capacity, w.shape[1])
    return keys, values, key_codes, value_codes, u, w, k_off, v_off, torch.tensor(positions)


def _row(op, case, compared, dtype, error, where="torch reference (CPU)"):
    return {"op": op, "case": case, "implementation": where, "compared with": compared, "dtype": str(dtype),
            "max_abs_error": float(error)}


def correctness(gpu: bool | None = None) -> list[dict]:
    """Rows of max absolute errors; ``gpu=None`` adds the Triton rows when CUDA and triton are available."""
    gpu = torch.cuda.is_available() and dispatch.triton_available() if gpu is None else gpu
    rows = []
    for name, case in PROJECTED.items():
        inputs, lengths = _projected_inputs(case)
        query, key_codes, value_codes, u, w, k_off, v_off = inputs
        got = proj_ref.projected_decode_attention(*inputs, lengths, scaling=0.125)
        want = dense_attention(query, proj_ref.reconstruct(key_codes, u, k_off), proj_ref.reconstruct(value_codes, w, v_off),
                      lengths, 0.125)
        rows.append(_row("projected_attention", name, "dense attention over K_hat, V_hat", torch.float32,
                         (got - want).abs().max()))
        if gpu:
            cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs]
            kernel = dispatch.projected_decode_attention(*cuda, lengths.cuda(), scaling=0.125)
            rows.append(_row("projected_attention", name, "torch reference", torch.float32,
                             (kernel.cpu() - got).abs().max(), "Triton (CUDA)"))
    for name, case in PAGED.items():
        query, keys, values, tables, lengths = _paged_inputs(case)
        got = paged_ref.paged_decode_attention(query, keys, values, tables, lengths, 0.125)
        dense_k, dense_v = _gather_paged(keys, values, tables, lengths)
        group = query.shape[1] // tables.shape[1]
        want = torch.stack([dense_attention(query[:, h * group:(h + 1) * group], dense_k[:, h:h + 1], dense_v[:, h:h + 1],
                                   lengths[:, h], 0.125) for h in range(tables.shape[1])], 1).flatten(1, 2)
        rows.append(_row("paged_attention", name, "dense attention over the gathered tokens", torch.float32,
                         (got - want).abs().max()))
        if gpu:
            kernel = dispatch.paged_decode_attention(query.cuda(), keys.cuda(), values.cuda(), tables.cuda(),
                                                     lengths.cuda(), 0.125)
            rows.append(_row("paged_attention", name, "torch reference", torch.float32,
                             (kernel.cpu() - got).abs().max(), "Triton (CUDA)"))
    for name, case in APPEND.items():
        keys, values, key_codes, value_codes, u, w, k_off, v_off, positions = _append_inputs(case)
        want_k = key_codes.clone()
        for b, p in enumerate(positions.tolist()):
            for h, (a, z) in enumerate(zip(k_off, k_off[1:])):
                want_k[b, p: p + keys.shape[2], a:z] = keys[b, h] @ u[:, a:z]
        got_k, _ = append_ref.project_append(keys, values, key_codes.clone(), value_codes.clone(), u, w, k_off, v_off,
                                             positions)
        rows.append(_row("project_append", name, "explicit k @ U_h per head", torch.float32,
                         (got_k - want_k).abs().max()))
        if gpu:
            cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in
                    (keys, values, key_codes.clone(), value_codes.clone(), u, w, k_off, v_off, positions)]
            kernel_k, _ = dispatch.project_append(*cuda)
            rows.append(_row("project_append", name, "torch reference", torch.float32,
                             (kernel_k.cpu() - got_k).abs().max(), "Triton (CUDA)"))
    return rows


@torch.inference_mode()
def projected_layer_decode_error(arch: str = "llama", sinks: int = 2, steps: int = 4, seed: int = 0) -> float:
    """Max |logit difference| between :class:`~kvlab.cache.projected.ProjectedLayer`'s one-token decode read
    (scores against the codes) and its reconstruct path, greedy decoding a left-padded batch of 2 on a tiny model."""
    from .. import attention, models
    from ..cache.base import KVLabCache
    from ..cache.projected import ProjectedLayer

    model = models.tiny_model(arch)
    spec = models.ModelSpec.from_model(model)
    g = torch.Generator().manual_seed(seed)
    ranks = [max(1, spec.head_dim // 2 - 3 * h) for h in range(spec.n_kv_heads)]
    bases = [[torch.linalg.qr(torch.randn(spec.head_dim, spec.head_dim, generator=g))[0][:, :r] for r in ranks]
             for _ in range(2 * spec.n_layers)]
    ids = torch.randint(3, spec.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left padded
    logits = {}
    for fast in (False, True):
        layers = [ProjectedLayer(i, bases[i], bases[spec.n_layers + i], sinks) for i in range(spec.n_layers)]
        for layer in layers:
            layer.fast_decode = fast
        cache, m, out = KVLabCache(layers), mask.clone(), []
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        with attention.attach(model):
            step = model(ids, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
            last = pos[:, -1:]
            for _ in range(steps):
                out.append(step)
                nxt = (logits[False][len(out) - 1] if fast else step).argmax(-1, keepdim=True)  # same tokens both ways
                last, m = last + 1, torch.cat([m, torch.ones_like(m[:, :1])], 1)
                step = model(nxt, attention_mask=m, position_ids=last, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(step)
        logits[fast] = out
    return max(float((a - b).abs().max()) for a, b in zip(logits[False], logits[True]))
