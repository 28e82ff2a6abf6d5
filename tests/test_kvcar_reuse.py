"""kvcar+reuse (KV-CAR's two halves in one cache) on tiny random models (llama: GQA + RoPE, gpt2: MHA): equal to an
independent decode-then-copy reference, the budget rule, real bytes showing both savings, reuse alone when nothing is
coded, KVCAR alone when nothing is reused, generate with left padding."""

import math

import pytest
import torch

import kvlab
from kvlab.cache import FullLayer, KVLabCache
from kvlab.methods.kvcar_reuse import CodedReuseLayer, KVCARReuse
from kvlab.methods.kvcar import KVCAR
from kvlab.methods.reuse import Reuse
from conftest import left_padded_batch

ARCHS = ["llama", "gpt2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


def _ids(n=4, length=24, seed=0):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


_FITTED = {}


def _parts(arch, n_layers=6, sinks=0):
    """(model, fitted KVCAR at budget 0.5, measured similarity), cached per arch."""
    key = (arch, n_layers, sinks)
    if key not in _FITTED:
        model = kvlab.tiny_model(arch, n_layers=n_layers)
        kvcar = KVCAR(budget=0.5, sinks=sinks, steps=0, recon_steps=20, score_chunks=2, score_chunk_len=16,
                      source=None).fit(model, _ids(), progress=False)
        similarity = Reuse(budget=0.5, skip_first=2).fit(model, _ids(seed=1)).similarity
        _FITTED[key] = model, kvcar, similarity
    return _FITTED[key]


def _logits(model, cache, ids, mask=None, pos=None):
    with torch.no_grad(), kvlab.attach(model):
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


class _Reference(FullLayer):
    """Independent reference: a full cache whose coded layers store dec(enc(x)) and whose reused heads are
    overwritten, at update time, with what the layer below stored for the same tokens (already decoded)."""

    def __init__(self, layer_idx, reused, below, ae):
        super().__init__(layer_idx)
        self.reused, self.below, self.ae = reused, below, ae

    def _store(self, k, v):
        new = k.shape[-2]
        if self.ae is not None:
            gk, gv = self.ae.group(self.layer_idx, 0), self.ae.group(self.layer_idx, 1)
            k, v = self.ae.decode(self.ae.encode(k, gk), gk), self.ae.decode(self.ae.encode(v, gv), gv)
        k, v = k.clone(), v.clone()
        for h, r in enumerate(self.reused):
            if r:
                k[:, h] = self.below.keys[:, h, self.length:self.length + new]
                v[:, h] = self.below.values[:, h, self.length:self.length + new]
        return super()._store(k, v)


def _reference(method, spec):
    reused, layers, _ = method.plan(spec)
    out = []
    for i in range(spec.n_layers):
        ae = method.kvcar.autoencoders if i in layers else None
        out.append(_Reference(i, reused[i].tolist(), out[-1] if out else None, ae))
    return KVLabCache(out)


@pytest.mark.parametrize("arch, budget, share", [("llama", 0.3, 0.25), ("gpt2", 0.45, 0.5)])
def test_equals_decode_then_copy_reference_prefill_and_decode(arch, budget, share):
    model, kvcar, sim = _parts(arch)
    spec = kvlab.ModelSpec.from_model(model)
    method = KVCARReuse(budget=budget, reuse_share=share, kvcar=kvcar, similarity=sim)
    reused, layers, d = method.plan(spec)
    assert reused.any() and layers and d == 4  # both halves active
    assert any(reused[l].any() and not reused[l].all() for l in layers)  # a coded layer with a reused head
    assert any(reused[l + 1].any() for l in layers if l + 1 < spec.n_layers)  # a head reading decoded entries
    assert any(reused[l - 1, h] and reused[l, h] for l in range(2, spec.n_layers) for h in range(spec.n_kv_heads))
    ids, mask, pos = left_padded_batch(97, [13, 7], seed=4)
    cache, ref = method.new_cache(model), _reference(method, spec)
    ours, theirs = _logits(model, cache, ids, mask, pos), _logits(model, ref, ids, mask, pos)
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)
    for step in range(3):  # token-by-token decode, positions continuing per row
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        tok = torch.randint(3, 97, (2, 1), generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(_logits(model, cache, tok, mask, pos), _logits(model, ref, tok, mask, pos),
                                   atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ref.get_seq_length() == 16


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget, share", [(0.6, 0.5), (0.45, 0.5), (0.45, 0.25), (0.3, 0.7)])
def test_budget_rule_and_bytes_show_both_savings(arch, budget, share):
    model, kvcar, sim = _parts(arch)
    spec = kvlab.ModelSpec.from_model(model)
    L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
    method = KVCARReuse(budget=budget, reuse_share=share, kvcar=kvcar, similarity=sim)
    reused, layers, d = method.plan(spec)
    # reuse takes its share of the saving, exactly as Reuse alone would at that budget
    assert int(reused.sum()) == min(math.ceil(share * (1 - budget) * L * H - 1e-9), (L - 1) * H)
    assert torch.equal(reused, Reuse(budget=method.reuse_budget, similarity=sim).selection(spec))
    kept = method.kept_fraction(spec)
    assert kept <= budget + 1e-9
    if layers:  # the fewest cheapest layers: dropping the last one added would miss the budget
        order = [l for l in torch.argsort(kvcar.layer_scores, stable=True).tolist() if not reused[l].all()]
        assert layers == sorted(order[:len(layers)])
        last = order[len(layers) - 1]
        assert kept + int((~reused[last]).sum()) * (1 - d / D) / (L * H) > budget + 1e-9
    batch, tokens = 3, 10
    cache = method.new_cache(model)
    _logits(model, cache, _ids(batch, tokens, seed=2))
    report = cache.kv_bytes("fp32")
    assert report.measured == report.theoretical  # no sinks: exact, after prefill
    assert report.theoretical == round(kept * report.full)
    assert report.budget == pytest.approx(kept)
    table = report.table
    expected_dims = torch.where(torch.isin(torch.arange(L), torch.tensor(layers or [-1])), d, D)  # (L,)
    for (l, h), rows in table.groupby(["layer", "head"]):
        if reused[l, h]:
            assert (rows["theoretical"] == 0).all() and (rows["dims_kept"] == 0).all()
            assert (rows["reused_from"] >= 0).all() and (rows["reused_from"] < l).all()
        else:
            assert (rows["dims_kept"] == int(expected_dims[l])).all() and (rows["reused_from"] == -1).all()
            assert (rows["theoretical"] == batch * tokens * int(expected_dims[l]) * 4).all()
    for layer in cache.layers:
        assert isinstance(layer, CodedReuseLayer)
        if layer.compressed:  # only the own heads' codes are allocated
            assert layer.inner.key_codes.shape == (batch, len(layer.own), tokens, d)
            assert layer.keys is None


@pytest.mark.parametrize("arch", ARCHS)
def test_bytes_with_sinks_within_two_percent(arch):
    model, kvcar, sim = _parts(arch, sinks=2)
    spec = kvlab.ModelSpec.from_model(model)
    method = KVCARReuse(budget=0.45, kvcar=kvcar, similarity=sim)
    ids, mask, pos = left_padded_batch(97, [40, 31], seed=3)
    cache = method.new_cache(model)
    _logits(model, cache, ids, mask, pos)
    report = cache.kv_bytes("fp32")
    assert abs(report.measured - report.theoretical) <= 0.02 * report.theoretical
    assert method.kept_fraction(spec) < report.theoretical_budget < method.kept_fraction(spec) + 0.03  # + sinks
    assert report.budget <= 0.45 + 0.03


@pytest.mark.parametrize("arch", ARCHS)
def test_reuse_share_one_is_reuse_alone(arch):
    model, _, sim = _parts(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, [12, 9], seed=6)
    for budget in (0.8, 0.5):
        both = KVCARReuse(budget=budget, reuse_share=1.0, similarity=sim)  # no KVCAR at all: nothing to code
        alone = Reuse(budget=budget, similarity=sim)
        reused, layers, _ = both.plan(spec)
        assert layers == [] and torch.equal(reused, alone.selection(spec))
        c1, c2 = both.new_cache(model), alone.new_cache(model)
        torch.testing.assert_close(_logits(model, c1, ids, mask, pos), _logits(model, c2, ids, mask, pos),
                                   atol=0, rtol=0)
        assert c1.kv_bytes("fp32").as_dict() == c2.kv_bytes("fp32").as_dict()
    # explicit heads (fixed option): reuse exactly those, codes cover the rest of the budget
    heads = Reuse(budget=0.7, similarity=sim).selection(spec).tolist()
    fixed = KVCARReuse(budget=0.7, reuse_options={"heads": heads})
    assert torch.equal(fixed.plan(spec)[0], torch.tensor(heads)) and fixed.plan(spec)[1] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_nothing_reused_is_kvcar_alone(arch):
    model, kvcar, sim = _parts(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, [12, 9], seed=7)
    for budget in (0.8, 0.5, 0.3):
        alone = kvcar.with_budget(budget)
        for both in (KVCARReuse(budget=budget, reuse_share=0.0, kvcar=kvcar, similarity=sim),
                     KVCARReuse(budget=budget, kvcar=kvcar,
                                reuse_options={"heads": [[False] * spec.n_kv_heads] * spec.n_layers})):
            reused, layers, d = both.plan(spec)
            assert not reused.any() and (layers, d) == alone.plan(spec)
            c1, c2 = both.new_cache(model), alone.new_cache(model)
            torch.testing.assert_close(_logits(model, c1, ids, mask, pos), _logits(model, c2, ids, mask, pos),
                                       atol=0, rtol=0)
            assert c1.kv_bytes("fp32").as_dict() == c2.kv_bytes("fp32").as_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_batch_two_left_padding(arch):
    model, kvcar, sim = _parts(arch)
    spec = kvlab.ModelSpec.from_model(model)
    method = KVCARReuse(budget=0.45, kvcar=kvcar, similarity=sim)
    ids, mask, _ = left_padded_batch(97, [11, 6], seed=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), method.apply(model) as cache:
        out = model.generate(ids, past_key_values=cache, **kwargs)
        expected = model.generate(ids, past_key_values=_reference(method, spec), **kwargs)
    assert out.shape == (2, 17) and torch.equal(out, expected)
    # theoretical bytes follow the plan while decoding (measured has FullLayer's decode slack, >= 32 tokens)
    assert cache.get_seq_length() == 16 and cache.kv_bytes("fp32").theoretical_budget == pytest.approx(
        method.kept_fraction(spec))
    sinks_model, sinks_kvcar, sinks_sim = _parts(arch, sinks=2)
    with torch.no_grad(), KVCARReuse(budget=0.45, kvcar=sinks_kvcar, similarity=sinks_sim).apply(sinks_model) as c:
        out = sinks_model.generate(ids, past_key_values=c, **kwargs)  # sinks kept uncompressed: runs through too
    assert out.shape == (2, 17)


def test_batch_select_and_reset_follow_the_reference():
    model, kvcar, sim = _parts("gpt2")
    spec = kvlab.ModelSpec.from_model(model)
    method = KVCARReuse(budget=0.45, kvcar=kvcar, similarity=sim)
    ids, mask, pos = left_padded_batch(97, [9, 12], seed=5)
    cache, ref = method.new_cache(model), _reference(method, spec)
    for c in (cache, ref):
        _logits(model, c, ids, mask, pos)
        c.batch_select_indices(torch.tensor([1, 1, 0]))  # as the multiple-choice harness expands contexts
    mask3 = torch.cat([mask[[1, 1, 0]], torch.ones(3, 2, dtype=mask.dtype)], 1)
    pos3 = pos[[1, 1, 0]][:, -1:] + torch.arange(1, 3)
    tok = torch.randint(3, 97, (3, 2))
    torch.testing.assert_close(_logits(model, cache, tok, mask3, pos3), _logits(model, ref, tok, mask3, pos3),
                               atol=1e-5, rtol=0)
    cache.reset()
    assert cache.get_seq_length() == 0
    fresh = _reference(method, spec)
    torch.testing.assert_close(_logits(model, cache, ids, mask, pos)[mask.bool()],
                               _logits(model, fresh, ids, mask, pos)[mask.bool()], atol=1e-5, rtol=0)


def test_prepare_only_fits_what_the_plan_needs(monkeypatch):
    model, kvcar, sim = _parts("llama")
    calls = []
    monkeypatch.setattr(KVCAR, "prepare", lambda self, m, t: calls.append(self) or self)
    KVCARReuse(budget=0.6, reuse_share=1.0, similarity=sim).prepare(model, None)
    assert calls == []  # reuse alone meets the budget: no KVCAR loaded or fitted
    method = KVCARReuse(budget=0.6, similarity=sim, kvcar=kvcar).prepare(model, None)
    assert calls == [kvcar] and method.plan(kvlab.ModelSpec.from_model(model))[1]


def test_errors_say_what_is_allowed():
    model, kvcar, sim = _parts("llama")
    spec = kvlab.ModelSpec.from_model(model)
    with pytest.raises(ValueError, match=r"reuse_share must be in \[0, 1\]"):
        KVCARReuse(reuse_share=1.5)
    with pytest.raises(ValueError, match="unknown reuse_options budget; allowed: heads, threshold"):
        KVCARReuse(reuse_options={"budget": 0.5})
    with pytest.raises(ValueError, match="choose the reused heads one way"):
        KVCARReuse(reuse_options={"heads": [[False, False]] * 6, "threshold": 0.5})
    with pytest.raises(RuntimeError, match="needs KV-CAR codes, but there are no autoencoders yet"):
        KVCARReuse(budget=0.5, similarity=sim).new_cache(model)
    with pytest.raises(ValueError, match=r"budget 0.05 cannot be met.*allowed budgets: \[0\.\d+, 1\]"):
        KVCARReuse(budget=0.05, kvcar=kvcar, similarity=sim).plan(spec)
    cache = KVCARReuse(budget=0.45, kvcar=kvcar, similarity=sim).new_cache(model)
    _logits(model, cache, _ids(1, 5))
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        next(l for l in cache.layers if l.compressed).crop(-1)
