import pytest
import torch

import kvlab
from kvlab.capturing import capture
from conftest import left_padded_batch


def test_capture_shapes_and_probabilities(tiny):
    spec = kvlab.ModelSpec.from_model(tiny)
    ids, mask, _ = left_padded_batch(97, [12, 8])
    cap = capture(tiny, ids, mask, what=("keys", "keys_pre", "values", "queries", "probs"), layers=[0, 2])
    assert set(cap.keys) == {0, 2}
    assert cap.keys[2].shape == (2, spec.n_kv_heads, 12, spec.head_dim)
    assert cap.queries[0].shape == (2, spec.n_heads, 12, spec.head_dim)
    probs = cap.probs[0]
    assert probs.shape == (2, spec.n_heads, 12, 12)
    real = mask.bool()
    sums = probs.sum(-1)  # (B, H, Q)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]))
    assert torch.all(probs.triu(1) == 0)  # causal
    assert torch.all(probs[1][:, :, ~real[1]] == 0)  # padding receives no attention


def test_pre_rope_keys_rotate_to_post_rope_keys():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 9))
    cap = capture(model, ids, what=("keys", "keys_pre"))
    pos = torch.arange(9)[None]
    cos, sin = model.model.rotary_emb(cap.keys_pre[1], pos)
    _, rotated = apply_rotary_pos_emb(cap.keys_pre[1], cap.keys_pre[1], cos, sin)
    torch.testing.assert_close(rotated, cap.keys[1], atol=1e-5, rtol=0)
    assert not torch.allclose(cap.keys_pre[1], cap.keys[1])


def test_gpt2_has_no_rope_so_pre_equals_post():
    cap = capture(kvlab.tiny_model("gpt2"), torch.randint(3, 97, (1, 7)), what=("keys_pre",))
    assert set(cap.keys_pre) == {0, 1, 2} and cap.keys == {}


def test_capture_does_not_change_the_model_output():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (2, 10))
    before = model(ids).logits
    capture(model, ids, what=("probs",))
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, before)


def test_bad_requests_raise():
    model = kvlab.tiny_model("llama")
    with pytest.raises(ValueError, match="cannot capture"):
        capture(model, torch.ones(1, 3, dtype=torch.long), what=("gradients",))
    with pytest.raises(ValueError, match="out of range"):
        capture(model, torch.ones(1, 3, dtype=torch.long), layers=[7])


def test_capture_stops_after_the_last_requested_layer():
    """Layers above the last requested one (and the LM head) are not run, and what is captured is unchanged."""
    import kvlab

    model = kvlab.tiny_model("llama", n_layers=4)
    ids = torch.randint(3, 97, (2, 11))
    full = kvlab.capture(model, ids, what=("keys", "keys_pre", "values"))
    ran = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, layer in enumerate(model.model.layers)]
    hooks.append(model.lm_head.register_forward_hook(lambda m, i, o: ran.append("lm_head")))
    try:
        part = kvlab.capture(model, ids, what=("keys", "keys_pre", "values"), layers=[0, 2])
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]  # layer 2's attention was recorded, then the forward stopped
    for name in ("keys", "keys_pre", "values"):
        assert sorted(getattr(part, name)) == [0, 2]
        for layer in (0, 2):
            assert torch.equal(getattr(part, name)[layer], getattr(full, name)[layer])
