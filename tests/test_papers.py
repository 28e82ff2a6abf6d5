"""kvlab.papers: the paper tables are built from the notebooks' results dicts, and only from them.

Small synthetic results with the structure the notebooks write (reports/results/*.json); no model, no kernel.
"""

import copy
import json
import math

import pandas as pd
import pytest

from kvlab import papers


def _by(keys, value):
    return {k: value(k) for k in keys}


@pytest.fixture
def r02():
    budgets = [0.75, 0.5]
    variants = ["PCA", "PCA + sinks", "PCA searched", "MatryoshkaKV", "MatryoshkaKV searched"]
    return {
        "quick": False, "model": "smollm2", "budgets": budgets, "ppl_tokens": 512, "full_ppl": 14.0,
        "ppl_ratio": {v: {f"{b:g}": 1.0 + i + (1 - b) for b in budgets} for i, v in enumerate(variants)},
        "measured_budget_at_50": {v: 0.51 for v in variants},
        "theoretical_budget_at_50": {v: 0.5 for v in variants},
        "schedule_ppl_ratio": {"untrained (PCA start)": {"0.75": 1.3, "0.5": 2.4},
                               "matryoshka": {"0.75": 1.2, "0.5": 2.0}, "starbucks": {"0.75": 1.1, "0.5": 1.7}},
        "schedule_steps": 2,
        "shipped_matryoshka": {"trained steps": 3, "trained tokens": 768},
    }


@pytest.fixture
def r03():
    budgets = [0.75, 0.52]
    methods = ["KV-CAR codes", "reuse", "both"]
    def per(f):
        return {"full": {"1": f("full", 1.0)}, **{m: {f"{b:g}": f(m, b) for b in budgets} for m in methods}}

    return {
        "quick": False, "model": "smollm2", "shape": [30, 3, 64], "budgets": budgets, "kvcar_code_dim": 16,
        "kvcar_from": "shipped artefact", "n_items": {"piqa": 10, "winogrande": 10},
        "ppl_tokens_per_corpus": {"wiki": 256, "c4": 256},
        "full": {"ppl_wiki": 12.0, "ppl_c4": 30.0, "acc_piqa": 0.6, "acc_winogrande": 0.5, "measured": 1.0},
        "measured_budget": per(lambda m, b: b + 0.01 if m != "full" else 1.0),
        "theoretical_budget": per(lambda m, b: b),
        "ppl_ratio": {c: per(lambda m, b: 1.0 if m == "full" else 2.0 - b) for c in ("wiki", "c4")},
        "acc": {t: per(lambda m, b: 0.5) for t in ("piqa", "winogrande")},
    }


@pytest.fixture
def r04():
    budgets = [0.5, 0.2]
    methods = ["streaming", "h2o", "snapkv", "attention_gate"]
    per = lambda f: {m: {f"{b:g}": f(m, b) for b in budgets} for m in methods}  # noqa: E731
    def task():
        return {"n": 8, "full": 0.45, "acc": per(lambda m, b: 0.4), "measured": per(lambda m, b: b + 0.1),
                "theoretical": per(lambda m, b: b), "gate_throughout_acc": {"0.5": 0.41, "0.2": 0.42}}

    return {
        "quick": False, "model": "smollm2", "budgets": budgets, "methods": methods,
        "gate": {"0.5": {"source": "trained here", "steps": 3, "tokens": 512}},
        "ppl": {"chunks": 2, "chunk_len": 512, "context_len": 384, "tokens": 256, "full_context": 12.0,
                "full_throughout": 14.0, "ratio": per(lambda m, b: 1.0 + (1 - b)),
                "measured": per(lambda m, b: b + 0.05), "theoretical": per(lambda m, b: b),
                "gate_throughout_ratio": {"0.5": 1.2, "0.2": 1.5},
                "gate_throughout_measured": {"0.5": 0.5, "0.2": 0.2}},
        "tasks": {"arc_easy": task(), "winogrande": task()},
        "needle": None,
    }


@pytest.fixture
def r05():
    methods = ["kvcompress", "h2o", "snapkv", "streaming"]
    rates = [2, 8]
    settings = ["query_aware"]
    per = lambda f: {m: {str(r): f(m, r) for r in rates} for m in methods}  # noqa: E731
    per_full = lambda f: {s: {"full": {"1": f("full", 1)}, **per(f)} for s in settings}  # noqa: E731
    full = 1000.0
    return {
        "quick": False, "model": "smollm2", "methods": methods,
        "memory": {"context_len": 512, "rates": rates, "full": full, "full_measured": full,
                   "theoretical": per(lambda m, r: full / r), "measured": per(lambda m, r: full / r * 1.01),
                   "ratio": per(lambda m, r: 1.01), "kvcompress_dense_padded": {"2": 600.0, "8": 200.0}},
        "quality": {"task": "needle", "context_len": 512, "n": 1, "rates": rates, "settings": settings,
                    "full": {"query_aware": 1.0}, "acc": {s: per(lambda m, r: 0.0) for s in settings},
                    "digits": per_full(lambda m, r: 0.25), "measured": per_full(lambda m, r: 1.0 / r + 0.01),
                    "theoretical": per_full(lambda m, r: 1.0 / r)},
        "max_batch": {"budget_bytes": 8000, "full_seqs": 8, "context_len": 512, "full": 8,
                      "by_method": per(lambda m, r: 8 * r - 1), "kvcompress_dense_padded": {"2": 13, "8": 40},
                      "admission": {"rate": 8, "context_len": 256, "admitted": 9, "predicted_with_prefill_peak": 9,
                                    "predicted_steady_state": 16, "full_cache_fits": 2}},
    }


@pytest.fixture
def all_results(r02, r03, r04, r05):
    return {"02_pca_vs_trained": r02, "03_layer_similarity_reuse": r03, "04_attention_score_bias": r04,
            "05_paged_eviction": r05}


def test_matryoshkakv_table(r02):
    t = papers.matryoshkakv(r02, quick=False)
    assert list(t.frame.columns) == ["75 %", "50 %", "measured budget @ 50 %", "theoretical budget @ 50 %"]
    assert t.frame.index[0] == "full cache" and "MatryoshkaKV (searched ranks)" in t.frame.index
    assert len(t.frame) == 1 + 5 + 2  # full, five variants, two schedules (the untrained start is a variant)
    r02["ppl_ratio"]["MatryoshkaKV"]["0.5"] = 7.25
    r02["measured_budget_at_50"]["MatryoshkaKV"] = 0.625
    t = papers.matryoshkakv(r02, quick=False)
    assert t.frame.loc["MatryoshkaKV (uniform ranks)", "50 %"] == 7.25
    assert t.frame.loc["MatryoshkaKV (uniform ranks)", "measured budget @ 50 %"] == 0.625
    assert "SmolLM2-135M" in t.substitutions["model"] and "LLaMA2-7B" in t.substitutions["model"]
    assert "n = 512 eval tokens" in t.caption and "WARNING" not in t.caption


def test_kvcar_table(r03):
    t = papers.kvcar(r03)
    assert t.frame.shape == (1 + 3 * 2, 3 + 4 + 2)
    assert list(t.frame.columns[:3]) == ["nominal budget", "memory reduction (measured)",
                                         "memory reduction (theoretical)"]
    assert {"wiki ppl", "wiki ppl / full", "c4 ppl", "c4 ppl / full", "piqa acc", "winogrande acc"} <= set(
        t.frame.columns)
    r03["ppl_ratio"]["wiki"]["reuse"]["0.52"] = 3.0
    r03["measured_budget"]["reuse"]["0.52"] = 0.4
    r03["acc"]["piqa"]["both"]["0.75"] = 0.123
    t = papers.kvcar(r03)
    row = t.frame.loc["KV-CAR reuse @ 52 %"]
    assert row["wiki ppl / full"] == 3.0 and row["wiki ppl"] == pytest.approx(3.0 * 12.0)
    assert row["memory reduction (measured)"] == pytest.approx(0.6)
    assert t.frame.loc["KV-CAR (autoencoder + reuse) @ 75 %", "piqa acc"] == 0.123
    assert "GPT-2" in t.substitutions["model"] and "piqa: n = 10" in t.caption


def test_kvcompress_tables(r05):
    q = papers.kvcompress_quality(r05)
    assert q.frame.shape == (1 + 2 * 4, 1 + 3 + 1)
    assert list(q.frame.columns) == ["rate", "query-aware acc", "query-aware digits", "query-aware measured budget",
                                     "n"]
    r05["quality"]["acc"]["query_aware"]["snapkv"]["8"] = 0.75
    assert papers.kvcompress_quality(r05).frame.loc["SnapKV @ 8x", "query-aware acc"] == 0.75
    m = papers.kvcompress_memory(r05)
    assert list(m.frame.index) == ["2x", "8x"]
    assert m.frame.loc["8x", "theoretical budget"] == pytest.approx(1 / 8)
    assert m.frame.loc["2x", "same per-head budgets, dense padded: measured / theoretical"] == pytest.approx(1.2)
    r05["max_batch"]["by_method"]["kvcompress"]["8"] = 61
    assert papers.kvcompress_memory(r05).frame.loc["8x", "max batch: KV-Compress paged"] == 61
    assert "9 sequences admitted" in m.caption and "vLLM" in m.substitutions["serving"]


def test_attention_gate_table(r04):
    t = papers.attention_gate(r04)
    # full + 2 budgets x (4 methods + the gate "throughout")
    assert t.frame.shape[0] == 1 + 2 * 5
    assert {"measured budget (ppl run)", "wiki ppl / full", "arc_easy acc", "winogrande acc", "mean acc"} <= set(
        t.frame.columns)
    r04["tasks"]["arc_easy"]["acc"]["h2o"]["0.2"] = 0.9
    r04["ppl"]["ratio"]["attention_gate"]["0.2"] = 4.5
    t = papers.attention_gate(r04)
    assert t.frame.loc["H2O @ 20 %", "arc_easy acc"] == 0.9
    assert t.frame.loc["H2O @ 20 %", "mean acc"] == pytest.approx((0.9 + 0.4) / 2)
    assert t.frame.loc["Attention-Gate @ 20 %", "wiki ppl / full"] == 4.5
    assert t.frame.loc["Attention-Gate, in context (throughout) @ 20 %", "wiki ppl / full"] == 1.5
    assert "Needle" not in t.caption  # the QUICK results have no needle


@pytest.mark.parametrize("builder, notebook, path", [
    (papers.matryoshkakv, "02_pca_vs_trained", ("ppl_ratio",)),
    (papers.kvcar, "03_layer_similarity_reuse", ("acc", "piqa", "reuse")),
    (papers.kvcompress_quality, "05_paged_eviction", ("quality", "digits")),
    (papers.kvcompress_memory, "05_paged_eviction", ("max_batch", "by_method", "kvcompress", "8")),
    (papers.attention_gate, "04_attention_score_bias", ("tasks", "winogrande", "full")),
])
def test_missing_keys_name_the_notebook_and_the_entry(builder, notebook, path, all_results):
    results = copy.deepcopy(all_results[notebook])
    node = results
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(papers.ResultsError) as err:
        builder(results)
    assert notebook in str(err.value) and "/".join(path) in str(err.value) and "re-run" in str(err.value)


def test_quick_mismatch_warns_and_shows_in_caption(r03):
    r03["quick"] = True
    with pytest.warns(UserWarning, match="QUICK-mode numbers"):
        t = papers.kvcar(r03, quick=False)
    assert t.caption.startswith("WARNING:") and "03_layer_similarity_reuse" in t.caption
    t = papers.kvcar(r03, quick=True)  # same mode: no warning, but said to be QUICK numbers
    assert t.warning is None and "QUICK-mode numbers" in t.caption
    assert papers.quick_mismatch({}, "x", False) and papers.quick_mismatch({}, "x", None) is None


def test_table_json_is_valid(all_results):
    tables = papers.build_all(all_results, quick=False)
    assert [t.key for t in tables] == ["matryoshkakv", "kvcar", "kvcompress_quality", "kvcompress_memory",
                                       "attention_gate"]
    for t in tables:
        j = papers.table_json(t)
        assert set(j) == {"title", "caption", "columns", "rows"}
        text = json.dumps(j, allow_nan=False)  # NaN would fail here
        back = json.loads(text)
        assert back["columns"][0] == t.frame.index.name and len(back["rows"]) == len(t.frame)
        assert all(len(row) == len(back["columns"]) for row in back["rows"])
        assert back["caption"] == t.caption and "Substitutions:" in back["caption"]
    j = papers.table_json(tables[0])
    schedule_row = next(r for r in j["rows"] if r[0].startswith("starbucks"))
    assert schedule_row[-1] is None  # NaN (no bytes measured for the schedules) -> null
    frame = pd.DataFrame({"a": [1.23456789, float("nan")]}, index=pd.Index(["x", "y"], name="k"))
    assert papers.table_json(frame, title="t")["rows"] == [["x", 1.235], ["y", None]]
    with pytest.raises(ValueError, match="title"):
        papers.table_json(frame)


def test_build_all_needs_every_notebook(all_results):
    del all_results["05_paged_eviction"]
    with pytest.raises(KeyError, match="05_paged_eviction"):
        papers.build_all(all_results)


def test_paper_claims_are_quoted_with_a_source():
    assert set(papers.PAPER_CLAIMS) == {"matryoshkakv", "kvcar", "kvcompress", "attention_gate"}
    for claims in papers.PAPER_CLAIMS.values():
        assert claims and all(c.url.startswith("https://") and c.text for c in claims)


def test_decode_speed_table():
    speed = [dict(context=c, method=m, ratio_to_full=r, step_bound=1.1) for c in (128, 256)
             for m, r in (("none", 0.9), ("full", 1.0), ("pca", 1.05))]
    t = papers.decode_speed({"quick": True, "model": "smollm2", "speed": speed, "repeats": 1}, quick=True)
    assert list(t.frame.index) == [128, 256] and t.frame.loc[256, "pca: speed-up vs full"] == 1.05
    with pytest.raises(papers.ResultsError, match="06_kernels"):
        papers.decode_speed({"model": "smollm2", "speed": []})


def test_load_missing_results_names_the_notebook_to_run(tmp_path, r02):
    """Library code never runs a notebook: missing results are an error that says which notebook to run."""
    with pytest.raises(FileNotFoundError, match="02_pca_vs_trained.*kvlab report --only 02_pca_vs_trained"):
        papers.load_notebook_results("02_pca_vs_trained", results_dir=tmp_path)
    (tmp_path / "02_pca_vs_trained.json").write_text(json.dumps({**r02, "quick": True}))
    assert papers.load_notebook_results("02_pca_vs_trained", results_dir=tmp_path)["quick"] is True


def test_real_results_if_present():
    """The tables build from the results JSONs of this checkout, when the notebooks have run."""
    from kvlab.report import results_dir

    names = papers.NOTEBOOKS
    found = {}
    for key in ("matryoshkakv", "kvcar", "attention_gate", "kvcompress"):
        path = results_dir() / f"{names[key]}.json"
        if not path.is_file():
            pytest.skip(f"no {path.name} in {results_dir()}")
        found[names[key]] = json.loads(path.read_text())
    for t in papers.build_all(found, quick=None):
        assert len(t.frame) > 1 and not math.isnan(float(t.frame.select_dtypes("number").iloc[1].iloc[0]))
        json.dumps(papers.table_json(t), allow_nan=False)
