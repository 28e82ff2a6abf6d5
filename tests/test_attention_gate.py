"""Attention-Gate (learned in-context eviction): exact at budget 1, prefill attention equals an explicitly masked
reference, really frees bytes, batches with left padding, straight-through gradients, training moves the keep rate,
save/load round trip, option errors."""

import math

import pytest
import torch

import kvlab
from kvlab import attention
from kvlab.methods import artefacts
from kvlab.capturing import attention_modules
from kvlab.methods.attention_gate import AttentionGate, GateLayer
from conftest import left_padded_batch


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _forward(model, ids, mask, pos, cache=None):
    return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None).logits


def _gate(model, budget=0.5, seed=0, **options):
    options.setdefault("local", 1)  # exact kept counts: no local window unless a test asks for one
    return AttentionGate(budget, **options).init_gate(model, seed=seed)


def _kept_columns(cache):
    """Per layer, per row, per kv head: sorted kept mask columns."""
    return [[[sorted(c for c in head.tolist() if c >= 0) for head in row] for row in layer.index]
            for layer in cache.layers]


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_budget_one_equals_full_cache(arch):
    model = kvlab.tiny_model(arch)
    lengths = [19, 7, 12]
    ids, mask, pos = left_padded_batch(97, lengths, seed=1)
    cont = torch.randint(3, 97, (3, 4))
    method = _gate(model, 1.0)
    with torch.no_grad(), method.apply(model) as cache:
        out = [_forward(model, ids, mask, pos, cache)]
        full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
        out.append(_forward(model, cont, full_mask, pos[:, -1:] + 1 + torch.arange(4), cache))
        for t in range(2):  # decoding
            full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            out.append(_forward(model, cont[:, t:t + 1], full_mask, pos[:, -1:] + 5 + t, cache))
    all_ids = torch.cat([ids, cont, cont[:, :2]], 1)
    with torch.no_grad():
        ref = _forward(model, all_ids, full_mask, attention.padded_positions(full_mask))
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(out, 1)[real], ref[real], atol=1e-5, rtol=0)
    layer = cache.layers[-1]
    assert int((layer.index >= 0).sum()) == layer.n_heads * (sum(lengths) + 6 * 3)  # padding never stored


# ---------------------------------------------------------------------------------------------- in-context masking


def _reference_logits(model, method, ids, mask):
    """Independent in-context eviction: the plain model (no cache) with a test-local attention function that scores
    each layer's input hidden states with the method's gate, picks per (row, kv head) the sinks plus the top-scoring
    real tokens in plain python, and masks the logits explicitly. Returns logits and the kept sets per layer."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    captured, kept = {}, {}
    modules = attention_modules(model)

    def capture(i):
        return lambda _m, args, kwargs: captured.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None))

    def attn(module, q, k, v, am, scaling=None, dropout=0.0, **kwargs):
        i = module.layer_idx
        with torch.no_grad():
            s = method.gate(i, captured[i])  # (B, H_kv, T)
        batch, n_kv, width = s.shape
        keep = torch.zeros(batch, n_kv, width, dtype=torch.bool)
        sets = []
        for b in range(batch):
            real = [j for j in range(width) if mask[b, j]]
            n_keep = max(1, _round(method.budget * len(real)))
            sinks = real[: method.sinks][:n_keep]
            row = []
            for h in range(n_kv):
                others = sorted(real[len(sinks):], key=lambda j: (-float(s[b, h, j]), j))
                chosen = sorted(sinks + others[: n_keep - len(sinks)])
                keep[b, h, chosen] = True
                row.append(chosen)
            sets.append(row)
        kept[i] = sets
        cols = torch.arange(width)
        near = (cols[:, None] - cols[None, :]) < method.local  # (Tq, Tk): query i sees j if i - j < local
        allowed = am[:, :1] & (keep[:, :, None, :] | near)  # (B, H_kv, T, T)
        group = q.shape[1] // n_kv
        allowed = allowed.repeat_interleave(group, 1)
        logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scaling
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        out = probs @ v.double().repeat_interleave(group, 1)
        return out.transpose(1, 2).to(q.dtype), None

    AttentionInterface.register("gate_ref_test", attn)
    AttentionMaskInterface.register("gate_ref_test", attention.kvlab_mask)
    previous = model.config._attn_implementation
    hooks = [m.register_forward_pre_hook(capture(i), with_kwargs=True) for i, m in modules.items()]
    try:
        model.set_attn_implementation("gate_ref_test")
        with torch.no_grad():
            logits = _forward(model, ids, mask, attention.padded_positions(mask))
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)
    return logits, [kept[i] for i in range(len(modules))]


@pytest.mark.parametrize("arch,lengths,budget,sinks,local", [
    ("llama", [13, 7], 0.4, 2, 1), ("gpt2", [15], 0.5, 0, 3), ("gemma3", [16, 9], 0.3, 1, 2)])
def test_prefill_attention_ignores_evicted_tokens(arch, lengths, budget, sinks, local):
    model = kvlab.tiny_model(arch)
    ids, mask, pos = left_padded_batch(97, lengths, seed=4)
    method = _gate(model, budget, sinks=sinks, local=local, seed=3)
    with torch.no_grad(), method.apply(model) as cache:
        ours = _forward(model, ids, mask, pos, cache)
    ref, kept = _reference_logits(model, method, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)
    with torch.no_grad():
        full = _forward(model, ids, mask, pos)
    assert (ours[real] - full[real]).abs().max() > 1e-3  # eviction changed something
    width = ids.shape[1]
    for layer_sets, ref_sets in zip(_kept_columns(cache), kept):
        for row_sets, ref_row in zip(layer_sets, ref_sets):
            for got, want in zip(row_sets, ref_row):  # + the last local - 1 columns, still in the next query's window
                assert got == sorted(set(want) | set(range(width - (local - 1), width)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_threshold_selection_is_causal_teacher_forced_equals_decoding(arch):
    """selection="threshold": flags depend on the token alone, so one teacher-forced pass equals prefill + token by
    token decoding, window bookkeeping (local=3) included."""
    model = kvlab.tiny_model(arch)
    ids, mask, pos = left_padded_batch(97, [20, 14], seed=6)
    method = _gate(model, 0.5, selection="threshold", local=3, sinks=1, seed=2)
    with torch.no_grad(), method.apply(model) as cache:
        whole = _forward(model, ids, mask, pos, cache)
    split = 12
    with torch.no_grad(), method.apply(model) as cache2:
        parts = [_forward(model, ids[:, :split], mask[:, :split], pos[:, :split], cache2)]
        for t in range(split, ids.shape[1]):
            parts.append(_forward(model, ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache2))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], whole[real], atol=1e-5, rtol=0)
    assert _kept_columns(cache) == _kept_columns(cache2)
    assert any(len(h) < 14 for row in _kept_columns(cache)[0] for h in row)


# ---------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("arch,batch,tokens,budget", [("llama", 2, 40, 0.5), ("gpt2", 3, 50, 0.2),
                                                      ("gemma3", 2, 33, 0.35)])
def test_measured_bytes_equal_theoretical_and_kept_fraction_is_budget(arch, batch, tokens, budget):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (batch, tokens))
    method = _gate(model, budget)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, None, None, cache)
        method.compress(cache)  # no-op: eviction already happened
        b = cache.kv_bytes("fp32")
        cont = torch.randint(3, 97, (batch, 11))  # a continuation chunk: top-k again, equal counts per head
        _forward(model, cont, torch.ones(batch, tokens + 11, dtype=torch.long),
                 torch.arange(tokens, tokens + 11).expand(batch, -1), cache)
    after = cache.kv_bytes("fp32")
    assert after.theoretical == batch * (_round(budget * tokens) + _round(budget * 11)) * spec.kv_bytes_per_token()
    assert after.theoretical <= after.measured <= 1.02 * after.theoretical
    keep = _round(budget * tokens)
    assert b.theoretical == batch * keep * spec.kv_bytes_per_token()
    assert b.full == batch * tokens * spec.kv_bytes_per_token()
    assert b.theoretical <= b.measured <= 1.02 * b.theoretical  # + int16 column index and (B, H_kv) thresholds
    assert abs(b.theoretical_budget - budget) <= 0.5 / tokens + 1e-12
    slots = keep + _round(budget * 11)
    assert all(layer.keys.shape == (batch, spec.n_kv_heads, slots, spec.head_dim) for layer in cache.layers)


def test_decoding_keeps_about_the_budget_and_padding_is_never_kept():
    model = kvlab.tiny_model("llama")
    lengths = [30, 18]
    ids, mask, pos = left_padded_batch(97, lengths, seed=8)
    method = _gate(model, 0.4, sinks=2)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        for layer in cache.layers:
            assert layer.occupied().tolist() == [[_round(0.4 * n)] * 2 for n in lengths]
        for t in range(20):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            _forward(model, torch.randint(3, 97, (2, 1)), mask, pos[:, -1:] + 1 + t, cache)
    pad = ids.shape[1] - lengths[1]
    rates = []
    for layer in cache.layers:
        assert int((layer.index[1] >= 0).logical_and(layer.index[1] < pad).sum()) == 0  # padding columns
        rates.append(layer.occupied().double() / layer.real_seen[:, None])
    assert 0.15 < float(torch.stack(rates).mean()) < 0.65  # the prompt-calibrated threshold keeps ~ the budget


# ---------------------------------------------------------------------------------------------- batches, generate


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_batch_with_left_padding_equals_rows_alone(arch):
    model = kvlab.tiny_model(arch)
    lengths = [14, 8]
    ids, mask, _ = left_padded_batch(97, lengths, seed=3)
    method = _gate(model, 0.5, sinks=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), method.apply(model) as cache:
        batched = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
    assert isinstance(cache.layers[0], GateLayer)
    sets = _kept_columns(cache)
    for row, n in enumerate(lengths):
        with torch.no_grad(), method.apply(model) as single:
            alone = model.generate(input_ids=ids[row:row + 1, -n:], attention_mask=mask[row:row + 1, -n:],
                                   past_key_values=single, **kwargs)
        assert batched[row, -6:].tolist() == alone[0, -6:].tolist()
        shift = ids.shape[1] - n
        for layer_sets, single_sets in zip(sets, _kept_columns(single)):
            assert [[c - shift for c in h] for h in layer_sets[row]] == single_sets[0]


def test_multiple_choice_throughout_expands_a_gated_context():
    from kvlab.eval.multiple_choice import loglikelihood_tokens, naive_loglikelihood_tokens

    model = kvlab.tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ctx = [tuple(torch.randint(3, 97, (n,), generator=g).tolist()) for n in (9, 14)]
    pairs = [(c, tuple(torch.randint(3, 97, (m,), generator=g).tolist())) for c in ctx for m in (1, 3)]
    full = naive_loglikelihood_tokens(model, pairs)
    same = loglikelihood_tokens(model, _gate(model, 1.0), pairs, protocol="throughout", progress=False)
    assert [s for s, _ in same] == pytest.approx(full, abs=1e-4)
    half = loglikelihood_tokens(model, _gate(model, 0.5), pairs, protocol="throughout", progress=False)
    assert all(math.isfinite(s) for s, _ in half)


def test_perplexity_protocols():
    from kvlab.eval.perplexity import perplexity

    model = kvlab.tiny_model("llama")
    chunks = torch.randint(3, 97, (2, 40))
    for protocol in ("throughout", "context"):
        full = perplexity(model, None, kvlab.methods.Full(), chunks, protocol=protocol, progress=False)
        same = perplexity(model, None, _gate(model, 1.0), chunks, protocol=protocol, progress=False)
        assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    half = perplexity(model, None, _gate(model, 0.5), chunks, protocol="throughout", progress=False)
    assert half["kv_bytes"]["theoretical_budget"] == pytest.approx(0.5)
    assert AttentionGate.protocols == ("throughout", "context")


# ---------------------------------------------------------------------------------------------- training


def test_straight_through_gradients_reach_the_gate_and_forward_is_hard():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (2, 16))
    method = _gate(model, 0.3, sinks=1, selection="threshold", sparsity_weight=0.0, seed=1)
    with torch.no_grad(), method.apply(model) as cache:
        hard = _forward(model, ids, None, None, cache)
    with method.train_mode(), method.attached(model):
        live = _forward(model, ids, None, None, method.new_cache(model))
        torch.nn.functional.cross_entropy(live[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    torch.testing.assert_close(live, hard, atol=1e-5, rtol=0)  # forward: the same hard flags (s > 0)
    grad = method.gate.w.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert all(float(grad[i].abs().sum()) > 0 for i in range(grad.shape[0]))  # every layer's gate learns
    assert not method.gate.w.requires_grad  # frozen again after train_mode
    # the sparsity term alone pushes every (layer, head)'s keep rate toward the target
    method.gate.zero_grad(set_to_none=True)
    method.sparsity_weight = 1.0
    with method.train_mode(), method.attached(model):
        logits = _forward(model, ids, None, None, method.new_cache(model))
        (logits.sum() * 0 + method.auxiliary_loss()).backward()  # as kvlab.fit.train.distill adds it
        rates = {layer: rate for layer, rate, _ in method._stats}  # per layer: keep rate per kv head
        stats = method._step_stats()
    assert stats["sparsity"] > 0 and 0 < stats["keep_rate"] < 1
    for layer, rate in rates.items():  # the gate reads detached hidden states: each layer's term moves its own gate
        assert (method.gate.b.grad[layer].sign() == (rate - 0.3).sign()).all()


def test_short_training_lowers_the_loss_and_moves_the_keep_rate():
    model = kvlab.tiny_model("llama")
    data = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    method = AttentionGate(0.2, sinks=1, steps=30, lr=0.05, batch_size=4, sparsity_weight=20.0, source=None)
    method.fit(model, data, progress=False)
    h = method.history
    assert len(h) == 30 and {"keep_rate", "sparsity", "total"} <= set(h.columns)
    assert h["total"].iloc[-5:].mean() < h["total"].iloc[:3].mean()
    assert abs(h["keep_rate"].iloc[-5:].mean() - 0.2) < abs(h["keep_rate"].iloc[0] - 0.2)
    assert method.trained_steps == 30 and not method.gate.w.requires_grad


def test_save_load_round_trip_and_shipped_lookup(tmp_path, monkeypatch):
    model = kvlab.tiny_model("gpt2")
    method = AttentionGate(0.4, hidden=8, sinks=2, steps=2, batch_size=2, source=None)
    method.fit(model, torch.randint(3, 97, (2, 12)), progress=False)
    path = method.save(tmp_path / "attention_gate" / "gate.safetensors", model=model)
    loaded = AttentionGate.load(path)
    assert loaded.options() == {**method.options(), "source": str(path), "target": 0.4}
    for name, t in method.gate.tensors().items():
        assert torch.equal(t, loaded.gate.tensors()[name])
    ids = torch.randint(3, 97, (2, 15))
    outs = []
    for m in (method, loaded):
        with torch.no_grad(), m.apply(model) as cache:
            outs.append(_forward(model, ids, None, None, cache))
    assert torch.equal(outs[0], outs[1])
    assert loaded.trained_steps == 2
    monkeypatch.setattr(artefacts, "shipped_dir", lambda: tmp_path)
    same = AttentionGate(0.4, hidden=8, sinks=2, steps=2, batch_size=2)  # same fit options, target = budget
    assert same.prepare(model, None).gate is not None
    assert same.provenance["loaded_from"] == str(path)
    assert AttentionGate(0.3, hidden=8, sinks=2, steps=2, batch_size=2)._source_path(model) is None  # other target
    assert AttentionGate(0.3, hidden=8, sinks=2, steps=2, batch_size=2, target=0.4)._source_path(model) == path
    with pytest.raises(ValueError, match="the gate is for"):
        AttentionGate.load(path).new_cache(kvlab.tiny_model("llama"))


def test_an_artefact_given_by_path_brings_its_fit_options(tmp_path):
    model = kvlab.tiny_model("gpt2")
    method = AttentionGate(0.4, hidden=8, local=3, steps=1, batch_size=2, source=None)
    method.fit(model, torch.randint(3, 97, (2, 12)), progress=False)
    path = method.save(tmp_path / "gate.safetensors", model=model)
    by_path = AttentionGate(0.4, source=str(path)).prepare(model, None)  # defaults: hidden=0, local=16
    assert (by_path.local, by_path.hidden) == (3, 8)
    with pytest.raises(ValueError, match=r"fitted with local=3 \(asked: 5\)"):
        AttentionGate(0.4, local=5, source=str(path)).prepare(model, None)
    assert AttentionGate.load(path, local=5).local == 5  # overriding on purpose


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("options,match", [
    (dict(budget=0.0), r"budget must be in \(0, 1\]"),
    (dict(budget=1.5), r"budget must be in \(0, 1\]"),
    (dict(selection="random"), "selection must be one of topk, threshold"),
    (dict(sinks=-1), "sinks must be an int >= 0"),
    (dict(local=0), "local must be an int >= 1"),
    (dict(local=2.5), "local takes an integer, got 2.5"),
    (dict(hidden=-3), "hidden must be an int >= 0"),
    (dict(target=0.0), r"target must be in \(0, 1\]"),
    (dict(sparsity_weight=-1.0), "sparsity_weight must be a number >= 0"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(lr=0.0), "lr must be a number > 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        AttentionGate(**options)


def test_misuse_fails_loudly():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(RuntimeError, match="has no gate yet"):
        AttentionGate(0.5).new_cache(model)
    method = _gate(model)
    cache = method.new_cache(model)
    with pytest.raises(RuntimeError, match="no hidden states reached the gate"), torch.no_grad(), kvlab.attach(model):
        _forward(model, ids, None, None, cache)
    with pytest.raises(ValueError, match="gate layers"):
        method.compress(kvlab.methods.Full().new_cache(model))
    with pytest.raises(ValueError, match="rows of data|only 1 rows"):
        AttentionGate(0.5, batch_size=2).fit(model, ids, progress=False)
    assert not any(m._forward_pre_hooks for m in attention_modules(model).values())  # hooks removed on exit
