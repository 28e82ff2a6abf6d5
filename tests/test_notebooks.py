"""Every notebook runs in QUICK mode and writes the numbers its report shows; the checks below pin them."""

import json
from pathlib import Path

import pytest

from kvlab.report import discover_notebooks, run_notebook

NOTEBOOKS = discover_notebooks(Path(__file__).parent.parent / "notebooks")


def check_00_tour(results: dict) -> None:
    assert results["quick"] is True
    assert results["full_vs_none_max_logit_diff"] < 1e-4
    assert results["full_vs_none_same_generation"] is True
    assert results["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * 4
    for task in ("piqa", "winogrande"):
        assert results["tasks"][task]["n"] == 20 and 0.0 <= results["tasks"][task]["acc"] <= 1.0
    assert 1.0 < results["ppl"]["wiki"]["ppl"] < 100.0


def check_01_kv_spectra(results: dict) -> None:
    parts = ("keys", "keys_pre", "values")
    assert results["quick"] is True and results["n_tokens"] == 4 * 256
    for p in parts:
        assert 1 <= results[f"rank90_{p}"] <= 64 and 1 <= results[f"eff_rank_{p}"] <= 64
        assert 1 <= results["rank50"][p] <= results[f"rank90_{p}"] <= results["rank99"][p] <= 64
        low, high = results["rank90_range"][p]
        assert 1 <= low <= high <= 64
    # measured on SmolLM2 (quick and full): keys need far fewer dims than values, RoPE raises the keys' rank,
    # and centring raises it too (keys carry a large mean direction)
    assert results["rank90_keys"] < 0.75 * results["rank90_values"]
    assert results["frac_heads_keys_below_values"] > 0.8
    assert results["rank90_keys_pre"] < results["rank90_keys"]
    assert results["rank90_centred"]["keys"] > results["rank90_keys"]
    for variant in results["rank90_weighted"].values():
        assert all(1 <= variant[p] <= 64 for p in parts)
    shares = results["sink_attention_share_by_layer"]
    assert len(shares) == 30 and all(0.0 <= s <= 1.0 for s in shares)
    assert 0 < results["seconds_forward"] <= results["seconds_total"]
    assert results["key_figure"] == "rank_for_90pct_energy.png"


CHECKS = {"00_tour": check_00_tour, "01_kv_spectra": check_01_kv_spectra}


def test_every_notebook_has_checks():
    assert {p.stem for p in NOTEBOOKS} <= set(CHECKS), "add a check of its results for every new notebook"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_quick(path, tmp_path):
    run = run_notebook(path, quick=True, out_dir=tmp_path)
    assert run.ok, f"{path.name} failed:\n{run.error}\n{run.traceback or ''}"
    assert run.html.exists() and run.results is not None
    CHECKS[path.stem](json.loads(run.results.read_text()))
    assert any((tmp_path / "figures" / path.stem).glob("*.png"))
