"""The one-token decode read of ProjectedLayer (scores against the codes, no K_hat/V_hat) equals the reconstruct
path: left padding, full-rank sinks, GQA/MHA/MQA and sliding windows, ragged ranks, in-place growth of the codes."""

import pytest
import torch

import kvlab
from kvlab.cache import KVLabCache
from kvlab.cache.projected import ProjectedLayer
from conftest import left_padded_batch


def _bases(spec, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.linalg.qr(torch.randn(spec.head_dim, spec.head_dim, generator=g))[0][:, : ranks[h]]
             for h in range(spec.n_kv_heads)] for _ in range(spec.n_layers)]


def _cache(spec, key_ranks, value_ranks, sinks, fast):
    kb, vb = _bases(spec, key_ranks, 0), _bases(spec, value_ranks, 1)
    layers = [ProjectedLayer(i, kb[i], vb[i], sinks) for i in range(spec.n_layers)]
    for layer in layers:
        layer.fast_decode = fast
    return KVLabCache(layers)


def _greedy(model, cache, ids, mask, steps):
    """Logits of the prefill's last column and of ``steps`` greedy decode steps (explicit positions and mask)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out, tokens = [], []
    with torch.inference_mode(), kvlab.attach(model):
        logits = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        last = pos[:, -1]
        for _ in range(steps):
            out.append(logits)
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            last = last + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache,
                           use_cache=True).logits[:, -1]
        out.append(logits)
    return torch.stack(out, 1), torch.stack(tokens, 1) if tokens else None


@pytest.mark.parametrize("sinks", [0, 2])
def test_decode_read_equals_reconstruct(tiny, sinks):
    spec = kvlab.ModelSpec.from_model(tiny)
    ids, mask, _ = left_padded_batch(97, [9, 5], seed=sinks)
    ranks_k = [max(1, spec.head_dim // 2 - 3 * h) for h in range(spec.n_kv_heads)]  # ragged per head
    ranks_v = [max(1, spec.head_dim // 3 + 5 * h) for h in range(spec.n_kv_heads)]
    ref, ref_tokens = _greedy(tiny, _cache(spec, ranks_k, ranks_v, sinks, fast=False), ids, mask, 6)
    fast_cache = _cache(spec, ranks_k, ranks_v, sinks, fast=True)
    ours, tokens = _greedy(tiny, fast_cache, ids, mask, 6)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    layer = fast_cache.layers[0]
    assert layer.length == 9 + 6 and [c.shape for c in layer.key_codes] == [(2, 15, r) for r in ranks_k]
    if sinks:  # row 1 is left padded by 4: its sinks sit at slots 4, 5
        assert layer.sink_slots.tolist() == [[0, 1], [4, 5]]


def test_decode_read_never_reconstructs(monkeypatch):
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, _ = left_padded_batch(97, [7, 4])
    cache = _cache(spec, [5, 3], [4, 6], 2, fast=True)
    calls = []
    original = ProjectedLayer.reconstruct
    monkeypatch.setattr(ProjectedLayer, "reconstruct", lambda self: calls.append(1) or original(self))
    _greedy(model, cache, ids, mask, 3)
    assert len(calls) == spec.n_layers  # the prefill only


def test_codes_grow_in_place_when_decoding():
    model = kvlab.tiny_model("gpt2")
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, _ = left_padded_batch(97, [6, 6])
    cache = _cache(spec, [4] * spec.n_kv_heads, [4] * spec.n_kv_heads, 0, fast=True)
    _greedy(model, cache, ids, mask, 0)
    layer = cache.layers[0]
    assert layer.code_tensors()[0].shape == (2, spec.n_kv_heads, 6, 4)  # prefill: exactly sized, heads of equal ranks
    assert len(layer.code_tensors()) == 2  # share one buffer per K and V
    buffer = layer.code_tensors()[0]
    pointers = [buffer.data_ptr()]
    with torch.inference_mode(), kvlab.attach(model):
        for step in range(5):
            pos = torch.full((2, 1), 6 + step)
            m = torch.ones(2, 7 + step, dtype=torch.long)
            model(torch.full((2, 1), 5), attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True)
            pointers.append(layer.code_tensors()[0].data_ptr())
    assert layer.key_codes[0].shape == (2, 11, 4)
    assert len(set(pointers[1:])) == 1  # grown once (by at least min_grow), then appended in place
    b = cache.kv_bytes("fp32")
    assert b.theoretical < b.measured <= b.theoretical * (6 + 5 + 32) / 11  # slack of the growth, as FullLayer
    cache.batch_select_indices(torch.tensor([1, 1, 0]))
    assert layer.key_codes[0].shape == (3, 11, 4) and layer.code_tensors()[0].shape == (3, spec.n_kv_heads, 11, 4)


@pytest.mark.parametrize("ranks_k, ranks_v", [([4] * 4, [4] * 4), ([5, 3, 5, 3], [4, 6, 4, 6]), ([5, 5, 3, 5], [6] * 4)],
                         ids=["one group", "interleaved groups", "mixed"])
def test_heads_of_equal_ranks_share_a_buffer_and_read_the_same(ranks_k, ranks_v):
    model = kvlab.tiny_model("gpt2")  # 4 kv heads
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, _ = left_padded_batch(97, [8, 5], seed=1)
    ref, _ = _greedy(model, _cache(spec, ranks_k, ranks_v, 2, fast=False), ids, mask, 4)
    cache = _cache(spec, ranks_k, ranks_v, 2, fast=True)
    ours, _ = _greedy(model, cache, ids, mask, 4)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    layer = cache.layers[1]
    groups = len(set(zip(ranks_k, ranks_v)))
    assert len(layer.code_tensors()) == 2 * groups
    assert [c.shape for c in layer.key_codes] == [(2, 12, r) for r in ranks_k]
    b = cache.kv_bytes("fp32")
    assert b.measured >= b.theoretical  # no padding to the largest rank: only decode growth slack on top
    k_hat, _ = layer.reconstruct()
    assert k_hat.shape == (2, 4, 12, spec.head_dim)
