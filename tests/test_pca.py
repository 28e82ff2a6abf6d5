"""Projected (feature-axis) cache: exact at full rank, equal to explicit projection math, real bytes saved."""

import pytest
import torch

import kvlab
from kvlab.cache import FullLayer, KVLabCache
from kvlab.cache.projected import ProjectedLayer
from conftest import left_padded_batch


def _random_bases(spec, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.linalg.qr(torch.randn(spec.head_dim, spec.head_dim, generator=g))[0][:, :rank]
             for _ in range(spec.n_kv_heads)] for _ in range(spec.n_layers)]


def _projected_cache(spec, rank, sinks=0):
    kb, vb = _random_bases(spec, rank, 0), _random_bases(spec, rank, 1)
    return KVLabCache([ProjectedLayer(i, kb[i], vb[i], sinks) for i in range(spec.n_layers)]), kb, vb


def _logits(model, ids, mask, pos, cache):
    with torch.no_grad(), kvlab.attach(model):
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


def test_full_rank_projection_is_exact(tiny):
    spec = kvlab.ModelSpec.from_model(tiny)
    ids, mask, pos = left_padded_batch(97, [14, 9])
    ref = tiny(ids, attention_mask=mask, position_ids=pos).logits
    cache, *_ = _projected_cache(spec, spec.head_dim)
    torch.testing.assert_close(_logits(tiny, ids, mask, pos, cache)[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


class _ProjectThenStoreFull(FullLayer):
    """Independent reference: a full cache fed k U U^T and v W W^T."""

    def __init__(self, layer_idx, kb, vb):
        super().__init__(layer_idx)
        self.kb, self.vb = kb, vb

    def _store(self, k, v):
        k = torch.stack([k[:, h] @ u @ u.T for h, u in enumerate(self.kb)], 1)
        v = torch.stack([v[:, h] @ w @ w.T for h, w in enumerate(self.vb)], 1)
        return super()._store(k, v)


def test_low_rank_equals_attention_on_projected_keys_and_values(tiny):
    spec = kvlab.ModelSpec.from_model(tiny)
    ids, mask, pos = left_padded_batch(97, [11, 8], seed=3)
    cache, kb, vb = _projected_cache(spec, 5)
    ours = _logits(tiny, ids, mask, pos, cache)
    reference = KVLabCache([_ProjectThenStoreFull(i, kb[i], vb[i]) for i in range(spec.n_layers)])
    ref = _logits(tiny, ids, mask, pos, reference)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    assert cache.layers[1].key_codes[0].shape == (2, 11, 5)  # only the codes are stored
    plain = tiny(ids, attention_mask=mask, position_ids=pos).logits
    assert not torch.allclose(ours[mask.bool()], plain[mask.bool()], atol=1e-3)


def test_sinks_kept_at_full_rank_and_padding_never_a_sink():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, [10, 6])
    cache, *_ = _projected_cache(spec, 4, sinks=3)
    _logits(model, ids, mask, pos, cache)
    layer = cache.layers[0]
    assert layer.sink_slots.tolist() == [[0, 1, 2], [4, 5, 6]]  # row 1 is left-padded by 4
    k_hat, _ = layer.reconstruct()
    # a model run that stores everything: its keys at the sink slots must equal the reconstruction there
    cap = kvlab.capture(model, ids, mask, what=("keys",), layers=[0])
    torch.testing.assert_close(k_hat[1, :, 4:7], cap.keys[0][1, :, 4:7])


def test_bytes_drop_with_rank_and_decode_appends():
    model = kvlab.tiny_model("gpt2")
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (2, 12))
    cache, *_ = _projected_cache(spec, 4)
    _logits(model, ids, None, None, cache)
    b = cache.kv_bytes("fp32")
    assert b.measured == b.theoretical == b.full * 4 // spec.head_dim
    _logits(model, torch.randint(3, 97, (2, 1)), None, torch.full((2, 1), 12), cache)
    assert cache.get_seq_length() == 13 and cache.layers[0].key_codes[0].shape == (2, 13, 4)


def test_ragged_ranks_are_stored_ragged():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    pca = kvlab.methods.get("pca", sinks=0, key_ranks=[[2, 9]] * 3, value_ranks=[[16, 1]] * 3)
    pca.key_bases = pca.value_bases = torch.eye(spec.head_dim).expand(spec.n_layers, spec.n_kv_heads, -1, -1)
    with torch.no_grad(), pca.apply(model) as cache:
        model(torch.randint(3, 97, (1, 8)), past_key_values=cache, use_cache=True)
    layer = cache.layers[2]
    assert [c.shape[-1] for c in layer.key_codes] == [2, 9] and [c.shape[-1] for c in layer.value_codes] == [16, 1]
    b = cache.kv_bytes("fp32")
    assert b.measured == b.theoretical == 8 * (2 + 9 + 16 + 1) * 4 * spec.n_layers


def test_pca_fit_on_tiny_model_and_budget_errors():
    model = kvlab.tiny_model("llama")
    pca = kvlab.methods.get("pca", 0.5, sinks=2).fit(model, torch.randint(3, 97, (4, 16)))
    spec = kvlab.ModelSpec.from_model(model)
    assert pca.key_bases.shape == (spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.head_dim)
    with torch.no_grad(), pca.apply(model) as cache:
        model(torch.randint(3, 97, (2, 16)), past_key_values=cache, use_cache=True)
    assert 0.5 < cache.kv_bytes("fp32").budget < 0.5 + 2 * 2 / 16  # half the features + 2 full-rank sinks per row
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        kvlab.methods.get("pca", 1.5)
    with pytest.raises(ValueError, match="unknown option"):
        kvlab.methods.get("pca", 0.5, rank=3)
    with pytest.raises(RuntimeError, match="no bases yet"):
        kvlab.methods.get("pca", 0.5).new_cache(model)
    with pytest.raises(ValueError, match="key_ranks must be"):
        kvlab.methods.PCA(key_ranks=[[0, 3]] * 3, key_bases=pca.key_bases, value_bases=pca.value_bases).new_cache(model)
