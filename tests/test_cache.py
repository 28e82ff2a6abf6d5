"""The kvlab cache + attention at 100 % budget must reproduce the plain model; one test per overridden Cache method."""

import pytest
import torch

import kvlab
from kvlab import attention
from kvlab.cache import FullLayer, KVLabCache
from conftest import left_padded_batch


def _logits(model, ids, mask, pos, cache=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None).logits


def test_full_equals_plain_model_with_left_padding(tiny):
    ids, mask, pos = left_padded_batch(97, [20, 13, 7])
    ref = _logits(tiny, ids, mask, pos)
    with kvlab.methods.get("full").apply(tiny) as cache:
        out = _logits(tiny, ids, mask, pos, cache)
        assert isinstance(cache, KVLabCache)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)


def test_full_decode_steps_equal_plain_model(tiny):
    ids, mask, pos = left_padded_batch(97, [16, 9], seed=1)
    steps = torch.randint(3, 97, (2, 5))
    with kvlab.methods.get("full").apply(tiny) as cache:
        _logits(tiny, ids, mask, pos, cache)
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            pos_t = pos[:, -1:] + 1 + t
            step = _logits(tiny, steps[:, t:t + 1], mask, pos_t, cache)
    full_ids = torch.cat([ids, steps], 1)
    ref = _logits(tiny, full_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(step[:, -1], ref[:, -1], atol=1e-5, rtol=0)


def test_generate_with_kvlab_cache_gives_same_tokens(tiny):
    ids, mask, _ = left_padded_batch(97, [11, 6], seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = tiny.generate(ids, **kwargs)
    with kvlab.methods.get("full").apply(tiny) as cache:
        ours = tiny.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(plain, ours)
    assert cache.get_seq_length() == ids.shape[1] + 9


def test_attach_restores_attention_implementation(tiny):
    before = tiny.config._attn_implementation
    with kvlab.attach(tiny):
        assert tiny.config._attn_implementation == "kvlab"
    assert tiny.config._attn_implementation == before


def test_kvlab_cache_without_kvlab_attention_fails_loudly():
    model = kvlab.tiny_model("llama")
    cache = kvlab.methods.get("full").new_cache(model)
    with pytest.raises(RuntimeError, match="attention implementation other than 'kvlab'"):
        model(torch.randint(3, 97, (1, 5)), past_key_values=cache, use_cache=True)
    attention.clear_handoff()


def _filled_layer(batch=3, heads=2, tokens=6, dim=4):
    layer = FullLayer(0)
    k, v = torch.randn(batch, heads, tokens, dim), torch.randn(batch, heads, tokens, dim)
    layer.update(k, v)
    attention.clear_handoff()
    return layer, k, v


def test_update_appends_and_grows_in_place():
    layer, k, v = _filled_layer()
    assert layer.get_seq_length() == 6 and layer.keys.shape[2] == 6  # prefill allocates exactly
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, values = layer.update(k2, v2)
    attention.clear_handoff()
    torch.testing.assert_close(keys, torch.cat([k, k2], 2))
    torch.testing.assert_close(values, torch.cat([v, v2], 2))
    capacity = layer.keys.shape[2]
    assert capacity > 7  # grew with slack, so the next steps append without reallocating
    ptr = layer.keys.data_ptr()
    layer.update(k2, v2)
    attention.clear_handoff()
    assert layer.keys.data_ptr() == ptr and layer.get_seq_length() == 8


def test_get_mask_sizes_and_max_length():
    layer, *_ = _filled_layer()
    assert layer.get_mask_sizes(3) == (9, 0)
    assert layer.get_max_length() == -1


def test_batch_select_indices_with_repeats():
    layer, k, _ = _filled_layer()
    layer.batch_select_indices(torch.tensor([2, 2, 0]))
    assert layer.batch_size == 3
    torch.testing.assert_close(layer.keys[:, :, :6], k[[2, 2, 0]])


def test_batch_repeat_interleave_and_reorder():
    layer, k, _ = _filled_layer(batch=2)
    layer.batch_repeat_interleave(2)
    torch.testing.assert_close(layer.keys[:, :, :6], k[[0, 0, 1, 1]])
    layer.reorder_cache(torch.tensor([3, 0, 1, 2]))
    torch.testing.assert_close(layer.keys[:, :, :6], k[[1, 0, 0, 1]])


def test_crop_and_reset():
    layer, *_ = _filled_layer()
    layer.crop(-2)
    assert layer.get_seq_length() == 4
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized


def test_cache_batch_size_and_empty_cache_error():
    with pytest.raises(ValueError, match="one layer per model layer"):
        KVLabCache([])
    cache = KVLabCache([FullLayer(0), FullLayer(1)])
    assert cache.batch_size == -1


@pytest.mark.slow
def test_full_equals_none_on_smollm2(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is Paris, and the capital of Italy is", "Hello"]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _logits(model, enc["input_ids"], mask, pos)
    with kvlab.methods.get("full").apply(model) as cache:
        out = _logits(model, enc["input_ids"], mask, pos, cache)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(enc["input_ids"], **kwargs)
    with kvlab.methods.get("full").apply(model) as cache:
        ours = model.generate(enc["input_ids"], past_key_values=cache, **kwargs)
    assert torch.equal(plain, ours)


def test_sdpa_runs_a_plain_causal_mask_as_is_causal():
    import torch.nn.functional as F

    from kvlab import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
    assert attention._is_plain_causal(causal, 9, 9)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal).transpose(1, 2)
    torch.testing.assert_close(attention.sdpa(q, k, v, causal, None), expected, atol=1e-6, rtol=0)
    padded = causal.clone()
    padded[0, :, :, 0] = False  # row 0 left-padded by one token: not plain causal
    assert not attention._is_plain_causal(padded, 9, 9)
    assert not attention._is_plain_causal(causal[:, :, -1:], 1, 9)
