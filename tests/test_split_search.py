"""K/V split search (PCA allocation="split"): held-out KL picks the split, the objective and score are saved."""

import json

import pytest
import torch

import kvlab
from kvlab.fit import search
from kvlab.methods import PCA


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


def _ids(n, length, seed):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def test_split_search_picks_the_lowest_heldout_kl_and_saves_it(tmp_path):
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    pca = PCA(budget=0.5, sinks=1, keys="pre_rope", allocation="split", source=None).fit(model, _ids(4, 24, 0))
    held = _ids(2, 20, 1)
    pca.search_split(model, data=held, progress=False)
    record = pca.provenance["search"]
    assert record["objective"] == search.OBJECTIVE and record["heldout_shape"] == [2, 20]
    rows = record["candidates"]
    assert {(r["key_rank"], r["value_rank"]) for r in rows} >= {(8, 8)}  # the uniform split is a candidate
    assert all(r["key_rank"] + r["value_rank"] == 16 for r in rows)  # every candidate spends the same budget
    best = min(rows, key=lambda r: r["heldout_kl"])
    assert record["heldout_kl"] == best["heldout_kl"] and pca.key_ranks[0][0] == best["key_rank"]
    k, v = pca.ranks(spec)
    assert (k == best["key_rank"]).all() and (v == best["value_rank"]).all()
    assert search.heldout_kl(model, pca, held) == pytest.approx(best["heldout_kl"], rel=1e-5)
    path = pca.save(tmp_path / "split.safetensors", model)
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["provenance"]["search"]["heldout_kl"] == pytest.approx(best["heldout_kl"])
    loaded = PCA.load(path)
    assert torch.equal(loaded.ranks(spec)[0], k) and torch.equal(loaded.ranks(spec)[1], v)


def test_split_needs_its_search():
    model = kvlab.tiny_model("llama")
    pca = PCA(budget=0.5, allocation="split", source=None).fit(model, _ids(4, 24, 0))
    with pytest.raises(RuntimeError, match="allocation='split' needs its K/V split"):
        pca.new_cache(model)
    with pytest.raises(ValueError, match="allocation must be one of 'uniform', 'searched', 'split', got 'best'"):
        PCA(allocation="best")
