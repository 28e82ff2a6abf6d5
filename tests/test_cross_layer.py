"""Learned cross-layer prediction: exact at full residual rank, closed-loop coding, real bytes, clear errors."""

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.methods.cross_layer import CrossLayer, PredictedLayer
from conftest import left_padded_batch


def _logits(model, ids, mask, pos, cache):
    with torch.no_grad(), kvlab.attach(model):
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


def _calib(seed=1, n=4, t=24):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def _fitted(model, **options):
    return CrossLayer(**{"sinks": 0, **options}).fit(model, _calib())


def test_group_one_is_the_full_cache_exactly(tiny):
    ids, mask, pos = left_padded_batch(97, [13, 7, 10])
    full = _logits(tiny, ids, mask, pos, kvlab.methods.get("full").new_cache(tiny))
    method = _fitted(tiny, group=1)
    cache = method.new_cache(tiny)
    assert not any(isinstance(layer, PredictedLayer) for layer in cache.layers)
    ours = _logits(tiny, ids, mask, pos, cache)
    torch.testing.assert_close(ours[mask.bool()], full[mask.bool()], atol=0, rtol=0)


@pytest.mark.parametrize("map_", ["head", "layer", "none"])
@pytest.mark.parametrize("sinks", [0, 2])
def test_full_residual_rank_reproduces_the_full_cache(tiny, map_, sinks):
    """Rank = head_dim: prediction + the whole residual = the entry, pre-RoPE keys rotated back; prefill + decode."""
    spec = kvlab.ModelSpec.from_model(tiny)
    ids, mask, pos = left_padded_batch(97, [13, 7, 10])
    method = _fitted(tiny, group=3, map=map_, sinks=sinks, key_rank=spec.head_dim, value_rank=spec.head_dim)
    assert method.key_mode(spec) == ("pre_rope" if spec.rope else "post_rope")
    full_cache, cache = kvlab.methods.get("full").new_cache(tiny), method.new_cache(tiny)
    assert sum(isinstance(layer, PredictedLayer) for layer in cache.layers) == 2  # layers 1 and 2 (chain)
    full = _logits(tiny, ids[:, :-1], mask[:, :-1], pos[:, :-1], full_cache)
    ours = _logits(tiny, ids[:, :-1], mask[:, :-1], pos[:, :-1], cache)
    torch.testing.assert_close(ours[mask[:, :-1].bool()], full[mask[:, :-1].bool()], atol=1e-5, rtol=0)
    step_full = _logits(tiny, ids[:, -1:], mask, pos[:, -1:], full_cache)
    step = _logits(tiny, ids[:, -1:], mask, pos[:, -1:], cache)
    torch.testing.assert_close(step, step_full, atol=1e-5, rtol=0)


def _layer_errors(model, method, ids):
    """Relative error of the keys and values each predicted layer hands to attention, vs the full cache's."""
    cap = kvlab.capture(model, ids, what=("keys", "values"))
    cache = method.new_cache(model)
    seen = {}

    class Spy(PredictedLayer):
        def attend(self, query, key, value, mask, *, scaling, **kw):
            out = super().attend(query, key, value, mask, scaling=scaling, **kw)
            seen[self.layer_idx] = self.reconstruct()
            return out

    for layer in cache.layers:
        if isinstance(layer, PredictedLayer):
            layer.__class__ = Spy
    _logits(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None].expand_as(ids), cache)
    return {l: (float((k - cap.keys[l]).norm() / cap.keys[l].norm()), float((v - cap.values[l]).norm() /
                                                                            cap.values[l].norm()))
            for l, (k, v) in seen.items()}


def test_error_falls_with_rank_and_prediction_beats_no_prediction_on_its_calibration_data():
    model = kvlab.tiny_model("llama", n_layers=4)
    calib = _calib(n=8, t=32)
    errors = []
    for rank in (0, 4, 8, 16):
        method = CrossLayer(group=2, key_rank=rank, value_rank=rank, sinks=0).fit(model, calib)
        errors.append(_layer_errors(model, method, calib[:2]))
    for l in errors[0]:
        for part in (0, 1):
            series = [e[l][part] for e in errors]
            assert all(a >= b - 1e-6 for a, b in zip(series, series[1:])), series
            assert series[-1] < 1e-4  # rank 16 = head_dim: exact
    none = CrossLayer(group=2, key_rank=0, value_rank=0, map="none", sinks=0).fit(model, calib)
    for k, v in _layer_errors(model, none, calib[:2]).values():  # nothing predicted, nothing kept: all of it is error
        assert k == pytest.approx(1.0, abs=1e-6) and v == pytest.approx(1.0, abs=1e-6)
    pred = _layer_errors(model, CrossLayer(group=2, key_rank=0, value_rank=0, map="layer", sinks=0).fit(model, calib),
                         calib[:2])
    assert all(k < 1.0 and v < 1.0 for k, v in pred.values())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bytes_measured_equal_theoretical_and_the_plan(arch):
    model = kvlab.tiny_model(arch, n_layers=5)
    spec = kvlab.ModelSpec.from_model(model)
    method = CrossLayer(budget=0.6, group=3, sinks=2).fit(model, _calib())
    key, value = method.ranks(spec)
    assert method.anchors(spec) == [0, 3] and method.predicted(spec) == [1, 2, 4]
    assert key == value == int(spec.head_dim * (0.6 * 5 - 2) / 3)
    ids, mask, pos = left_padded_batch(97, [41, 30])
    cache = method.new_cache(model)
    _logits(model, ids, mask, pos, cache)
    assert abs(cache.kv_bytes().measured - cache.kv_bytes().theoretical) / cache.kv_bytes().theoretical < 0.02  # bf16 view
    b = cache.kv_bytes("fp32")  # the sizes below are the fp32 model's own
    assert abs(b.measured - b.theoretical) / b.theoretical < 0.02
    # codes + int32 positions + sink copies, from the sizes alone
    tokens, heads, dim, pos_bytes = 2 * 41, spec.n_kv_heads, spec.head_dim, 4
    expected = 2 * tokens * heads * 2 * dim * 4 + 3 * (tokens * heads * (key + value) * 4 + tokens * pos_bytes +
                                                        (2 + 2) * heads * 2 * dim * 4)
    assert b.theoretical == pytest.approx(expected, rel=1e-6)
    assert b.by("part").loc["K", "theoretical"] > 0


def test_budget_splits_between_keys_and_values():
    model = kvlab.tiny_model("llama", n_layers=4)
    spec = kvlab.ModelSpec.from_model(model)
    both = CrossLayer(budget=0.5, group=2).ranks(spec)
    assert both == (0, 0) and CrossLayer(budget=0.75, group=2).ranks(spec) == (8, 8)
    assert CrossLayer(budget=0.75, group=2, key_rank=2).ranks(spec) == (2, 14)
    with pytest.raises(ValueError, match="value_rank -2 is out of range"):
        CrossLayer(budget=0.5, group=2, key_rank=2).ranks(spec)


@pytest.mark.parametrize("options, spec_arch, message", [
    ({"keys": "pre_rope"}, "gpt2", "keys='pre_rope' needs a model with rotary"),
    ({"group": 9}, "llama", "group 9 is larger than the model's 3 layers"),
    ({"key_rank": 17, "value_rank": 4}, "llama", "key_rank 17 is out of range: residual ranks must be in 0..16"),
    ({"budget": 0.2, "group": 2}, "llama", "below what group 2 keeps in its anchors alone"),
])
def test_bad_input_is_a_clear_error(options, spec_arch, message):
    model = kvlab.tiny_model(spec_arch)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CrossLayer(**options).check(kvlab.ModelSpec.from_model(model))


def test_bad_options_and_a_fit_of_the_other_key_mode():
    for options, message in (({"group": 0}, "group must be an integer >= 1"), ({"map": "mlp"}, "map must be one of"),
                             ({"keys": "rope"}, "keys must be one of"), ({"key_rank": -1}, "key_rank must be")):
        with pytest.raises(ValueError, match=message):
            CrossLayer(**options)
    model = kvlab.tiny_model("llama")
    method = CrossLayer(keys="post_rope", sinks=0).fit(model, _calib())
    method.keys = "pre_rope"
    with pytest.raises(ValueError, match="fitted on post_rope keys"):
        method.new_cache(model)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    kvlab.tiny_model("gpt2").save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--method", "cross_layer", "--opt", "keys=pre_rope",
                 "--ppl", "wiki", "--limit", "1"]) == 2
    assert "needs a model with rotary" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--method", "cross_layer", "--opt", "group=40",
                 "--ppl", "wiki", "--limit", "1"]) == 2
    assert "group 40 is larger" in capsys.readouterr().err


def test_save_load_round_trip(tmp_path):
    model = kvlab.tiny_model("llama")
    method = CrossLayer(group=3, sinks=0).fit(model, _calib())
    path = method.save(tmp_path / "cl.safetensors", model=model)
    back = CrossLayer.load(path)
    assert back.group == 3 and back.provenance["keys"] == "pre_rope"
    torch.testing.assert_close(back.key_maps, method.key_maps)
    ids = _calib(seed=5, n=2, t=9)
    ones, pos = torch.ones_like(ids), torch.arange(9)[None].expand(2, -1)
    torch.testing.assert_close(_logits(model, ids, ones, pos, back.new_cache(model)),
                               _logits(model, ids, ones, pos, method.new_cache(model)))
