"""Cross-layer shared bases: exact at full rank, shared within a group, real bytes, clear errors."""

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.methods.shared_basis import BasisLayer, SharedBasis
from conftest import left_padded_batch


def _logits(model, ids, mask, pos, cache):
    with torch.no_grad(), kvlab.attach(model):
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


def _calib(seed=1, n=4, t=24):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("sinks", [0, 2])
def test_full_rank_reproduces_the_full_cache(tiny, group, sinks):
    spec = kvlab.ModelSpec.from_model(tiny)
    method = SharedBasis(group=group, sinks=sinks, key_rank=spec.head_dim, value_rank=spec.head_dim).fit(tiny, _calib())
    ids, mask, pos = left_padded_batch(97, [13, 7, 10])
    full_cache, cache = kvlab.methods.get("full").new_cache(tiny), method.new_cache(tiny)
    full = _logits(tiny, ids[:, :-1], mask[:, :-1], pos[:, :-1], full_cache)
    ours = _logits(tiny, ids[:, :-1], mask[:, :-1], pos[:, :-1], cache)
    torch.testing.assert_close(ours[mask[:, :-1].bool()], full[mask[:, :-1].bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(tiny, ids[:, -1:], mask, pos[:, -1:], cache),
                               _logits(tiny, ids[:, -1:], mask, pos[:, -1:], full_cache), atol=1e-5, rtol=0)


def test_layers_of_a_group_share_their_bases_and_group_one_is_per_layer_pca():
    model = kvlab.tiny_model("llama", n_layers=5)
    spec = kvlab.ModelSpec.from_model(model)
    method = SharedBasis(group=2, sinks=0, keys="post_rope").fit(model, _calib())
    assert method.groups(spec) == [[0, 1], [2, 3], [4]]
    kb, vb = method.bases(spec)
    assert torch.equal(kb[0], kb[1]) and torch.equal(vb[2], vb[3]) and not torch.equal(kb[1], kb[2])
    per_layer = SharedBasis(group=1, sinks=0, keys="post_rope", moments=method.moments)
    from kvlab.analysis.spectra import head_spectra

    reference = head_spectra(model, _calib(), parts=("keys",), centered=False, skip_first=0).eigenvectors["keys"]
    ours = per_layer.bases(spec)[0]
    overlap = (ours[..., :4].transpose(-1, -2) @ reference[..., :4]).abs()  # same top-4 subspace, up to sign/order
    assert torch.allclose(torch.linalg.svdvals(overlap), torch.ones(1), atol=1e-3)
    # a shared basis keeps less of each layer's energy than the layer's own, more than nothing
    assert SharedBasis(group=5, sinks=0, moments=method.moments, key_rank=4, value_rank=4).energy(spec)["K"] <= \
        SharedBasis(group=1, sinks=0, moments=method.moments, key_rank=4, value_rank=4).energy(spec)["K"] + 1e-6


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_bytes_measured_equal_theoretical(arch):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    method = SharedBasis(budget=0.5, group=2, sinks=2, key_rank=3).fit(model, _calib())
    key, value = method.ranks(spec)
    assert key == 3 and value == spec.head_dim - 3
    ids, mask, pos = left_padded_batch(97, [41, 30])
    cache = method.new_cache(model)
    _logits(model, ids, mask, pos, cache)
    assert abs(cache.kv_bytes().measured - cache.kv_bytes().theoretical) / cache.kv_bytes().theoretical < 0.02  # bf16 view
    b = cache.kv_bytes("fp32")  # the sizes below are the fp32 model's own
    assert abs(b.measured - b.theoretical) / b.theoretical < 0.02
    pos_bytes = 4 if spec.rope else 0
    tokens, heads = 2 * 41, spec.n_kv_heads
    expected = spec.n_layers * (tokens * heads * (key + value) * 4 + tokens * pos_bytes + 4 * heads * 2 *
                                spec.head_dim * 4)
    assert b.theoretical == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("options, arch, message", [
    ({"keys": "pre_rope"}, "gpt2", "keys='pre_rope' needs a model with rotary"),
    ({"group": 4}, "llama", "group 4 is larger than the model's 3 layers"),
    ({"key_rank": 17, "value_rank": 4}, "llama", "key_rank 17 is out of range: ranks must be in 1..16"),
])
def test_bad_input_is_a_clear_error(options, arch, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SharedBasis(**options).check(kvlab.ModelSpec.from_model(kvlab.tiny_model(arch)))


def test_a_fit_of_the_other_key_mode_is_refused_and_cli_exits_2(tmp_path, capsys):
    model = kvlab.tiny_model("llama")
    method = SharedBasis(keys="post_rope", sinks=0).fit(model, _calib())
    method.keys = "pre_rope"
    with pytest.raises(ValueError, match="fitted on post_rope keys"):
        method.new_cache(model)
    kvlab.tiny_model("gpt2").save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--method", "shared_basis", "--opt", "group=9", "--ppl", "wiki",
                 "--limit", "1"]) == 2
    assert "group 9 is larger" in capsys.readouterr().err


def test_save_load_round_trip(tmp_path):
    model = kvlab.tiny_model("gemma3")
    method = SharedBasis(group=2, sinks=0).fit(model, _calib())
    back = SharedBasis.load(method.save(tmp_path / "sb.safetensors", model=model))
    assert back.group == 2 and back.provenance["keys"] == "pre_rope"
    ids = _calib(seed=5, n=2, t=9)
    ones, pos = torch.ones_like(ids), torch.arange(9)[None].expand(2, -1)
    torch.testing.assert_close(_logits(model, ids, ones, pos, back.new_cache(model)),
                               _logits(model, ids, ones, pos, method.new_cache(model)))
