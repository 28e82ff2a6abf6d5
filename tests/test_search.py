"""Per-(layer, head, K/V) rank search: greedy allocation on measured loss, ragged ranks, artefacts that carry it."""

import dataclasses

import pytest
import torch

import kvlab
from kvlab.fit import search
from kvlab.methods import artefacts, get
from kvlab.fit.search import Sensitivity, allocate, measure_sensitivity


def _synthetic(layers=3, heads=2, dim=16):
    grid = torch.tensor([2, 4, 6, 8, 12])
    # loss falls with rank; values cost 10x keys, layer 0 costs 100x the others
    base = (1.0 - grid.float() / dim).pow(2)  # (G,)
    scale = torch.ones(layers, heads, 1)
    scale[0] *= 100
    return Sensitivity(grid, scale * base, 10 * scale * base, dim)


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.5, 0.61, 0.9, 1.0])
def test_allocate_meets_the_budget_on_the_grid(budget):
    sens = _synthetic()
    keys, values = allocate(sens, budget)
    allowed = set(sens.grid.tolist()) | {16}
    assert set(keys.flatten().tolist()) | set(values.flatten().tolist()) <= allowed
    mean = torch.cat([keys, values]).float().mean().item()
    assert budget * 16 - 4 <= mean <= budget * 16 + 1e-9  # at most one grid step (4 features of one unit) below


def test_allocate_spends_features_where_loss_is_measured():
    keys, values = allocate(_synthetic(), 0.5)
    assert values.float().mean() > keys.float().mean()  # values measured 10x more sensitive
    assert keys[0].float().mean() > keys[1:].float().mean()  # layer 0 measured 100x more sensitive
    lower_k, lower_v = allocate(_synthetic(), 0.3)
    assert (lower_k <= keys).all() and (lower_v <= values).all()  # greedy: a smaller budget only removes


def test_allocate_errors():
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        allocate(_synthetic(), 0.0)
    with pytest.raises(ValueError, match="below the smallest searched rank"):
        allocate(_synthetic(), 0.05)


def test_sensitivity_round_trips_through_tensors():
    sens = _synthetic()
    sens.tokens = 64
    again = Sensitivity.from_tensors(sens.tensors())
    assert torch.equal(again.grid, sens.grid) and torch.equal(again.keys, sens.keys) and again.tokens == 64
    frame = sens.to_frame()
    assert len(frame) == 2 * 3 * 2 * 5 and set(frame["part"]) == {"K", "V"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measured_sensitivity_and_searched_cache(arch):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    pca = get("pca", 0.5, sinks=1, source=None, allocation="searched").fit(model, ids)
    with pytest.raises(RuntimeError, match="needs a rank sensitivity table"):
        pca.ranks(spec)
    pca.search(model, data=ids[:2], progress=False)
    sens = pca.sensitivity
    assert sens.keys.shape == (spec.n_layers, spec.n_kv_heads, len(sens.grid)) and sens.tokens == 48
    assert (sens.keys >= -1e-6).all() and (sens.values >= -1e-6).all()  # a KL
    assert sens.keys[..., 0].sum() > sens.keys[..., -1].sum()  # dropping more features costs more
    keys, values = pca.ranks(spec)
    assert torch.cat([keys, values]).float().mean() <= 0.5 * spec.head_dim
    with pca.apply(model) as cache:
        model(ids, past_key_values=cache)
    report = cache.kv_bytes("fp32")
    assert abs(report.measured - report.theoretical) <= 0.02 * report.theoretical
    kept = report.table.groupby("part")["dims_kept"].apply(list)
    assert sorted(kept["K"]) == sorted(keys.flatten().tolist())  # ragged: each head its own rank, no padding


def test_sensitivity_errors():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 16))
    with pytest.raises(RuntimeError, match="has no bases yet"):
        measure_sensitivity(model, get("pca", 0.5, source=None), ids)
    pca = get("pca", 0.5, sinks=0, source=None).fit(model, ids)
    with pytest.raises(ValueError, match="grid ranks must lie in 1..15"):
        measure_sensitivity(model, pca, ids, grid=[0, 4])


def test_artefacts_are_found_only_for_their_model_and_options(tmp_path, monkeypatch):
    model, other = kvlab.tiny_model("llama"), kvlab.tiny_model("llama", seed=1)
    ids = torch.randint(3, 97, (2, 16))
    pca = get("pca", 0.5, sinks=1, source=None).fit(model, ids)
    pca.search(model, data=ids[:1], progress=False)
    monkeypatch.setattr(artefacts, "shipped_dir", lambda: tmp_path)
    path = pca.save(tmp_path / "pca" / "tiny.safetensors", model=model)
    keys = type(pca).FIT_OPTIONS
    assert artefacts.find_shipped("pca", model, pca.options(), keys) == path
    assert artefacts.find_shipped("pca", other, pca.options(), keys) is None  # other weights
    assert artefacts.find_shipped("pca", model, {**pca.options(), "sinks": 4}, keys) is None  # other options

    shipped = get("pca", 0.25, sinks=1, allocation="searched").prepare(model, tokenizer=None)
    assert torch.equal(shipped.key_bases, pca.key_bases) and shipped.sensitivity is not None
    assert shipped.provenance["loaded_from"] == str(path)
    loaded = type(pca).load(path)
    assert loaded.sinks == 1 and torch.equal(loaded.value_bases, pca.value_bases)
    with pytest.raises(ValueError, match="holds bases of shape"):
        get("pca", 0.5, sinks=1, source=str(path)).prepare(kvlab.tiny_model("gpt2"), tokenizer=None)
    with pytest.raises(ValueError, match="holds an artefact of method 'pca', not 'matryoshka'"):
        kvlab.methods.MatryoshkaKV.load(path)


def test_matryoshka_artefact_keeps_training_and_search(tmp_path):
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (4, 16))
    mat = get("matryoshka", 0.5, sinks=1, source=None, steps=2, allocation="searched")
    mat.fit(model, ids, progress=False)
    assert mat.sensitivity is None  # training makes a sensitivity of the old bases stale
    mat.search(model, data=ids[:1], progress=False)
    path = mat.save(tmp_path / "m.safetensors", model=model)
    again = kvlab.methods.MatryoshkaKV.load(path)
    assert again.trained_steps == 2 and torch.equal(again.sensitivity.values, mat.sensitivity.values)
    half = again.with_budget(0.25)
    assert torch.equal(torch.stack(half.ranks(kvlab.ModelSpec.from_model(model))),
                       torch.stack(allocate(mat.sensitivity, 0.25)))
    assert dataclasses.replace(again, budget=0.75).sensitivity is again.sensitivity


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pca", "matryoshka"])
def test_shipped_artefacts_serve_smollm2(smollm2, name):
    model, tok = smollm2
    method = get(name, 0.5, allocation="searched").prepare(model, tok)
    assert method.provenance["loaded_from"].endswith(f"data/{name}/smollm2.safetensors")  # no fitting at run time
    spec = kvlab.ModelSpec.from_model(model)
    keys, values = method.ranks(spec)
    assert keys.unique().numel() > 2 and values.unique().numel() > 2  # ragged: ranks differ across heads
    assert torch.cat([keys, values]).float().mean() <= 0.5 * spec.head_dim
    ids = kvlab.data.text_chunks("wiki", tok, chunk_len=256, n_chunks=1, split="eval")
    with torch.no_grad(), method.apply(model) as cache:
        model(ids, past_key_values=cache)
    report = cache.kv_bytes("fp32")
    assert abs(report.measured - report.theoretical) <= 0.02 * report.theoretical
    assert 0.5 <= report.budget <= 0.52  # ranks at half the features + 4 full-rank sink tokens of 256
