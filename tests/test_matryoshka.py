"""MatryoshkaKV and the shared distillation loop (kvlab.fit.train) on tiny random models: orthogonality, training,
exactness at full rank, truncation, persistence, schedules, frozen model, errors."""

import json

import pytest
import torch

import kvlab
from kvlab.fit import train
from kvlab.methods import MatryoshkaKV
from kvlab.methods.matryoshka import OrthogonalBases, cayley


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


def _ids(n=4, length=24, seed=0, vocab=97):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, method, ids):
    with torch.no_grad(), method.apply(model) as cache:
        return model(ids, past_key_values=cache, use_cache=True).logits


def _fit(model, steps=10, **kw):
    opts = dict(budget=0.5, sinks=1)
    opts.update({k: kw.pop(k) for k in list(kw) if k in ("budget", "sinks", "schedule", "train_ranks")})
    kw.setdefault("lr", 2e-2)
    return MatryoshkaKV(**opts).fit(model, _ids(), steps=steps, progress=False, **kw)


def _orthogonality_error(bases):
    eye = torch.eye(bases.shape[-1])
    return (bases.transpose(-1, -2) @ bases - eye).abs().max().item()


def test_cayley_is_orthogonal_and_identity_at_zero():
    a = torch.randn(3, 2, 7, 7)
    q = cayley(a)
    assert _orthogonality_error(q) < 1e-5
    torch.testing.assert_close(cayley(torch.zeros(5, 5)), torch.eye(5))
    init = torch.linalg.qr(torch.randn(2, 1, 6, 6))[0]
    init[0, 0, :, 0] *= -1  # det -1 is fine: training starts exactly at the given basis
    keys, values = OrthogonalBases(init, init)()
    torch.testing.assert_close(keys, init)


def test_bases_stay_orthogonal_after_training_and_move():
    model = kvlab.tiny_model("llama")
    press = _fit(model, steps=8, lr=0.1)
    for bases, init in ((press.key_bases, press.init_key_bases), (press.value_bases, press.init_value_bases)):
        assert _orthogonality_error(bases) < 1e-5
        assert (bases - init).abs().max() > 1e-2  # it trained
    assert not press.key_bases.requires_grad


def test_gradients_reach_every_layer_and_head():
    model = kvlab.tiny_model("llama")
    press = _fit(model, steps=1, sinks=0)
    module = press.trainable()
    for grad in (module.key_skew.grad, module.value_skew.grad):
        assert grad is not None and bool((grad.abs().sum((-1, -2)) > 0).all())


def test_loss_decreases_on_a_fixed_batch():
    model = kvlab.tiny_model("llama")
    batch = _ids(n=2, length=32, seed=1)
    press = MatryoshkaKV(budget=0.25, sinks=1).fit(model, batch, steps=12, lr=2e-2, batch_size=2,
                                                   schedule="fixed", progress=False, eval_data=batch)
    loss = press.history["loss"]
    assert loss.iloc[-1] < loss.iloc[0]
    assert press.metrics["eval_after"]["loss"] < press.metrics["eval_before"]["loss"]
    assert {"step", "loss", "kl", "ce", "tokens", "seconds", "step_seconds"} <= set(press.history.columns)
    assert press.history["tokens"].iloc[-1] == 12 * 2 * 32 == press.trained_tokens
    assert press.history["seconds"].is_monotonic_increasing


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_full_rank_equals_full_even_after_training(arch):
    model = kvlab.tiny_model(arch)
    press = _fit(model, steps=3, budget=1.0, sinks=0, lr=0.1)
    assert (press.key_bases - press.init_key_bases).abs().max() > 1e-3
    ids = _ids(n=2, length=20, seed=2)
    full = _logits(model, kvlab.methods.get("full"), ids)
    torch.testing.assert_close(_logits(model, press, ids), full, atol=1e-5, rtol=0)


def test_one_trained_matrix_serves_several_budgets():
    model = kvlab.tiny_model("llama")
    batch = _ids(n=2, length=32, seed=3)
    press = MatryoshkaKV(budget=0.5, sinks=1).fit(model, batch, steps=25, lr=2e-2, batch_size=2,
                                                  schedule="matryoshka", progress=False)
    pca = MatryoshkaKV(budget=0.5, sinks=1, key_bases=press.init_key_bases, value_bases=press.init_value_bases)
    spec = kvlab.ModelSpec.from_model(model)
    for budget in (0.25, 0.5, 0.75):
        trained = press.with_budget(budget)
        rank = round(budget * spec.head_dim)
        cache = trained.new_cache(model)
        layer = cache.layers[1]
        assert torch.equal(layer.key_bases[0], press.key_bases[1, 0, :, :rank])  # a prefix of the one matrix
        assert layer.value_bases[1].shape == (spec.head_dim, rank)
        after = train.evaluate_loss(model, trained, batch)["loss"]
        before = train.evaluate_loss(model, pca.with_budget(budget), batch)["loss"]
        assert after < before, (budget, before, after)


def test_save_load_round_trip_identical_logits(tmp_path):
    model = kvlab.tiny_model("llama")
    press = _fit(model, steps=3, seed=5)
    path = press.save(tmp_path / "run" / "mkv.safetensors", metrics={"note": "tiny"})
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["method"] == "matryoshka" and record["trained_steps"] == 3
    assert record["trained_tokens"] == 3 * 2 * 24 and record["options"]["seed"] == 5
    assert {"git_commit", "command", "versions", "train_seconds", "metrics", "provenance"} <= set(record)
    assert record["metrics"]["note"] == "tiny" and len(record["provenance"]["runs"][0]["history"]) == 3
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"key_bases", "value_bases", "init_key_bases", "init_value_bases"}
    loaded = MatryoshkaKV.load(path)
    assert (loaded.budget, loaded.sinks, loaded.schedule, loaded.trained_steps) == (0.5, 1, "matryoshka", 3)
    ids = _ids(n=2, length=16, seed=7)
    assert torch.equal(_logits(model, loaded, ids), _logits(model, press, ids))
    # training continues from the loaded bases
    loaded.fit(model, _ids(), steps=1, progress=False)
    assert loaded.trained_steps == 4


def test_starbucks_sums_over_its_ranks_and_matryoshka_samples_per_head():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    star = _fit(model, steps=2, schedule="starbucks", train_ranks=[2, 4, 8])
    assert set(star.history["entries"]) == {3}
    parts = star.history[["loss[r=2]", "loss[r=4]", "loss[r=8]"]].sum(axis=1)
    torch.testing.assert_close(torch.tensor(parts.values), torch.tensor(star.history["loss"].values))
    assert MatryoshkaKV(schedule="starbucks").rank_set(64) == [16, 32, 48]

    mat = _fit(model, steps=2, schedule="matryoshka", train_ranks=[0.25, 0.5, 1.0])
    assert mat.rank_set(spec.head_dim) == [4, 8, 16] and MatryoshkaKV().rank_set(64) == list(range(8, 65, 8))
    seen = set()
    with mat.train_mode():
        for step in range(4):
            (label, make), = mat.training_caches(model, step, torch.Generator().manual_seed(step))
            cache = make()
            for layer in cache.layers:
                seen |= {b.shape[1] for b in layer.key_bases + layer.value_bases}
            assert cache.layers[0].key_bases[0].requires_grad  # live bases while training
    assert seen == {4, 8, 16}
    assert not mat.new_cache(model).layers[0].key_bases[0].requires_grad  # frozen again after training


def test_training_never_changes_the_model():
    model = kvlab.tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    _fit(model, steps=3, lr=0.1, schedule="starbucks")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_deterministic_for_a_seed():
    model = kvlab.tiny_model("llama")
    a, b = _fit(model, steps=4, seed=3), _fit(model, steps=4, seed=3)
    assert a.history["loss"].tolist() == b.history["loss"].tolist()
    assert torch.equal(a.key_bases, b.key_bases)
    c = _fit(model, steps=4, seed=4)
    assert not torch.equal(a.key_bases, c.key_bases)


def test_registry_and_bad_options(tmp_path):
    model = kvlab.tiny_model("llama")
    press = kvlab.methods.get("matryoshka", 0.5, schedule="starbucks", steps=0, sinks=0)
    assert isinstance(press, MatryoshkaKV) and press.schedule == "starbucks"
    with pytest.raises(ValueError, match="unknown schedule 'nested'; allowed: matryoshka, starbucks, fixed"):
        kvlab.methods.get("matryoshka", 0.5, schedule="nested")
    with pytest.raises(ValueError, match="unknown option"):
        kvlab.methods.get("matryoshka", 0.5, rank=3)
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        MatryoshkaKV(steps=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        MatryoshkaKV(lr=0)
    with pytest.raises(ValueError, match="train_ranks must be"):
        MatryoshkaKV(train_ranks=[])
    with pytest.raises(RuntimeError, match="no bases yet"):
        MatryoshkaKV().trainable()
    with pytest.raises(RuntimeError, match="nothing to save"):
        MatryoshkaKV().save(tmp_path / "x.safetensors")
    fresh = MatryoshkaKV()
    with pytest.raises(ValueError, match=r"train_ranks must be ints in 1\.\.16"):
        fresh.fit(model, _ids(), ranks=[4, 40], progress=False)
    assert fresh.train_ranks is None and not fresh.fitted  # nothing changed by a rejected fit
    with pytest.raises(ValueError, match="batch_size=8 but train_data has only 4 rows"):
        fresh.fit(model, _ids(), batch_size=8, progress=False)
    with pytest.raises(ValueError, match="LongTensor of token ids"):
        fresh.fit(model, _ids().float(), progress=False)
    with pytest.raises(FileNotFoundError):
        MatryoshkaKV.load(tmp_path / "missing.safetensors")
    trained = _fit(model, steps=0)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        trained.save(tmp_path / "mkv.pt")
    with pytest.raises(ValueError, match="bases are"):
        trained.new_cache(kvlab.tiny_model("gemma3"))
    with pytest.raises(TypeError, match="nothing to train"):
        train.distill(model, kvlab.methods.get("full"), _ids(), steps=1, progress=False)
    with pytest.raises(ValueError, match="kl_weight and ce_weight"):
        train.distill(model, trained, _ids(), steps=1, kl_weight=0, ce_weight=0, progress=False)


def test_steps_zero_is_pca():
    model = kvlab.tiny_model("llama")
    ids = _ids()
    press = MatryoshkaKV(budget=0.5, sinks=1).fit(model, ids, steps=0, progress=False)
    pca = kvlab.methods.get("pca", 0.5, sinks=1).fit(model, ids)
    torch.testing.assert_close(press.key_bases, pca.key_bases)
    x = _ids(n=2, length=12, seed=9)
    torch.testing.assert_close(_logits(model, press, x), _logits(model, pca, x))
