"""Composition of projected features and token eviction in one cache (kvlab.methods.feature_x_token) on tiny random models:
full rank is the token method alone, reads decode the codes and restore sinks, bytes shrink on both axes, a row
gives the same logits alone and in a left-padded batch, bad options are refused."""

import pytest
import torch

import kvlab
from kvlab.methods import PCA, Composed, get
from kvlab.methods.feature_x_token import ProjectedEvictionLayer
from kvlab.methods.token import H2O, SnapKV, Streaming
from conftest import left_padded_batch

ARCHS = ["llama", "gpt2"]
TOKENS = {"h2o": H2O, "snapkv": SnapKV, "streaming": Streaming}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


_PCA = {}


def _pca(arch, sinks=2):
    if (arch, sinks) not in _PCA:
        model = kvlab.tiny_model(arch)
        ids = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(0))
        _PCA[arch, sinks] = model, PCA(budget=0.5, sinks=sinks, source=None).fit(model, ids)
    return _PCA[arch, sinks]


@torch.no_grad()
def _run(model, method, ids, mask, pos, cont):
    """Prefill, compress, then the continuation in one forward: its logits (B, Tc, V) and the cache."""
    with method.apply(model) as cache:
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        method.compress(cache, attention_mask=mask)
        full = torch.cat([mask, torch.ones_like(cont)], dim=1)
        cpos = pos[:, -1:] + 1 + torch.arange(cont.shape[1])
        logits = model(cont, attention_mask=full, position_ids=cpos, past_key_values=cache, use_cache=True).logits
    return logits, cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("token", ["h2o", "snapkv", "streaming"])
def test_full_rank_is_the_token_method_alone(arch, token):
    model, pca = _pca(arch)
    ids, mask, pos = left_padded_batch(97, [19, 12], seed=3)
    cont = torch.randint(3, 97, (2, 3), generator=torch.Generator().manual_seed(4))
    options = {"window": 4} if token == "snapkv" else {}
    alone, _ = _run(model, TOKENS[token](budget=0.4, **options), ids, mask, pos, cont)
    both, cache = _run(model, Composed(budget=0.4, token=token, feature_budget=1.0, feature_method=pca,
                                       token_options=options), ids, mask, pos, cont)
    torch.testing.assert_close(both, alone, atol=2e-4, rtol=0)
    assert all(isinstance(layer, ProjectedEvictionLayer) for layer in cache.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_read_decodes_codes_and_restores_sinks(arch):
    model, pca = _pca(arch, sinks=2)
    ids, mask, pos = left_padded_batch(97, [15, 9], seed=5)
    method = Composed(budget=0.25, feature_budget=0.5, feature_method=pca)
    cap = kvlab.capture(model, ids, mask, what=("keys", "values"))
    _, cache = _run(model, method, ids, mask, pos, torch.randint(3, 97, (2, 1)))
    spec = kvlab.ModelSpec.from_model(model)
    r = method.rank(spec)
    for layer in cache.layers:
        assert layer.keys.shape[-1] == r and layer.values.shape[-1] == r  # only codes are stored
    for i, layer in enumerate(cache.layers[:1]):  # deeper layers see the compressed layers' outputs
        keys, _ = layer.read()
        basis = pca.key_bases[i, :, :, :r]  # (H_kv, D, r)
        for row in range(2):
            start = int((mask[row] == 0).sum())
            for h in range(spec.n_kv_heads):
                for slot, col in enumerate(layer.index[row, h].tolist()):
                    if col < 0 or col >= ids.shape[1]:
                        continue
                    raw = cap.keys[i][row, h, col]  # (D,) post-RoPE key as the model computed it
                    expected = raw if col - start < 2 else basis[h] @ (basis[h].T @ raw)
                    torch.testing.assert_close(keys[row, h, slot], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_bytes_shrink_on_both_axes(arch):
    model, pca = _pca(arch, sinks=0)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    mask, pos = torch.ones_like(ids), torch.arange(40).expand(2, 40)

    @torch.no_grad()
    def compressed(method):  # right after compress: a later decode step adds spare slots (growth slack)
        with method.apply(model) as cache:
            model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            method.compress(cache, attention_mask=mask)
        return cache

    alone = compressed(H2O(budget=0.5))
    both = compressed(Composed(budget=0.25, feature_budget=0.5, feature_method=pca))
    a, b = kvlab.kv_bytes(alone, "fp32"), kvlab.kv_bytes(both, "fp32")
    assert b.theoretical == pytest.approx(a.theoretical / 2)  # same tokens kept, half the features
    assert b.measured < 0.6 * a.measured  # the codes are what is allocated (plus the index)
    assert b.budget < 0.3


@pytest.mark.parametrize("arch", ARCHS)
def test_a_row_alone_and_in_a_padded_batch(arch):
    model, pca = _pca(arch)
    ids, mask, pos = left_padded_batch(97, [17, 8], seed=7)
    cont = torch.randint(3, 97, (2, 2), generator=torch.Generator().manual_seed(8))
    method = Composed(budget=0.3, feature_budget=0.5, feature_method=pca)
    batch, _ = _run(model, method, ids, mask, pos, cont)
    for row, n in enumerate((17, 8)):
        alone, _ = _run(model, method, ids[row:row + 1, -n:], mask[row:row + 1, -n:], pos[row:row + 1, -n:],
                        cont[row:row + 1])
        torch.testing.assert_close(batch[row:row + 1], alone, atol=2e-4, rtol=0)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="feature must be one of"):
        Composed(feature="kvcar")
    with pytest.raises(ValueError, match="token must be one of"):
        Composed(token="attention_gate")
    with pytest.raises(ValueError, match=r"feature_budget must be in \[budget / precision fraction, 1\]"):
        Composed(budget=0.25, feature_budget=0.2)
    with pytest.raises(ValueError, match="sinks must be"):
        Composed(sinks=-1)
    method = get("composed", budget=0.125, feature_budget=0.5, token="snapkv")
    assert method.token_budget == pytest.approx(0.25) and method.policy.name == "snapkv"
    assert Composed(budget=0.25).split == pytest.approx(0.5)  # default: even split in log bytes


def test_an_unfitted_feature_method_is_an_error():
    model = kvlab.tiny_model("llama")
    with pytest.raises(RuntimeError, match="no bases yet"):
        Composed(feature_method=PCA(source=None)).new_cache(model)


_PRE = {}


def _pca_pre(arch="llama", sinks=2):
    if (arch, sinks) not in _PRE:
        model = kvlab.tiny_model(arch)
        ids = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(0))
        _PRE[arch, sinks] = model, PCA(budget=0.5, sinks=sinks, keys="pre_rope", source=None).fit(model, ids)
    return _PRE[arch, sinks]


@pytest.mark.parametrize("token", ["h2o", "snapkv"])
def test_pre_rope_features_full_rank_is_the_token_method_alone(token):
    model, pca = _pca_pre()
    ids, mask, pos = left_padded_batch(97, [19, 12], seed=3)
    cont = torch.randint(3, 97, (2, 3), generator=torch.Generator().manual_seed(4))
    options = {"window": 4} if token == "snapkv" else {}
    alone, _ = _run(model, TOKENS[token](budget=0.4, **options), ids, mask, pos, cont)
    both, cache = _run(model, Composed(budget=0.4, token=token, feature_budget=1.0, feature_method=pca,
                                       token_options=options), ids, mask, pos, cont)
    torch.testing.assert_close(both, alone, atol=2e-4, rtol=0)
    assert all(layer.rotary is not None and layer.positions is not None for layer in cache.layers)


def test_pre_rope_features_read_rebuilds_and_rotates_each_slot():
    model, pca = _pca_pre(sinks=2)
    ids, mask, pos = left_padded_batch(97, [15, 9], seed=5)
    method = Composed(budget=0.25, feature_budget=0.5, feature_method=pca)
    cap = kvlab.capture(model, ids, mask, what=("keys", "keys_pre"), layers=[0])
    _, cache = _run(model, method, ids, mask, pos, torch.randint(3, 97, (2, 1)))
    layer, spec = cache.layers[0], kvlab.ModelSpec.from_model(model)
    r = method.rank(spec)
    keys, _ = layer.read()
    basis = pca.key_bases[0, :, :, :r]
    rot = kvlab.rope.Rotary.from_model(model, 0)
    for row in range(2):
        start = int((mask[row] == 0).sum())
        for h in range(spec.n_kv_heads):
            for slot, col in enumerate(layer.index[row, h].tolist()):
                if col < 0 or col >= ids.shape[1]:
                    continue
                assert int(layer.positions[row, h, slot]) == col - start  # kept through eviction
                if col - start < 2:
                    expected = cap.keys[0][row, h, col]  # sink: the full post-RoPE key
                else:
                    pre = basis[h] @ (basis[h].T @ cap.keys_pre[0][row, h, col])
                    expected = rot.rotate(pre[None, None, None], torch.tensor([[col - start]]))[0, 0, 0]
                torch.testing.assert_close(keys[row, h, slot], expected, atol=1e-4, rtol=0)


def test_pre_rope_features_bytes_are_codes_sinks_index_and_positions():
    model, pca = _pca_pre(sinks=0)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    mask, pos = torch.ones_like(ids), torch.arange(40).expand(2, 40)
    method = Composed(budget=0.25, feature_budget=0.5, feature_method=pca)
    with torch.no_grad(), method.apply(model) as cache:
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        method.compress(cache, attention_mask=mask)
    b = kvlab.kv_bytes(cache)
    slots = sum(layer.index.numel() for layer in cache.layers)
    assert b.measured == b.theoretical + slots * (2 + 4)  # + int16 index and int32 positions per slot
    assert b.budget < 0.3
