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


def check_02_pca_vs_trained(results: dict) -> None:
    variants = ("PCA", "PCA + sinks", "PCA + sinks + attention weighting", "PCA searched", "MatryoshkaKV",
                "MatryoshkaKV searched")
    assert results["quick"] is True and results["budgets"] == [0.75, 0.5]
    assert 1.0 < results["full_ppl"] < 100.0
    ratios = results["ppl_ratio"]
    assert set(ratios) == set(variants)
    for variant in variants:
        assert set(ratios[variant]) == {"0.75", "0.5"}
        # compression never beats the full cache, and costs more at the smaller budget
        assert 0.99 <= ratios[variant]["0.75"] <= ratios[variant]["0.5"] < 50.0
    # measured on SmolLM2 (quick): full-rank sinks and attention weighting beat plain PCA at 50 %, and the
    # searched allocation beats uniform ranks for both PCA and MatryoshkaKV
    assert ratios["PCA + sinks"]["0.5"] < ratios["PCA"]["0.5"]
    assert ratios["PCA + sinks + attention weighting"]["0.5"] < ratios["PCA"]["0.5"]
    assert ratios["PCA searched"]["0.5"] < ratios["PCA + sinks + attention weighting"]["0.5"]
    assert ratios["MatryoshkaKV searched"]["0.5"] < ratios["MatryoshkaKV"]["0.5"]
    # bytes: measured == theoretical, within 2 % of nominal (sink copies included, ragged searched ranks too)
    for variant in variants:
        measured = results["measured_budget_at_50"][variant]
        assert abs(measured - 0.5) <= 0.02
        assert measured == pytest.approx(results["theoretical_budget_at_50"][variant], abs=1e-3)
    assert results["measured_budget_at_50"]["PCA"] == pytest.approx(0.5, abs=1e-4)  # no sinks: exactly half
    for ranks in results["searched_mean_ranks_at_50"].values():
        assert 1 <= ranks["keys"] <= 64 and 1 <= ranks["values"] <= 64
        assert 31.0 <= (ranks["keys"] + ranks["values"]) / 2 <= 32.0 + 1e-9
    errors = results["key_error_at_50"]
    for variant, e in errors.items():
        assert all(0.0 <= e[k] <= 1.5 for k in ("mean", "attention_weighted", "position0", "rest"))
    # plain PCA reconstructs the most-attended token (position 0) worst; the sinks variants store it exactly
    assert errors["PCA"]["position0"] > errors["PCA"]["rest"]
    assert errors["PCA"]["attention_weighted"] > errors["PCA"]["mean"]
    assert errors["PCA + sinks"]["position0"] == 0.0 == errors["PCA + sinks + attention weighting"]["position0"]
    assert (errors["PCA + sinks + attention weighting"]["attention_weighted"]
            < errors["PCA + sinks"]["attention_weighted"] < errors["PCA"]["attention_weighted"])
    assert 0.0 < results["attention_share_position0"] < 1.0
    schedules = results["schedule_ppl_ratio"]
    assert set(schedules) == {"untrained (PCA start)", "matryoshka", "starbucks"}
    assert schedules["untrained (PCA start)"] == ratios["PCA + sinks + attention weighting"]
    for curve in schedules.values():
        assert set(curve) == {"0.75", "0.5"} and all(r >= 0.99 for r in curve.values())
    assert results["schedule_steps"] == 2 and all(s > 0 for s in results["schedule_seconds"].values())
    shipped = results["shipped_matryoshka"]
    assert shipped["trained steps"] > 0 and shipped["trained tokens"] > 0
    assert shipped["started from the shipped PCA bases"] is True
    # measured by kvlab fit: training halves the perplexity at 25 % (98 vs 224); at 50 % both are ~21
    assert shipped["record_wiki_ppl"]["uniform@0.25"] < 0.6 * shipped["pca_record_wiki_ppl"]["uniform@0.25"]
    for part in ("keys", "values"):
        energy = results["energy_at_half_rank"][part]
        optimum = energy["eigenvectors of M (eval optimum)"]
        assert 0.0 < energy["MatryoshkaKV (trained)"] <= optimum + 1e-6 <= 1.0 + 1e-6
        assert 0.0 < energy["PCA start"] <= optimum + 1e-6
    assert results["energy_at_half_rank"]["keys"]["PCA start"] > results["energy_at_half_rank"]["values"]["PCA start"]
    assert results["key_figure"] == "ppl_vs_budget.png"


CHECKS = {"00_tour": check_00_tour, "01_kv_spectra": check_01_kv_spectra, "02_pca_vs_trained": check_02_pca_vs_trained}


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
