import pytest
import torch
from transformers import DynamicCache

import kvlab
from kvlab.budget import kv_bytes, storage_bytes


def _run(model, cache, tokens=10, batch=2):
    with torch.no_grad():
        model(torch.randint(3, 97, (batch, tokens)), past_key_values=cache, use_cache=True)


def test_full_cache_bytes_match_the_geometry():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    with kvlab.methods.get("full").apply(model) as cache:
        _run(model, cache)
    b = cache.kv_bytes()  # the bf16 view by default
    expected = 2 * 10 * spec.kv_bytes_per_token(torch.bfloat16)
    assert b.dtype == "bf16" and b.as_dict()["dtype"] == "bf16"
    assert b.full == b.theoretical == b.measured == expected
    assert b.budget == 1.0
    per_layer = b.by("layer")
    assert len(per_layer) == spec.n_layers and (per_layer["measured"] == expected / spec.n_layers).all()
    assert set(b.table["part"]) == {"K", "V"} and b.table["head"].nunique() == spec.n_kv_heads


def test_measured_counts_allocated_slack_after_growth():
    model = kvlab.tiny_model("gpt2")
    with kvlab.methods.get("full").apply(model) as cache:
        _run(model, cache, tokens=10, batch=1)
        _run(model, cache, tokens=1, batch=1)
    b = cache.kv_bytes()
    assert b.theoretical == b.full
    assert b.measured > b.theoretical  # storage reserved for the next tokens is real memory


def test_dynamic_cache_is_accounted_too():
    model = kvlab.tiny_model("llama")
    cache = DynamicCache(config=model.config)
    _run(model, cache)
    b = kv_bytes(cache)
    assert b.full == b.theoretical == b.measured


def test_views_of_one_storage_count_once():
    t = torch.zeros(10, 10)
    assert storage_bytes([t, t[:5], t[5:]]) == 400


def test_empty_cache_raises():
    with pytest.raises(ValueError, match="holds nothing"):
        kvlab.methods.get("full").new_cache(kvlab.tiny_model("llama")).kv_bytes()


@pytest.mark.parametrize("view, size", [("bf16", 2), ("fp16", 2), ("fp32", 4), ("native", 4), (torch.float32, 4)])
def test_reference_dtype_views_of_a_full_fp32_cache(view, size):
    model = kvlab.tiny_model("llama")  # fp32
    spec = kvlab.ModelSpec.from_model(model)
    with kvlab.methods.get("full").apply(model) as cache:
        _run(model, cache)
    b = kv_bytes(cache, view)
    assert b.full == b.theoretical == b.measured == 2 * 10 * spec.kv_bytes_per_token() * size // 4
    assert b.budget == 1.0


def test_integer_storage_is_not_rescaled_by_the_view():
    model = kvlab.tiny_model("llama")
    method = kvlab.methods.get("h2o", 0.5)
    with torch.no_grad(), method.apply(model) as cache:
        model(torch.randint(3, 97, (1, 20)), past_key_values=cache, use_cache=True)
        method.compress(cache)
    fp32, bf16 = kv_bytes(cache, "fp32"), kv_bytes(cache, "bf16")
    assert bf16.full * 2 == fp32.full and bf16.theoretical * 2 == fp32.theoretical  # floats only
    index = sum(layer.index.untyped_storage().nbytes() for layer in cache.layers)  # int16 column index
    floats = fp32.measured - index
    assert bf16.measured == floats // 2 + index
    assert bf16.budget > fp32.budget  # the index weighs twice as much next to bf16 entries


def test_unknown_view_is_refused():
    model = kvlab.tiny_model("llama")
    with kvlab.methods.get("full").apply(model) as cache:
        _run(model, cache)
    with pytest.raises(ValueError, match="reference dtype must be one of bf16, fp16, fp32, native"):
        cache.kv_bytes("int8")
