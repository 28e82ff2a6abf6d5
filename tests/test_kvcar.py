"""KV-CAR autoencoders on tiny random models (llama: GQA + RoPE, gpt2: MHA, gemma3: MQA + sliding window): the
budget rule and real bytes, exactness at budget 1 and at d = D, both training stages, layer selection,
persistence, generate with padding, errors."""

import json
import math

import pytest
import torch

import kvlab
from kvlab.fit import train
from kvlab.cache import FullLayer, KVLabCache
from kvlab.methods.kvcar import KVCAR, AutoencodedLayer, Autoencoders
from conftest import left_padded_batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


def _ids(n=4, length=24, seed=0, vocab=97):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, method, ids, mask=None, pos=None):
    with torch.no_grad(), method.apply(model) as cache:
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


def _fit(model, ids=None, **options):
    fit = {k: options.pop(k) for k in ("eval_data", "train_data") if k in options}
    options.setdefault("sinks", 0)
    options.setdefault("steps", 0)
    options.setdefault("recon_steps", 50)
    return KVCAR(**options).fit(model, _ids() if ids is None else ids, progress=False, **fit)


class _DecodedFull(FullLayer):
    """Independent reference: a full cache fed dec(enc(k)) and dec(enc(v))."""

    def __init__(self, layer_idx, ae):
        super().__init__(layer_idx)
        self.ae = ae

    def _store(self, k, v):
        gk, gv = self.ae.group(self.layer_idx, 0), self.ae.group(self.layer_idx, 1)
        return super()._store(self.ae.decode(self.ae.encode(k, gk), gk), self.ae.decode(self.ae.encode(v, gv), gv))


def _reference_cache(method, spec):
    layers, _ = method.plan(spec)
    ae = method.autoencoders
    return KVLabCache([_DecodedFull(i, ae) if i in layers else FullLayer(i) for i in range(spec.n_layers)])


# ---- budget rule and bytes
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("budget, code_dim, layers, n_expected, d_expected", [
    (0.5, None, None, 2, 4),  # default d = D/4 = 4: ceil(0.5 * 3 / 0.75) = 2 layers
    (0.75, 8, None, 2, 8),  # ceil(0.25 * 3 / 0.5) = 2 layers at half the features
    (0.3, 0.25, None, 3, 4),  # every layer at a quarter: 0.25 <= 0.3
    (0.1, None, None, 3, 1),  # default d = floor(0.1 * 16) = 1
    (0.6, None, [0, 2], 2, 6),  # d = floor(16 (1 - 0.4 * 3 / 2)) = 6
    (1.0, None, [1], 1, 16),  # budget 1 with explicit layers: d = D, nothing saved
])
def test_budget_rule_and_measured_bytes_equal_theoretical(arch, budget, code_dim, layers, n_expected, d_expected):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    assert spec.head_dim == 16 and spec.n_layers == 3
    method = _fit(model, budget=budget, code_dim=code_dim, layers=layers, recon_steps=0)
    chosen, d = method.plan(spec)
    assert (len(chosen), d) == (n_expected, d_expected)
    if layers is not None:
        assert chosen == sorted(layers)
    kept = method.kept_fraction(spec)
    assert kept == pytest.approx(1 - n_expected * (1 - d / 16) / 3) and kept <= budget + 1e-9
    ids = _ids(n=2, length=20, seed=1)
    with torch.no_grad(), method.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
        b = cache.kv_bytes("fp32")
        assert b.measured == b.theoretical  # codes at the cache dtype + full layers, exactly
        assert b.measured / b.full == pytest.approx(kept)
        model(ids[:, :1], past_key_values=cache, use_cache=True)  # a decode step appends codes
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, AutoencodedLayer if i in chosen else FullLayer)
        if i in chosen:
            assert layer.key_codes.shape == layer.value_codes.shape == (2, spec.n_kv_heads, 21, d)
    per_layer = cache.kv_bytes("fp32").by("layer")  # full layers grow with decoding slack (FullLayer.min_grow); codes don't
    assert (per_layer.loc[chosen, "measured"] == per_layer.loc[chosen, "theoretical"]).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bytes_with_sinks_within_two_percent(arch):
    model = kvlab.tiny_model(arch)
    method = _fit(model, budget=0.5, sinks=2, recon_steps=0)
    ids, mask, pos = left_padded_batch(97, [30, 21], seed=4)
    with torch.no_grad(), method.apply(model) as cache:
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    b = cache.kv_bytes("fp32")
    assert abs(b.measured - b.theoretical) <= 0.02 * b.theoretical
    layer = next(l for l in cache.layers if isinstance(l, AutoencodedLayer))
    if arch == "llama":  # explicit positions: row 1 is left-padded by 9, padding is never a sink
        assert layer.sink_slots.tolist() == [[0, 1], [9, 10]]
    codes = 2 * 30 * 4 * 2  # batch x tokens x code dim x (K, V) per head
    sinks = 2 * 2 * 16 * 2  # 2 rows x 2 sinks x D x (K, V) per head
    assert b.by("layer").loc[layer.layer_idx, "theoretical"] == (codes + sinks) * 4 * layer.n_heads


def test_budget_and_option_errors_say_what_is_allowed(tmp_path):
    model = kvlab.tiny_model("llama")  # 3 layers, head_dim 16
    spec = kvlab.ModelSpec.from_model(model)
    for budget in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
            KVCAR(budget=budget)
    with pytest.raises(ValueError, match=r"budget 0.2 cannot be met with code_dim 4 of 16.*allowed budgets: "
                                         r"\[0.2500, 1\]"):
        KVCAR(budget=0.2, code_dim=4).plan(spec)
    with pytest.raises(ValueError, match=r"budget 0.5 cannot be met by compressing only layers \[1\].*allowed "
                                         r"budgets: \[0.6875, 1\]"):
        KVCAR(budget=0.5, layers=[1]).plan(spec)
    KVCAR(budget=0.6875, layers=[1], sinks=0).fit(model, _ids(), steps=0, progress=False)  # the lowest: d = 1
    with pytest.raises(ValueError, match=r"code_dim must be in 1\.\.15"):
        KVCAR(budget=0.5, code_dim=16).plan(spec)
    with pytest.raises(ValueError, match=r"layers \[3\] out of range.*allowed 0\.\.2"):
        KVCAR(budget=0.5, layers=[0, 3]).plan(spec)
    with pytest.raises(ValueError, match="give code_dim or layers, not both"):
        KVCAR(code_dim=4, layers=[0])
    for layers in ([], [1, 1], [-1], ["0"]):
        with pytest.raises(ValueError, match="layers must be None or a non-empty list of distinct layer indices"):
            KVCAR(layers=layers)
    for code_dim in (0, 1.0, 1.5, -0.5, True):
        with pytest.raises(ValueError, match="code_dim (must be None, an int >= 1|takes an integer or a number or null)"):
            KVCAR(code_dim=code_dim)
    with pytest.raises(ValueError, match="unknown arch 'conv'; allowed: linear, mlp"):
        KVCAR(arch="conv")
    with pytest.raises(ValueError, match="unknown init 'zeros'; allowed: None, pca, random"):
        KVCAR(init="zeros")
    with pytest.raises(ValueError, match="init='pca' needs arch='linear'"):
        KVCAR(arch="mlp", init="pca")
    with pytest.raises(ValueError, match="unknown selection 'random'; allowed: kl, mse"):
        KVCAR(selection="random")
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        KVCAR(steps=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        KVCAR(lr=0)
    with pytest.raises(ValueError, match="sinks must be a non-negative int"):
        KVCAR(sinks=-1)
    with pytest.raises(RuntimeError, match="needs measured layer costs"):
        KVCAR(budget=0.5).new_cache(model)
    with pytest.raises(RuntimeError, match="no autoencoders yet"):
        KVCAR(budget=0.5, layers=[0, 1, 2]).new_cache(model)
    with pytest.raises(RuntimeError, match="nothing to save"):
        KVCAR().save(tmp_path / "x.safetensors")
    fresh = KVCAR(budget=0.5)
    with pytest.raises(ValueError, match="batch_size=8 but train_data has only 4 rows"):
        fresh.fit(model, _ids(), steps=2, batch_size=8, progress=False)
    assert fresh.steps == 50 and fresh.batch_size == 2 and not fresh.fitted  # a rejected fit changes nothing
    with pytest.raises(ValueError, match="LongTensor of token ids"):
        fresh.fit(model, _ids().float(), progress=False)
    fitted = _fit(model, budget=0.5, layers=[0, 1])
    with pytest.raises(ValueError, match=r"the autoencoders are for head_dim 16, code_dim 4, layers \[0, 1\]; budget "
                                         r"0.6666666667 on this model needs head_dim 16, code_dim 8, layers \[0, 1\]"):
        fitted.with_budget(0.6666666667).new_cache(model)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        fitted.save(tmp_path / "kvcar.pt")
    with pytest.raises(FileNotFoundError):
        KVCAR.load(tmp_path / "missing.safetensors")


def dataclass_replace(method, **changes):
    import dataclasses

    return dataclasses.replace(method, **changes)


# ---- exactness
def test_budget_one_is_the_full_cache_exactly(tiny):
    method = KVCAR(budget=1.0)
    assert method.prepare(tiny, tokenizer=None) is method and not method.fitted  # nothing to fit
    assert method.fit(tiny, _ids(), progress=False) is method and not method.fitted
    ids, mask, pos = left_padded_batch(97, [13, 7], seed=2)
    ours = _logits(tiny, method, ids, mask, pos)
    assert torch.equal(ours, _logits(tiny, kvlab.methods.get("full"), ids, mask, pos))
    plain = tiny(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(ours[mask.bool()], plain[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_linear_autoencoder_with_d_equal_D_reproduces_full_logits(arch):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    every = list(range(spec.n_layers))
    ids, mask, pos = left_padded_batch(97, [16, 11], seed=3)
    full = _logits(model, kvlab.methods.get("full"), ids, mask, pos)[mask.bool()]
    pca = _fit(model, budget=1.0, layers=every)  # d = D, PCA start: exact up to float error
    assert pca.plan(spec) == (every, spec.head_dim)
    assert max(max(e) for e in pca.metrics["recon"]["after"]) < 1e-10
    torch.testing.assert_close(_logits(model, pca, ids, mask, pos)[mask.bool()], full, atol=1e-4, rtol=0)
    # a randomly initialised linear autoencoder learns the identity by reconstruction training
    calib = _ids(n=8, length=32)  # gemma3 has one kv head of 32 features: enough vectors to pin the identity down
    trained = _fit(model, calib, budget=1.0, layers=every, init="random", recon_steps=400, recon_lr=3e-2)
    assert max(max(e) for e in trained.metrics["recon"]["after"]) < 1e-3
    torch.testing.assert_close(_logits(model, trained, ids, mask, pos)[mask.bool()], full, atol=3e-2, rtol=0)


# ---- training
@pytest.mark.parametrize("arch, init", [("linear", "random"), ("mlp", None)])
def test_reconstruction_training_lowers_mse(arch, init):
    model = kvlab.tiny_model("llama")
    calib, fresh = _ids(n=4, length=32), _ids(n=2, length=32, seed=9)
    untrained = _fit(model, calib, budget=0.5, arch=arch, init=init, recon_steps=0, hidden=24)
    trained = _fit(model, calib, budget=0.5, arch=arch, init=init, recon_steps=150, recon_lr=1e-2, hidden=24)
    recon = trained.metrics["recon"]
    assert recon["layers"] == [0, 1, 2] and torch.tensor(recon["before"]).shape == (3, 2)
    assert (torch.tensor(recon["after"]) < torch.tensor(recon["before"])).all()
    before, after = untrained.reconstruction_error(model, fresh), trained.reconstruction_error(model, fresh)
    assert after.shape == (3, 2) and (after < 0.7 * before).all(), (before, after)
    assert trained.provenance["recon"]["steps"] == 150 and trained.provenance["recon"]["init"] == "random"
    if arch == "mlp":
        assert trained.autoencoders.enc1_w.shape == (6, 16, 24)  # (layers x K/V, D, hidden)
    pca = _fit(model, calib, budget=0.5)  # linear, PCA start: the optimum of this loss, no steps needed
    assert pca.provenance["recon"]["steps"] == 0
    if arch == "linear":  # no linear autoencoder beats it on the data it was fitted to (an MLP may)
        assert (pca.reconstruction_error(model, calib) <= trained.reconstruction_error(model, calib) + 1e-2).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_distillation_lowers_the_loss_and_leaves_the_model_alone(arch):
    model = kvlab.tiny_model(arch)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _ids(n=2, length=32, seed=1)
    method = _fit(model, batch, budget=0.3, code_dim=2, steps=15, lr=1e-2, batch_size=2, eval_data=batch)
    loss = method.history["loss"]
    assert len(loss) == 15 and loss.iloc[-5:].mean() < loss.iloc[:5].mean()
    assert method.metrics["eval_after"]["loss"] < method.metrics["eval_before"]["loss"]
    assert method.trained_steps == 15 and method.trained_tokens == 15 * 2 * 32
    assert method.provenance["runs"][0]["layers"] == [0, 1, 2] and method.provenance["runs"][0]["code_dim"] == 2
    assert not any(p.requires_grad for p in method.autoencoders.parameters())  # frozen after training
    after_state = model.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert all(p.grad is None for p in model.parameters())
    # only the selected layers' autoencoders learn in stage 2
    partial = _fit(model, batch, budget=0.75, code_dim=8, steps=0)
    chosen, _ = partial.plan(kvlab.ModelSpec.from_model(model))
    start = partial.autoencoders.enc_w.clone()
    partial.fit(model, batch, steps=3, lr=1e-2, progress=False)
    moved = (partial.autoencoders.enc_w - start).abs().amax((1, 2)).view(-1, 2)  # (layers, K/V)
    assert [l for l in range(3) if moved[l].max() > 0] == chosen


def test_layer_selection_picks_the_cheapest_layers():
    model = kvlab.tiny_model("llama", n_layers=5)
    spec = kvlab.ModelSpec.from_model(model)
    method = _fit(model, budget=0.7, code_dim=8, recon_steps=0)  # n = ceil(0.3 * 5 / 0.5) = 3 of 5 layers
    scores = method.layer_scores
    assert scores.shape == (5,) and (scores > 0).all() and method.provenance["scores"]["selection"] == "kl"
    chosen, d = method.plan(spec)
    assert d == 8 and chosen == sorted(torch.argsort(scores)[:3].tolist())
    frame = method.to_frame(spec)
    assert frame["compressed"].sum() == 3 and frame["score"].tolist() == pytest.approx(scores.tolist())
    assert len(method.with_budget(0.9).plan(spec)[0]) == 1 and len(method.with_budget(0.5).plan(spec)[0]) == 5
    by_mse = _fit(model, budget=0.7, code_dim=8, recon_steps=0, selection="mse")
    errors = torch.tensor(by_mse.metrics["recon"]["after"]).mean(1)
    torch.testing.assert_close(by_mse.layer_scores, errors.float())
    assert by_mse.plan(spec)[0] == sorted(torch.argsort(errors)[:3].tolist())
    measured = _fit(model, budget=0.7, code_dim=8, recon_steps=0, sinks=0)
    one = measured.plan(spec)[0][0]  # check one score against a direct measurement
    cache = KVLabCache([AutoencodedLayer(i, measured.autoencoders) if i == one else FullLayer(i) for i in range(5)])
    ids = _ids()[:2]
    target = train.teacher_logprobs(model, ids)
    with torch.no_grad(), kvlab.attach(model):
        logits = model(ids, past_key_values=cache, use_cache=True).logits
    kl = train.distill_loss(logits, target, ids, 1.0, 0.0)[1]
    assert measured.layer_scores[one].item() == pytest.approx(kl.item(), rel=1e-4)


# ---- persistence
@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    model = kvlab.tiny_model("llama")
    method = _fit(model, budget=0.5, arch=arch, sinks=1, steps=2, lr=1e-2, seed=3)
    path = method.save(tmp_path / "run" / "kvcar.safetensors", model=model, metrics={"note": "tiny"})
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["method"] == "kvcar" and record["trained_steps"] == 2 and record["options"]["arch"] == arch
    assert record["model"] == kvlab.methods.artefacts.model_fingerprint(model)
    assert record["autoencoders"]["layers"] == [0, 1, 2] and record["metrics"]["note"] == "tiny"
    assert {"git_commit", "command", "versions", "train_seconds", "provenance"} <= set(record)
    loaded = KVCAR.load(path)
    assert (loaded.budget, loaded.arch, loaded.sinks, loaded.seed, loaded.trained_steps) == (0.5, arch, 1, 3, 2)
    original, again = method.autoencoders.state_dict(), loaded.autoencoders.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert torch.equal(loaded.layer_scores, method.layer_scores)
    ids, mask, pos = left_padded_batch(97, [12, 9], seed=7)
    assert torch.equal(_logits(model, loaded, ids, mask, pos), _logits(model, method, ids, mask, pos))
    adopted = KVCAR(budget=0.5, arch=arch, sinks=1, source=str(path)).prepare(model, tokenizer=None)
    assert torch.equal(_logits(model, adopted, ids, mask, pos), _logits(model, method, ids, mask, pos))
    loaded.fit(model, _ids(), steps=1, progress=False)  # training continues from the loaded autoencoders
    assert loaded.trained_steps == 3
    with pytest.raises(ValueError, match="holds autoencoders for head_dim 16"):
        KVCAR(budget=0.5, source=str(path)).prepare(kvlab.tiny_model("gemma3"), tokenizer=None)


def test_prepare_fits_on_the_default_corpus(monkeypatch):
    model = kvlab.tiny_model("gpt2")
    calls = []

    def fake_chunks(name, tokenizer, *, chunk_len, n_chunks=None, split="eval", seed=None):
        calls.append((name, chunk_len, n_chunks, split))
        return _ids(n=n_chunks, length=chunk_len, seed=len(calls))

    monkeypatch.setattr(kvlab.data, "text_chunks", fake_chunks)
    method = KVCAR(budget=0.5, calib_chunks=2, chunk_len=24, score_chunks=1, score_chunk_len=16, train_chunks=4,
                   train_chunk_len=16, steps=2, source=None, sinks=0).prepare(model, tokenizer="tok")
    assert [c[3] for c in calls] == ["calib"] * 3 and calls[0] == ("wiki", 24, 2, "calib")
    assert method.fitted and method.trained_steps == 2 and method.provenance["scores"]["data_shape"] == [1, 16]
    assert method.prepare(model, tokenizer="tok") is method and len(calls) == 3  # ready: no second fit


# ---- generate
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_padding_matches_a_decoded_full_cache(arch):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    method = _fit(model, budget=0.5, recon_steps=0)
    ids, mask, pos = left_padded_batch(97, [11, 6], seed=2)
    ours = _logits(model, method, ids, mask, pos)
    with torch.no_grad(), kvlab.attach(model):
        ref = model(ids, attention_mask=mask, position_ids=pos, past_key_values=_reference_cache(method, spec),
                    use_cache=True).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with method.apply(model) as cache:
        out = model.generate(ids, past_key_values=cache, **kwargs)
    with kvlab.attach(model):
        expected = model.generate(ids, past_key_values=_reference_cache(method, spec), **kwargs)
    assert out.shape == (2, ids.shape[1] + 8) and torch.equal(out, expected)
    assert cache.get_seq_length() == ids.shape[1] + 7
    layer = cache.layers[method.plan(spec)[0][0]]
    assert layer.key_codes.shape == (2, spec.n_kv_heads, ids.shape[1] + 7, 4)
    with_sinks = dataclass_replace(method, sinks=2)  # sinks kept uncompressed: runs through generate too
    with with_sinks.apply(model) as cache:
        out = model.generate(ids, past_key_values=cache, **kwargs)
    assert out.shape == (2, ids.shape[1] + 8)


def test_autoencoders_module_shapes_and_round_trip():
    ae = Autoencoders([2, 0], head_dim=8, code_dim=3, arch="mlp", hidden=5)
    assert ae.group(0, 1) == 3 and ae.enc1_w.shape == (4, 8, 5) and ae.dec2_w.shape == (4, 5, 8)
    x = torch.randn(4, 10, 8)
    code = ae.encode(x)
    assert code.shape == (4, 10, 3)
    torch.testing.assert_close(ae.encode(x[3], 3), code[3])  # one group == the batched form
    torch.testing.assert_close(ae.decode(code[1], 1), ae.decode(code)[1])
    again = Autoencoders.from_tensors({k: v.float() for k, v in ae.tensors().items()})
    assert again.layers == [2, 0] and again.hidden == 5 and torch.equal(again.decode(code), ae.decode(code))
    with pytest.raises(ValueError, match="autoencoder tensors are incomplete"):
        Autoencoders.from_tensors({"ae.enc_w": torch.zeros(2, 8, 3)})
    with pytest.raises(ValueError, match=r"code_dim must be in 1\.\.8"):
        Autoencoders([0], head_dim=8, code_dim=9)
    with pytest.raises(ValueError, match="no autoencoder for layer 1"):
        AutoencodedLayer(1, ae)
    assert math.isfinite(float(ae.decode(code).sum()))
