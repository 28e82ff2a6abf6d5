"""Yardsticks that separate (issue 20): chance levels and tests, intervals, continuation perplexity after a
compressed context (exact at full budget), the needle grid, and refusal of contexts beyond the model's window."""

from __future__ import annotations

import math

import pytest
import torch

from kvlab import methods
from kvlab.eval import continuation_ppl, evaluate, multiple_choice, needle_grid, summarise
from kvlab.eval.stats import (above_chance_tasks, bootstrap_interval, chance_level, chance_test,
                              paired_ratio_interval, ppl_interval, t_interval, wilson)
from kvlab.models import check_window, context_window, tiny_model

from test_eval import CharTokenizer, _items


class DecodingCharTokenizer(CharTokenizer):
    """CharTokenizer that also decodes (greedy answers are read back as text)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join("th" if i == 96 else chr(32 + (i - 3 - 32) % 90 + 32 - 32) for i in ids if i > 2)

    def convert_tokens_to_ids(self, token):
        return None


# ------------------------------------------------------------------------------------------------------------------
# statistics


def test_wilson_known_values_and_bad_input():
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # the textbook value
    low, high = wilson(11, 12)
    assert low == pytest.approx(0.6461, abs=1e-3) and high == pytest.approx(0.9851, abs=1e-3)
    assert wilson(50, 100)[0] < 0.5 < wilson(50, 100)[1]
    with pytest.raises(ValueError, match="n must be >= 1"):
        wilson(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, n=3\]"):
        wilson(4, 3)


def test_chance_test_separates_and_names_the_threshold():
    assert chance_level([2, 2, 4, 4]) == pytest.approx(0.375)
    at = chance_test(correct=52, n=100, chance=0.5)
    assert not at["above_chance"] and at["p_value"] > 0.3
    above = chance_test(correct=62, n=100, chance=0.5)
    assert above["above_chance"] and above["p_value"] < 0.05
    assert at["min_correct"] == 59  # P(X >= 59 | n=100, p=.5) = .044, P(X >= 58) = .067
    assert above["ci95"][0] < 0.62 < above["ci95"][1]
    with pytest.raises(ValueError, match="chance must be in"):
        chance_test(1, 2, 1.0)
    result = {"tasks": {"piqa": {"above_chance": True}, "winogrande": {"above_chance": False}, "x": {}}}
    assert above_chance_tasks(result) == ["piqa"]


def test_document_intervals():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, lo, hi = t_interval(values)
    assert mean == 2.5 and lo == pytest.approx(2.5 - 3.182 * math.sqrt(5 / 3) / 2, abs=1e-3) and hi > mean
    mean_b, lo_b, hi_b = bootstrap_interval(values)
    assert mean_b == 2.5 and 1.0 <= lo_b < 2.5 < hi_b <= 4.0
    p = ppl_interval([1.0, 1.2, 0.8])
    assert p["ppl"] == pytest.approx(math.e) and p["ci95"][0] < math.e < p["ci95"][1]
    same = paired_ratio_interval([1.0, 1.2, 0.8], [0.9, 1.1, 0.7])
    assert same["ratio"] == pytest.approx(math.exp(0.1)) and same["ci95"][0] == pytest.approx(math.exp(0.1))
    with pytest.raises(ValueError, match="at least 2 documents"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="allowed: t, bootstrap"):
        ppl_interval(values, method="normal")


def test_multiple_choice_reports_chance_and_the_test():
    r = multiple_choice(tiny_model("llama"), CharTokenizer(), methods.get("full"), _items(), progress=False)
    # _items: 4 items with 2, 3, 2 and 2 choices
    assert r["chance"] == pytest.approx((0.5 + 1 / 3 + 0.5 + 0.5) / 4)
    assert r["p_vs_chance"] > 0.05 and r["above_chance"] is False  # 4 items cannot separate from chance
    assert r["acc_ci95"][0] <= r["acc"] <= r["acc_ci95"][1]


# ------------------------------------------------------------------------------------------------------------------
# continuation perplexity after a compressed context


def _docs(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_continuation_full_equals_none(arch):
    model = tiny_model(arch)
    docs = _docs(3, 40 + 17)
    ref = continuation_ppl(model, None, methods.get("none"), context_len=40, continuation_len=17, n_docs=3,
                           corpus=docs, progress=False)
    got = continuation_ppl(model, None, methods.get("full"), context_len=40, continuation_len=17, n_docs=3,
                           corpus=docs, progress=False)
    assert got["doc_nll"] == pytest.approx(ref["doc_nll"], abs=1e-5)
    assert abs(got["ppl"] - ref["ppl"]) <= 1e-5 * ref["ppl"]
    assert got["tokens"] == 3 * 17 and got["n_docs"] == 3 and got["ci95"][0] < got["ppl"] < got["ci95"][1]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_continuation_scores_only_the_continuation_through_the_compressed_cache(arch):
    model = tiny_model(arch)
    docs = _docs(2, 64 + 8, seed=1)
    full = continuation_ppl(model, None, methods.get("full"), context_len=64, continuation_len=8, n_docs=2,
                            corpus=docs, progress=False)
    h2o = continuation_ppl(model, None, methods.get("h2o", 0.125, decode=True), context_len=64, continuation_len=8,
                           n_docs=2, corpus=docs, progress=False)
    assert h2o["doc_nll"] != pytest.approx(full["doc_nll"], abs=1e-6)  # compression changes what is scored
    assert h2o["budget"] < 0.3 and full["budget"] >= 1.0
    # the plain model's NLL of the same continuation tokens (no cache at all)
    with torch.inference_mode():
        logits = model(input_ids=docs).logits[:, 63:-1].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, docs[:, 64:, None]).squeeze(-1).mean(1)
    assert full["doc_nll"] == pytest.approx(nll.tolist(), abs=1e-5)


def test_continuation_bad_input():
    model = tiny_model("llama")  # window: 512 positions
    with pytest.raises(ValueError, match=r"needs 1024 tokens .* at most 512 tokens \(max_position_embeddings\)"):
        continuation_ppl(model, None, methods.get("full"), context_len=768, continuation_len=256, corpus=_docs(2, 1024))
    with pytest.raises(ValueError, match=r"a tensor corpus must be \(n, context_len \+ continuation_len = 30\)"):
        continuation_ppl(model, None, methods.get("full"), context_len=20, continuation_len=10, corpus=_docs(2, 31))
    with pytest.raises(ValueError, match="context_len must be a positive integer"):
        continuation_ppl(model, None, methods.get("full"), context_len=0, corpus=_docs(2, 31))


def test_window_of_every_tiny_model_and_the_bundled_config():
    assert context_window(tiny_model("llama")) == 512 and context_window(tiny_model("gpt2")) == 512
    check_window(tiny_model("gemma3"), 512)
    with pytest.raises(ValueError, match="at most 512"):
        check_window(tiny_model("gemma3"), 513, "the needle")


# ------------------------------------------------------------------------------------------------------------------
# needle grid and evaluate()


def test_needle_grid_rows_and_summary():
    from kvlab.data import longctx

    if not (longctx.artifact_path("longctx") / "PaulGrahamEssays.json").exists():
        pytest.skip("long-context data not fetched")
    model, tok = tiny_model("llama"), DecodingCharTokenizer()
    table = needle_grid(model, tok, methods.get("full"), lengths=(160, 200), depths=(0.2, 0.8), n_per_cell=2,
                        max_new_tokens=3, progress=False)
    assert len(table) == 2 * 2 * 2 * 2 and set(table["setting"]) == {"query_aware", "query_agnostic"}
    # both settings see the same needles
    aware = table[table.setting == "query_aware"]["answer"].tolist()
    assert aware == table[table.setting == "query_agnostic"]["answer"].tolist()
    summary = summarise(table)
    assert list(summary["n"]) == [4, 4, 4, 4]
    assert ((summary.ci_low <= summary.acc) & (summary.acc <= summary.ci_high)).all()
    with pytest.raises(ValueError, match="needle at context_len 600 needs 600 tokens"):
        needle_grid(model, tok, methods.get("full"), lengths=(600,), depths=(0.5,), progress=False)


def test_evaluate_runs_the_continuation_task_and_names_it():
    from kvlab.data.text import tokenize_split

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="continuation"):
        evaluate(model, CharTokenizer(), methods.get("full"), tasks=["bogus"], progress=False)
    try:
        tokenize_split("wiki", CharTokenizer(), split="eval")
    except FileNotFoundError:
        pytest.skip("text corpora not fetched")
    r = evaluate(model, CharTokenizer(), methods.get("h2o", 0.25), tasks=["continuation"], context_len=96,
                 continuation_len=16, limit=2, protocol="context", progress=False)
    c = r["tasks"]["continuation"]
    assert c["n_docs"] == 2 and c["context_len"] == 96 and c["continuation_len"] == 16 and len(c["ci95"]) == 2


def test_cli_refuses_a_context_longer_than_the_window(capsys):
    from kvlab.cli import main

    assert main(["eval", "--method", "full", "--tasks", "continuation", "--context-len", "8000"]) == 2
    err = capsys.readouterr().err
    assert "8256 tokens" in err and "at most 8192 tokens" in err


# ------------------------------------------------------------------------------------------------------------------
# frontier: averages over the tasks that separate


def test_chance_table_marks_tasks_at_chance():
    from kvlab.eval.frontier import chance_table

    result = {"tasks": {
        "piqa": {"n": 100, "acc": 0.68, "acc_ci95": [0.58, 0.76], "chance": 0.5, "p_vs_chance": 2e-4,
                 "above_chance": True},
        "winogrande": {"n": 100, "acc": 0.52, "acc_ci95": [0.42, 0.62], "chance": 0.5, "p_vs_chance": 0.38,
                       "above_chance": False},
        "needle": {"acc": 1.0, "n": 4}}}
    table = chance_table(result)
    assert list(table["task"]) == ["piqa", "winogrande"]
    assert list(table["mark"]) == ["", "at chance"] and list(table["separates"]) == [True, False]


def test_run_grid_averages_only_the_tasks_asked():
    from kvlab.data.tasks import task_size
    from kvlab.eval.frontier import run_grid

    try:
        task_size("copa")
    except FileNotFoundError:
        pytest.skip("tasks not fetched")
    model, tok = tiny_model("llama"), CharTokenizer()
    grid = run_grid(model, tok, {"full": [methods.get("full")]}, tasks=("copa", "rte"), limit=3, num_fewshot=0,
                    progress=False, average_over=("rte",))
    row = grid.iloc[0]
    assert row["avg_acc"] == row["rte"] and row["avg_tasks"] == "rte"
    with pytest.raises(ValueError, match="average_over must be a non-empty subset"):
        run_grid(model, tok, {"full": [methods.get("full")]}, tasks=("copa",), limit=2, average_over=("piqa",))


def test_fit_command_names_the_bundled_model(tmp_path):
    from kvlab.methods.artefacts import fit_command

    model = tiny_model("gemma3")
    assert fit_command("pca", model) == "kvlab fit --model <your model folder> --method pca --out data/pca"
    model.config._name_or_path = str(tmp_path / "models" / "gemma3-270m")
    assert fit_command("matryoshka", model, search=True) == (
        "kvlab fit --model gemma3-270m --method matryoshka --search --out data/matryoshka")


def test_a_fitted_method_without_artefact_says_which_fit_command_makes_it(capsys):
    from kvlab.data.text import tokenize_split

    try:
        tokenize_split("wiki", CharTokenizer(), split="calib")
    except FileNotFoundError:
        pytest.skip("text corpora not fetched")
    model = tiny_model("gemma3")
    model.config._name_or_path = "/somewhere/models/gemma3-270m"
    methods.get("pca", 0.5, calib_chunks=2, chunk_len=32).prepare(model, CharTokenizer())
    err = capsys.readouterr().err
    assert "pca: no artefact for this model" in err
    assert "`kvlab fit --model gemma3-270m --method pca --out data/pca`" in err


# ------------------------------------------------------------------------------------------------------------------
# sliding-window layers: bytes against the window-bounded reference


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reference_bytes_are_what_a_plain_cache_needs(arch):
    from kvlab.budget import kv_bytes

    model = tiny_model(arch, n_layers=4)  # gemma3: window 8, layers 0-2 sliding, 3 global
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    got = {}
    for name in ("none", "full"):
        with torch.no_grad(), methods.get(name).apply(model) as cache:
            model(ids, past_key_values=cache, use_cache=True)
            got[name] = kv_bytes(cache, "fp32")  # the sizes below are the fp32 model's own
    none, full = got["none"], got["full"]
    assert full.reference == none.theoretical  # DynamicCache keeps window - 1 tokens of a sliding layer
    if arch == "llama":
        assert full.reference == full.full and full.budget_vs_reference == pytest.approx(full.budget)
    else:
        per_token = 2 * 1 * 32 * 4 * 2  # batch 2 x 1 kv head x head_dim 32 x fp32, keys and values
        assert full.full == 4 * 40 * per_token and full.reference == (3 * 7 + 40) * per_token
        assert full.budget_vs_reference == pytest.approx(4 * 40 / (3 * 7 + 40))  # kvlab keeps what the window left


def test_continuation_reports_both_budgets_on_gemma3():
    model = tiny_model("gemma3")
    r = continuation_ppl(model, None, methods.get("h2o", 0.25, decode=True), context_len=40, continuation_len=8,
                         n_docs=2, corpus=_docs(2, 48), progress=False)
    assert r["budget"] < r["budget_vs_reference"]  # sliding layers need only their window: the honest ratio is higher


# ------------------------------------------------------------------------------------------------------------------
# every method on Gemma3's geometry (MQA, head_dim 32 here, sliding-window + global layers)

FIT = {"matryoshka": dict(steps=2, progress=False), "kvcar": dict(steps=1, recon_steps=2, progress=False),
       "attention_gate": dict(steps=2, progress=False)}
OPTIONS = {"matryoshka": dict(steps=2), "kvcar": dict(steps=1, recon_steps=2), "attention_gate": dict(steps=2),
           "kvcompress": dict(window=8)}  # an observation window within the 24-token context


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_runs_the_continuation_yardstick_on_gemma3(name):
    model = tiny_model("gemma3", n_layers=4)
    calib = torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    budget = None if name in ("none", "full") else 0.5
    method = methods.get(name, budget, **OPTIONS.get(name, {})) if budget else methods.get(name)
    if name == "attention_gate":
        method.fit(model, train_data=calib, **FIT[name])
    elif name == "composed":
        method.fit(model, calib)
    elif name == "kvcar+reuse":  # the similarity, then its own KVCAR (fitted apart, as the method documents)
        method.fit(model, calib)
        method.kvcar_part().fit(model, calib, **FIT["kvcar"])
    elif "fit" in type(method).__dict__ or name in FIT:
        method.fit(model, calib, **FIT.get(name, {}))
    r = continuation_ppl(model, None, method, context_len=24, continuation_len=6, n_docs=2,
                         corpus=_docs(2, 30, seed=3), progress=False)
    assert math.isfinite(r["ppl"]) and r["tokens"] == 12
    assert 0 < r["budget"] and r["budget_vs_reference"] >= r["budget"]
