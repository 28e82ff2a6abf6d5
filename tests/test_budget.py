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
    b = cache.kv_bytes()
    expected = 2 * 10 * spec.kv_bytes_per_token()
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
