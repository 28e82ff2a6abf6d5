"""kvlab.eval.bench and `kvlab bench decode`: the table's columns, positive ratios, bytes, bad input -> exit code 2.
Timings are never asserted on."""

import json

import pytest
import torch

import kvlab
from kvlab.eval import bench
from kvlab.cli import main


@pytest.fixture(scope="module")
def llama():
    return kvlab.tiny_model("llama")


def _pca(model):
    return kvlab.methods.get("pca", 0.5, sinks=2).fit(model, torch.randint(3, 97, (4, 16)))


def test_decode_speed_table(llama):
    table = bench.decode_speed(llama, None, ["full", "streaming", _pca(llama)], contexts=[24, 40], budget=0.5,
                               new_tokens=3, repeats=2, progress=False)
    assert list(table.columns) == bench.COLUMNS and len(table) == 2 * 4
    assert table.method.tolist() == ["none", "full", "streaming", "pca"] * 2  # the baseline is added first
    assert (table.tokens_per_s > 0).all() and (table.ratio > 0).all()
    assert (table.ratio_min <= table.ratio).all() and (table.ratio <= table.ratio_max).all()
    assert (table[table.method == "none"].ratio == 1.0).all()
    by = table.set_index(["context", "method"])
    for context in (24, 40):
        assert by.loc[(context, "none"), "attn_bound"] == by.loc[(context, "full"), "attn_bound"] == 1.0
        assert by.loc[(context, "none"), "kv_budget"] == 1.0
        assert by.loc[(context, "pca"), "attn_bound"] > 1.0 and by.loc[(context, "streaming"), "attn_bound"] > 1.0
        for name in ("streaming", "pca"):  # the whole step reads the weights too: a looser bound than attention's
            assert 1.0 < by.loc[(context, name), "step_bound"] < by.loc[(context, name), "attn_bound"]
            assert by.loc[(context, name), "kv_budget"] < by.loc[(context, "full"), "kv_budget"]  # (growth slack)
    assert by.loc[(40, "none"), "kv_bytes"] == 3 * 2 * 16 * 2 * 2 * (40 + 3)  # layers x kv heads x D x K,V x bf16 (the view)


def test_attention_bytes_follow_the_bytes_model(llama):
    spec = kvlab.ModelSpec.from_model(llama)
    run = bench.time_decode(llama, _pca(llama), torch.randint(3, 97, (1, 20)), 2)
    ours, full = bench.attention_bytes(run["cache"], spec, 4)
    from kvlab.kernels.bytes_model import bytes_moved

    common = dict(batch=1, heads=4, head_dim=16, dtype_bytes=4)
    assert full == 3 * bytes_moved("attention", kv_heads=2, tokens=22, **common)
    projected = bytes_moved("projected_attention", key_ranks=[8, 8], value_ranks=[8, 8], tokens=22, **common)
    assert ours == 3 * (projected + 2 * 2 * 32 * 4)  # + 2 full-rank sinks per kv head


def test_cli_bench_decode_writes_csv_and_json(llama, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kvlab.models, "load_model", lambda name: (llama, None))
    out = tmp_path / "rows.json"
    assert main(["bench", "decode", "--contexts", "20", "--methods", "full,streaming", "--new-tokens", "2",
                 "--repeats", "1", "--out", str(tmp_path), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tokens_per_s" in printed and "streaming" in printed
    csv = tmp_path / f"smollm2@0.5-c20-n2-t{torch.get_num_threads()}.csv"
    assert csv.exists() and csv.read_text().splitlines()[0] == ",".join(bench.COLUMNS)
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["rows"]] == ["none", "full", "streaming"]
    assert record["conditions"]["batch"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--contexts", "512,abc"], "argument --contexts: expected comma-separated integers"),
    (["--contexts", "1"], "argument --contexts: expected comma-separated integers, each >= 2"),
    (["--methods", "none,bogus"], "unknown method 'bogus'"),
    (["--methods", "full,full"], "listed twice"),
    (["--budget", "0"], "argument --budget: expected a number in (0, 1]"),
    (["--budget", "1.5"], "argument --budget: expected a number in (0, 1]"),
    (["--new-tokens", "0"], "argument --new-tokens: expected an integer >= 1"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1"),
    (["--model", "no-such-model"], "model 'no-such-model' is not a bundled model (smollm2, gemma3-270m), not a folder"),
])
def test_bench_bad_input_exits_2(argv, message, capsys):
    assert main(["bench", "decode", *argv]) == 2
    err = capsys.readouterr().err
    assert "kvlab bench decode: error:" in err and message in err and "Traceback" not in err


def test_decode_speed_checks_its_arguments(llama):
    with pytest.raises(ValueError, match="contexts must be integers"):
        bench.decode_speed(llama, None, ["full"], contexts=[0], progress=False)
    with pytest.raises(ValueError, match="methods must be distinct"):
        bench.decode_speed(llama, None, ["full", "full"], contexts=[8], progress=False)
