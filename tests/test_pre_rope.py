"""Pre-RoPE key projection (keys="pre_rope"): the cache un-rotates on write, stores U^T k_pre, rebuilds and rotates
on read. Exact at full rank, equal to an independent reference at low rank, decode read = reconstruct path, bytes
measured = theoretical, clear errors (no RoPE, artefact of the other key mode, rotary missing)."""

import pytest
import torch

import kvlab
from kvlab.cache import FullLayer, KVLabCache
from kvlab.methods import PCA, MatryoshkaKV
from kvlab.cache.projected import ProjectedLayer
from kvlab.rope import Rotary
from conftest import left_padded_batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


def _bases(spec, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.linalg.qr(torch.randn(spec.head_dim, spec.head_dim, generator=g))[0][:, : ranks[h]]
             for h in range(spec.n_kv_heads)] for _ in range(spec.n_layers)]


def _pre_rope_cache(model, key_ranks, value_ranks, sinks=0, fast=True):
    spec = kvlab.ModelSpec.from_model(model)
    kb, vb = _bases(spec, key_ranks, 0), _bases(spec, value_ranks, 1)
    layers = [ProjectedLayer(i, kb[i], vb[i], sinks, rotary=Rotary.from_model(model, i)) for i in range(spec.n_layers)]
    for layer in layers:
        layer.fast_decode = fast
    return KVLabCache(layers), kb, vb


def _run(model, cache, ids, mask, steps=0):
    """Logits (B, T + steps, V) of a left-padded prefill then ``steps`` greedy decode steps."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), kvlab.attach(model):
        out = [model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits]
        last = pos[:, -1]
        for _ in range(steps):
            nxt = out[-1][:, -1].argmax(-1)
            last = last + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out.append(model(nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache,
                             use_cache=True).logits)
    return torch.cat(out, 1), mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("sinks", [0, 2])
def test_full_rank_pre_rope_reproduces_full_logits(arch, sinks):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, _ = left_padded_batch(97, [13, 7], seed=1)
    full = [spec.head_dim] * spec.n_kv_heads
    ref, ref_mask = _run(model, KVLabCache([FullLayer(i) for i in range(spec.n_layers)]), ids, mask, steps=4)
    cache, *_ = _pre_rope_cache(model, full, full, sinks)
    ours, _ = _run(model, cache, ids, mask, steps=4)
    real = ref_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)


class _RebuildRotatedFull(FullLayer):
    """Independent reference: a full cache fed R(p) U U^T R(p)^T k and W W^T v (positions from the model)."""

    def __init__(self, layer_idx, kb, vb, rotary, positions):
        super().__init__(layer_idx)
        self.kb, self.vb, self.rotary, self.pos = kb, vb, rotary, positions

    def _store(self, k, v):
        p = self.pos[:, self.length: self.length + k.shape[2]]
        pre = self.rotary.unrotate(k, p)
        k = self.rotary.rotate(torch.stack([pre[:, h] @ u @ u.T for h, u in enumerate(self.kb)], 1), p)
        v = torch.stack([v[:, h] @ w @ w.T for h, w in enumerate(self.vb)], 1)
        return super()._store(k, v)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_low_rank_pre_rope_equals_reference_and_decode_read_equals_reconstruct(arch):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, _ = left_padded_batch(97, [11, 6], seed=2)
    ranks_k = [max(1, spec.head_dim // 3 - 2 * h) for h in range(spec.n_kv_heads)]  # ragged, odd
    ranks_v = [max(1, spec.head_dim // 2 + 3 * h) for h in range(spec.n_kv_heads)]
    fast, kb, vb = _pre_rope_cache(model, ranks_k, ranks_v, sinks=2, fast=True)
    ours, full_mask = _run(model, fast, ids, mask, steps=3)
    slow, *_ = _pre_rope_cache(model, ranks_k, ranks_v, sinks=2, fast=False)
    recon, _ = _run(model, slow, ids, mask, steps=3)
    real = full_mask.bool()
    torch.testing.assert_close(ours[real], recon[real], atol=1e-5, rtol=0)
    # prefill against the independent reference (no sinks there: compare a sink-free cache)
    nosink, kb, vb = _pre_rope_cache(model, ranks_k, ranks_v, sinks=0, fast=False)
    got, _ = _run(model, nosink, ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    reference = KVLabCache([_RebuildRotatedFull(i, kb[i], vb[i], Rotary.from_model(model, i), positions)
                            for i in range(spec.n_layers)])
    want, _ = _run(model, reference, ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
    plain = model(ids, attention_mask=mask, position_ids=positions).logits
    assert not torch.allclose(got[mask.bool()], plain[mask.bool()], atol=1e-3)


def test_bytes_measured_equal_theoretical_and_count_positions():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    cache, *_ = _pre_rope_cache(model, [5] * spec.n_kv_heads, [7] * spec.n_kv_heads, sinks=0)
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    _run(model, cache, ids, torch.ones_like(ids))
    b = cache.kv_bytes("fp32")  # the sizes below are the fp32 model's own
    codes = 2 * 19 * spec.n_kv_heads * (5 + 7) * 4 * spec.n_layers
    assert b.theoretical == codes + 2 * 19 * 4 * spec.n_layers  # + int32 positions
    assert abs(b.measured - b.theoretical) <= 0.02 * b.theoretical
    with torch.no_grad(), kvlab.attach(model):  # decode grows codes and positions together (allocator slack)
        model(ids[:, :1], position_ids=torch.full((2, 1), 19), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.positions.shape[1] == layer._groups[0].keys.shape[2] > 20 and layer.positions[:, 19].tolist() == [19, 19]


def _ids(n=4, length=20, seed=0):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", [PCA, MatryoshkaKV])
def test_methods_pre_rope_exact_at_full_rank_and_lower_key_rank(cls):
    model = kvlab.tiny_model("llama")
    extra = {"steps": 2, "lr": 0.05, "progress": False} if cls is MatryoshkaKV else {}
    method = cls(budget=1.0, sinks=1, keys="pre_rope").fit(model, _ids(), **extra)
    assert method.provenance["pca"]["keys"] == "pre_rope"
    ids = _ids(2, 17, seed=3)
    full = model(ids).logits
    with torch.no_grad(), method.apply(model) as cache:
        ours = model(ids, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
    assert all(layer.rotary is not None for layer in cache.layers)
    half = cls(budget=0.5, sinks=1, keys="pre_rope", key_bases=method.key_bases, value_bases=method.value_bases)
    with torch.no_grad(), half.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
    b = cache.kv_bytes()
    assert abs(b.measured - b.theoretical) <= 0.02 * b.theoretical


def test_matryoshka_pre_rope_trains():
    model = kvlab.tiny_model("gemma3")
    press = MatryoshkaKV(budget=0.5, sinks=1, keys="pre_rope", schedule="starbucks").fit(
        model, _ids(), steps=2, lr=0.05, progress=False)
    assert (press.key_bases - press.init_key_bases).abs().max() > 1e-4


def test_errors_no_rope_other_key_mode_and_missing_rotary(tmp_path):
    gpt2 = kvlab.tiny_model("gpt2")
    with pytest.raises(ValueError, match="needs a RoPE model"):
        PCA(keys="pre_rope").fit(gpt2, _ids())
    with pytest.raises(ValueError, match="keys must be one of 'pre_rope', 'post_rope', got 'before'"):
        PCA(keys="before")
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    post = PCA(budget=0.5, sinks=1).fit(model, _ids())
    path = post.save(tmp_path / "post.safetensors", model)
    with pytest.raises(ValueError, match="post_rope"):
        PCA.load(path, keys="pre_rope")
    with pytest.raises(ValueError, match="keys='post_rope'"):
        PCA(budget=0.5, keys="pre_rope", source=str(path)).prepare(model, None)
    pre = PCA(budget=0.5, sinks=1, keys="pre_rope").fit(model, _ids())
    path = pre.save(tmp_path / "pre.safetensors", model)
    assert PCA.load(path).keys == "pre_rope"  # the record's key mode comes with the artefact
    with pytest.raises(ValueError, match="pre_rope"):
        PCA.load(path, keys="post_rope")
    with pytest.raises(ValueError, match="new_cache"):
        pre.make_layer(0, spec)


def test_bench_decode_runs_pre_rope_beside_post_rope_and_cli_errors(capsys):
    from kvlab.eval import bench
    from kvlab.cli import main

    model = kvlab.tiny_model("llama")
    post = PCA(budget=0.5, sinks=2, source=None).fit(model, _ids())
    pre = PCA(budget=0.5, sinks=2, keys="pre_rope", source=None).fit(model, _ids())
    pre.bench_label = "pca@keys=pre_rope"
    table = bench.decode_speed(model, None, [post, pre], contexts=[24], budget=0.5, new_tokens=3, repeats=1,
                               progress=False)
    assert table.method.tolist() == ["none", "pca", "pca@keys=pre_rope"] and (table.tokens_per_s > 0).all()
    for argv, message in ((["bench", "decode", "--methods", "pca@keys=sideways"], "keys must be one of"),
                          (["eval", "--method", "pca", "--opt", "values=aware", "--ppl", "wiki"], "values must be one of"),
                          (["eval", "--method", "matryoshka", "--opt", "values=output_aware", "--ppl", "wiki"],
                           "values must be 'plain'")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
