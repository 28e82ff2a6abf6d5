import json

import pytest

from kvlab.cli import main, parse_options


@pytest.mark.parametrize("argv, message", [
    (["eval", "--method", "nope", "--ppl", "wiki"], "unknown method 'nope'"),
    (["eval", "--method", "pca", "--budget", "0", "--ppl", "wiki"], "argument --budget: expected a number in (0, 1], got '0'"),
    (["eval", "--method", "pca", "--budget", "1.5", "--ppl", "wiki"], "expected a number in (0, 1], got '1.5'"),
    (["eval", "--method", "full", "--budget", "0.5", "--ppl", "wiki"], "budget must be 1.0"),
    (["eval", "--method", "pca", "--opt", "rank=3", "--ppl", "wiki"], "unknown option(s) rank"),
    (["eval", "--method", "pca", "--opt", "sinks", "--ppl", "wiki"], "--opt takes key=value"),
    (["eval", "--tasks", "piqa,foo"], "argument --tasks: unknown task 'foo'"),
    (["eval", "--ppl", "wikitext"], "unknown corpus"),
    (["eval", "--method", "full"], "nothing to evaluate"),
    (["eval", "--ppl", "wiki", "--limit", "0"], "argument --limit: expected an integer >= 1"),
    (["eval", "--tasks", "piqa", "--fewshot", "-1"], "argument --fewshot: expected an integer >= 0"),
    (["fit", "--method", "full", "--out", "x"], "method 'full' has nothing to fit; fittable methods: attention_gate, cross_layer, kvcar, matryoshka, pca, reuse, shared_basis"),
    (["fit", "--method", "bogus", "--out", "x"], "argument --method: unknown method 'bogus'; choose method from: "),
    (["eval", "--method", "bogus", "--ppl", "wiki"], "bogus"),
    (["fit", "--method", "reuse", "--search", "--out", "x"], "method 'reuse' has no rank search"),
    (["fit", "--method", "pca", "--out", "x.safetensors"], "the artefact is written as DIR/<model>.safetensors"),
    (["fit", "--method", "pca", "--budget", "2", "--out", "x"], "argument --budget: expected a number in (0, 1]"),
    (["fit", "--method", "matryoshka", "--opt", "schedule=nested", "--out", "x"], "unknown schedule 'nested'"),
    (["eval", "--method", "pca", "--opt", "allocation=best", "--ppl", "wiki"], "allocation must be one of"),
    (["eval", "--method", "h2o", "--budget", "0.5", "--protocol", "throughout", "--ppl", "wiki"],
     "method 'h2o' supports --protocol context, not 'throughout'"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_subcommand_exits_2():
    assert main(["frobnicate"]) == 2


def test_parse_options_types():
    assert parse_options(["a=3", "b=0.5", "c=true", "d=attention", "e=null", "f=[1,2]"]) == {
        "a": 3, "b": 0.5, "c": True, "d": "attention", "e": None, "f": [1, 2]}


def test_info_json(capsys, tmp_path):
    import kvlab

    kvlab.tiny_model("gpt2").save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["arch"] == "gpt2" and spec["rope"] is False and spec["n_kv_heads"] == 4


@pytest.mark.slow
def test_eval_full_equals_none_and_writes_json(tmp_path, capsys):
    results = {}
    for method in ("none", "full"):
        path = tmp_path / f"{method}.json"
        assert main(["eval", "--method", method, "--tasks", "piqa", "--ppl", "wiki", "--limit", "3",
                     "--json", str(path)]) == 0
        results[method] = json.loads(path.read_text())
    none, full = results["none"], results["full"]
    assert none["method"] == "none" and full["model"] == "smollm2"
    assert none["tasks"]["piqa"]["acc"] == full["tasks"]["piqa"]["acc"] and full["tasks"]["piqa"]["n"] == 3
    assert none["ppl"]["wiki"]["ppl"] == pytest.approx(full["ppl"]["wiki"]["ppl"], rel=1e-5)
    assert full["ppl"]["wiki"]["tokens"] == 3 * 511
    assert set(full["kv_bytes"]) >= {"full", "theoretical", "measured"}
    assert full["kv_bytes"]["measured"] == full["kv_bytes"]["full"]
