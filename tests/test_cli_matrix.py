"""Bad input to every subcommand x every option x bad values of each kind: exit 2, a message naming the option, no
traceback, no file left behind.

Subcommands and options are read from ``kvlab.cli.build_parser()`` itself, so a subcommand or option added later is
covered without editing this file; an option must declare its kind (a ``kvlab.cliargs`` type, argparse ``choices``
or a flag), else ``test_every_option_declares_its_kind`` fails and says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from kvlab import cli, cliargs

PARSER = cli.build_parser()


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(("bench", "decode"), parser), ... for every leaf subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, path + (name,))
            return
    yield path, parser


def options(parser: argparse.ArgumentParser):
    """Every action that takes a value (flags and --help left out)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


def label(action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


COMMANDS = list(subcommands(PARSER))
CASES = [(path, label(a)) for path, p in COMMANDS for a in options(p)]


def _corrupt_folder(tmp: Path, name: str, config: str | None, weights: bytes | None = None) -> str:
    folder = tmp / name
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def bad_values(action, tmp: Path) -> list[tuple[str, str]]:
    """(kind of badness, value) for one option, from its declared kind."""
    kind = action.type
    if action.choices is not None and not isinstance(kind, cliargs.Kind):
        return [("not a choice", "bogus-choice"), ("empty", "")]
    common = [("empty", ""), ("wrong type", "abc"), ("NaN", "nan")]
    if isinstance(kind, cliargs.Int):
        out = common + [("not an integer", "1.5"), ("huge", "1e400"), ("huge", "9" * 30)]
        if kind.low is not None:
            out.append(("out of range", str(kind.low - 1)))
        if kind.high is not None:
            out.append(("out of range", str(kind.high + 1)))
        return out
    if isinstance(kind, cliargs.IntList):
        return common + [("empty item", "512,"), ("wrong type in list", "512,abc"),
                         ("out of range", str((kind.item.low or 0) - 1)), ("huge", "9" * 30)]
    if isinstance(kind, cliargs.Float):
        out = common + [("inf", "inf"), ("huge", "1e400")]
        if kind.low is not None:
            out.append(("out of range", str(kind.low if kind.low_open else kind.low - 1)))
        if kind.high is not None:
            out.append(("out of range", str(kind.high + 1)))
        return out
    if isinstance(kind, cliargs.Names):
        good = kind.example(tmp)
        out = [("empty", ""), ("unknown name", "bogus"), ("comma only", ",")]
        if kind.many:
            out += [("unknown name in a list", f"{good},bogus"), ("listed twice", f"{good},{good}"),
                    ("empty item", f"{good},")]
        return out
    if isinstance(kind, cliargs.Model):
        (tmp / "a-file.txt").write_text("not a model\n")
        return [("empty", ""), ("missing folder", "/nonexistent"), ("typo of a bundled name", "gemma3"),
                ("file instead of folder", str(tmp / "a-file.txt")),
                ("folder without config", _corrupt_folder(tmp, "no-config", None)),
                ("truncated JSON", _corrupt_folder(tmp, "truncated-config", '{"model_type": "lla')),
                ("unsupported architecture", _corrupt_folder(tmp, "bert", json.dumps({"model_type": "bert"}))),
                ("corrupt safetensors", _corrupt_folder(tmp, "corrupt-weights", json.dumps(
                    {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}), b"\x00" * 64))]
    if isinstance(kind, cliargs.OutFile):
        (tmp / "a-file.txt").write_text("x\n")
        return [("empty", ""), ("directory instead of file", str(tmp)),
                ("parent is a file", str(tmp / "a-file.txt" / "out.json")), ("trailing slash", str(tmp / "new") + "/")]
    if isinstance(kind, cliargs.OutDir):
        (tmp / "a-file.txt").write_text("x\n")
        out = [("empty", ""), ("file instead of directory", str(tmp / "a-file.txt")),
               ("parent is a file", str(tmp / "a-file.txt" / "sub"))]
        if kind.forbid_suffix:
            out.append(("a file name", str(tmp / f"x{kind.forbid_suffix}")))
        return out
    if isinstance(kind, cliargs.Options):
        return [("empty", ""), ("no value", "sinks"), ("no key", "=3")]
    raise AssertionError(f"option {label(action)} has no declared kind: {kind!r}")


def base_argv(path: tuple[str, ...], parser: argparse.ArgumentParser, tmp: Path, without: str) -> list[str]:
    """A valid command line for ``path``: its parser's ``example`` default plus an example for each required option
    (except ``without``, the option under test)."""
    argv = list(path)
    example = list(parser.get_default("example") or [])
    for action in options(parser):
        if label(action) == without:
            if label(action) in example:  # drop the option under test from the example
                i = example.index(label(action))
                del example[i:i + 2]
            continue
        if action.required and label(action) not in example:
            argv += [label(action), action.type.example(tmp)]
    return argv + example


def snapshot(*folders: Path) -> set[Path]:
    return {p for folder in folders for p in folder.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder apart from the checkout, offline (the hub probe answers at once)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return work


def test_every_subcommand_is_covered():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"fetch", "info", "eval", "fit", "bench decode", "report"} <= names


def test_every_option_declares_its_kind(tmp_path):
    undeclared = [f"kvlab {' '.join(path)} {label(a)}" for path, p in COMMANDS for a in options(p)
                  if not isinstance(a.type, cliargs.Kind) and a.choices is None]
    assert not undeclared, f"options without a kvlab.cliargs kind (type=...) or choices: {undeclared}"


@pytest.mark.parametrize("path, option", CASES, ids=[f"{' '.join(p)} {o}" for p, o in CASES])
def test_bad_values_exit_2_without_traceback_or_files(path, option, sandbox, capsys):
    parser = dict(COMMANDS)[path]
    action = next(a for a in options(parser) if label(a) == option)
    data = sandbox.parent / "inputs"
    data.mkdir()
    cases = bad_values(action, data)
    assert cases, f"no bad values for {option}"
    for kind, value in cases:
        argv = base_argv(path, parser, data, option)
        argv += [option, value] if action.option_strings else [value]
        before = snapshot(sandbox, data)
        code = cli.main(argv)
        err = capsys.readouterr().err
        where = f"kvlab {' '.join(argv)}  ({kind})"
        assert code == 2, f"{where}: exit {code}, stderr {err[-500:]}"
        assert "Traceback" not in err, f"{where}: {err}"
        assert "error:" in err and len(err.strip().splitlines()[-1]) > len("kvlab x: error: "), f"{where}: {err}"
        if action.option_strings and "argument" in err:  # argparse names the option
            assert option in err, f"{where}: the message does not name {option}: {err}"
        assert snapshot(sandbox, data) == before, f"{where} left files behind"


def test_the_four_cases_of_issue_17(sandbox):
    """As a user types them, in a fresh interpreter: exit 2, a clear message, no traceback."""
    import subprocess
    import sys

    root = Path(cli.__file__).resolve().parents[1]
    cases = [
        (["info", "--model", "gemma3"], "not a bundled model (smollm2, gemma3-270m), not a folder, and the hub is "
                                        "unreachable"),
        (["eval", "--model", "/nonexistent", "--ppl", "wiki"], "model folder /nonexistent does not exist"),
        (["eval", "--method", "pca", "--opt", "from=/nonexistent", "--ppl", "wiki"], "no artefact at /nonexistent"),
        (["eval", "--method", "pca", "--opt", "sinks=abc", "--ppl", "wiki"], "sinks takes an integer (>= 0), got 'abc'"),
    ]
    for argv, message in cases:
        run = subprocess.run([sys.executable, "-m", "kvlab.cli", *argv], capture_output=True, text=True, cwd=root,
                             timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (argv, run.stderr)


# ---------------------------------------------------------------------------------------------- bad artefacts


@pytest.fixture(scope="module")
def model_folder(tiny_model_folder):
    return tiny_model_folder


@pytest.fixture(scope="module")
def artefacts(model_folder, tmp_path_factory):
    """A PCA artefact for another model (3 layers, not the tiny 2) and damaged copies of a good one."""
    import torch

    from kvlab.methods import PCA, KVCAR  # noqa: F401
    from kvlab.models import tiny_model

    out = tmp_path_factory.mktemp("artefacts")
    other = tiny_model("llama", n_layers=3, vocab_size=49152)
    calib = torch.randint(3, 49152, (2, 32))
    PCA(sinks=1, source=None).fit(other, calib).save(out / "other-model" / "tiny.safetensors", model=other)
    good = out / "other-model" / "tiny.safetensors"
    cases = {"another model": str(good.parent)}
    (out / "empty-dir").mkdir()
    cases["directory without artefact"] = str(out / "empty-dir")
    (out / "notes.txt").write_text("hello\n")
    cases["not safetensors"] = str(out / "notes.txt")
    (out / "garbage.safetensors").write_bytes(b"\x07" * 100)
    cases["corrupt safetensors"] = str(out / "garbage.safetensors")
    truncated = out / "truncated" / "t.safetensors"
    truncated.parent.mkdir()
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = str(truncated)
    bad_json = out / "bad-json" / "t.safetensors"
    bad_json.parent.mkdir()
    shutil.copy(good, bad_json)
    bad_json.with_suffix(".json").write_text(good.with_suffix(".json").read_text()[:40])
    cases["truncated JSON record"] = str(bad_json)
    cases["missing file"] = str(out / "nope.safetensors")
    return cases


@pytest.mark.parametrize("case", ["another model", "directory without artefact", "not safetensors",
                                  "corrupt safetensors", "truncated safetensors", "truncated JSON record",
                                  "missing file"])
def test_bad_artefacts_exit_2(case, artefacts, model_folder, sandbox, capsys):
    before = snapshot(sandbox)
    code = cli.main(["eval", "--model", str(model_folder), "--method", "pca", "--opt", f"from={artefacts[case]}",
                     "--ppl", "wiki", "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "error:" in err, (case, err)
    assert snapshot(sandbox) == before
