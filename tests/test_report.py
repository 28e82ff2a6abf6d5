"""kvlab.report and kvlab.plotting: notebook execution, the HTML report, where outputs go.

One real report run (two fixture notebooks, one kernel each, in parallel) is shared by the end-to-end
tests, and one more (three tiny notebooks written here) by the parallel / run-after-others tests;
everything else runs in-process without a kernel.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from kvlab import report

FIXTURES = Path(__file__).parent / "fixtures" / "nb"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run build_report(quick=True) once on a temp copy of the fixture notebooks."""
    root = tmp_path_factory.mktemp("report")
    notebooks = root / "notebooks"
    shutil.copytree(FIXTURES, notebooks)
    out, figures = root / "reports", root / "figures"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(report.ReportError) as excinfo:
        report.build_report(notebooks, out, quick=True, figures_dir=figures, jobs=2)
    return {"root": root, "out": out, "figures": figures, "error": excinfo.value,
            "stderr": stderr.getvalue()}


# ---------------------------------------------------------------- end to end (one shared run)

def test_index_links_every_notebook_page(built: dict) -> None:
    out = built["out"]
    index = (out / "index.html").read_text()
    for name in ("00_fixture", "01_failing"):
        assert f'href="{name}.html"' in index
        assert (out / f"{name}.html").is_file() and (out / f"{name}.ipynb").is_file()
    images = re.findall(r'<img src="([^"]+)"', index)
    assert images == ["figures/00_fixture/matrix.png"]  # key_figure named by the results JSON
    assert all((out / src).is_file() for src in images)  # relative links resolve inside reports/
    assert "mode: <b>quick</b>" in index and "transformers" in index


def test_injected_quick_reaches_the_notebook(built: dict) -> None:
    results = report.load_results("00_fixture", results_dir=built["out"] / "results")
    assert results["quick"] is True and results["n"] == 4
    assert results["key_figure"] == "figures/00_fixture/matrix.png"


def test_kernel_runs_this_interpreter(built: dict) -> None:
    results = report.load_results("00_fixture", results_dir=built["out"] / "results")
    assert os.path.realpath(results["python_prefix"]) == os.path.realpath(sys.prefix)
    summary = json.loads((built["out"] / "summary.json").read_text())
    assert {nb["kernel_python"] for nb in summary["notebooks"]} == {results["python_executable"]}


def test_figures_written_as_png_and_pdf(built: dict) -> None:
    folder = built["figures"] / "00_fixture"
    for name in ("matrix", "budget"):
        assert (folder / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (folder / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_failing_notebook_reported_after_index_written(built: dict) -> None:
    error: report.ReportError = built["error"]
    assert [run.name for run in error.failed] == ["01_failing"]
    assert error.index.is_file() and "deliberate fixture failure" in str(error)
    summary = json.loads((built["out"] / "summary.json").read_text())
    assert summary["ok"] is False and summary["failed"] == ["01_failing"]
    by_name = {nb["name"]: nb for nb in summary["notebooks"]}
    assert by_name["00_fixture"]["ok"] is True
    failing = by_name["01_failing"]
    assert failing["ok"] is False and "ValueError: deliberate fixture failure" in failing["error"]
    page = (built["out"] / "01_failing.html").read_text()
    assert "before the failure" in page and "deliberate fixture failure" in page  # partial output kept
    lines = sorted(built["stderr"].strip().splitlines(), key=lambda line: line.split()[1])  # finish order varies
    assert len(lines) == 2 and "00_fixture" in lines[0] and "ok" in lines[0]
    assert "01_failing" in lines[1] and "FAILED" in lines[1]


# ---------------------------------------------------------------- parameters (no kernel)

def test_inject_parameters_goes_right_after_parameters_cell() -> None:
    nb = report.read_notebook(FIXTURES / "00_fixture.py")
    report.inject_parameters(nb, {"QUICK": False, "SIZE": 5})
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    at = tags.index(["parameters"])
    assert tags[at + 1] == [report.INJECTED_TAG]
    assert nb.cells[at + 1].source.splitlines()[1:] == ["QUICK = False", "SIZE = 5"]


@pytest.mark.parametrize(("params", "error", "match"), [
    ({"SIZ": 5}, report.NotebookFormatError, "SIZ not defined"),
    ({"SIZE": object()}, TypeError, "Python literals"),
    ({"not a name": 1}, ValueError, "identifier"),
])
def test_inject_parameters_rejects(params: dict, error: type, match: str) -> None:
    nb = report.read_notebook(FIXTURES / "00_fixture.py")
    with pytest.raises(error, match=match):
        report.inject_parameters(nb, params)


def test_notebook_without_parameters_cell_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "05_bare.py"
    path.write_text("# %%\nQUICK = False\n")
    run = report.run_notebook(path, quick=True, out_dir=tmp_path / "out")
    assert not run.ok and "tagged 'parameters'" in run.error and run.html is None


def test_discover_notebooks_only(tmp_path: Path) -> None:
    for name in ("00_a.py", "01_b.py", "02_c.py", "helper.py"):
        (tmp_path / name).write_text("")
    assert [p.stem for p in report.discover_notebooks(tmp_path)] == ["00_a", "01_b", "02_c"]
    assert [p.stem for p in report.discover_notebooks(tmp_path, "02,00_a")] == ["00_a", "02_c"]
    with pytest.raises(ValueError, match="available: 00_a, 01_b, 02_c"):
        report.discover_notebooks(tmp_path, ["09"])


# ---------------------------------------------------------------- output locations (no kernel)

def test_notebook_name_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (report.ENV_NOTEBOOK, "JPY_SESSION_NAME"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="notebook="):
        report.notebook_name()
    monkeypatch.setenv("JPY_SESSION_NAME", "/x/notebooks/03_reuse.py")
    assert report.notebook_name() == "03_reuse"
    assert report.notebook_name("01_kv_spectra") == "01_kv_spectra"
    monkeypatch.setenv(report.ENV_NOTEBOOK, "02_pca")
    assert report.notebook_name("01_kv_spectra") == "02_pca"
    monkeypatch.setenv(report.ENV_NOTEBOOK, "../escape")
    with pytest.raises(ValueError, match="path separators"):
        report.notebook_name()


def test_save_results_and_savefig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvlab import plotting

    monkeypatch.delenv(report.ENV_NOTEBOOK, raising=False)
    monkeypatch.setenv(report.ENV_RESULTS_DIR, str(tmp_path / "results"))
    monkeypatch.setenv(report.ENV_FIGURES_DIR, str(tmp_path / "figs"))
    fig, ax = plt.subplots()
    plotting.heatmap(ax, np.arange(6.0).reshape(3, 2), cbar_label="x")
    png = plotting.savefig(fig, "map.png", notebook="07_demo")
    plt.close(fig)
    assert png == tmp_path / "figs" / "07_demo" / "map.png" and png.with_suffix(".pdf").is_file()
    path = report.save_results({"acc": np.float32(0.5), "curve": np.arange(3), "key_figure": png},
                               notebook="07_demo")
    assert path == tmp_path / "results" / "07_demo.json"
    assert report.load_results("07_demo") == {"acc": 0.5, "curve": [0, 1, 2],
                                              "key_figure": "figs/07_demo/map.png"}
    with pytest.raises(ValueError, match="2-D"):
        plotting.heatmap(ax, np.zeros((2, 2, 2)))


def test_key_figure_falls_back_to_first_png_written(tmp_path: Path) -> None:
    folder = tmp_path / "figs" / "04_bias"
    folder.mkdir(parents=True)
    for i, name in enumerate(("b_first.png", "a_second.png")):
        (folder / name).write_bytes(b"\x89PNG")
        os.utime(folder / name, (1000 + i, 1000 + i))
    results = tmp_path / "04_bias.json"
    results.write_text(json.dumps({"acc": 1.0}))
    found = report._find_key_figure(results, tmp_path / "figs", "04_bias", since=0.0)
    assert found == (folder / "b_first.png").resolve()
    assert report._find_key_figure(results, tmp_path / "figs", "04_bias", since=5000.0) is None  # stale
    results.write_text(json.dumps({"key_figure": "figs/04_bias/a_second.png"}))
    assert report._find_key_figure(results, tmp_path / "figs", "04_bias", since=0.0).name == "a_second.png"


# ---------------------------------------------------------------- parallel runs and dependencies

def _write_notebook(folder: Path, name: str, code: str, tags: tuple[str, ...] = ("parameters",)) -> Path:
    """A minimal py:percent notebook: a title, a parameters cell with ``tags``, one code cell."""
    tag_list = ", ".join(f'"{tag}"' for tag in tags)
    path = folder / f"{name}.py"
    path.write_text(f"# %% [markdown]\n# # Notebook {name}\n\n# %% tags=[{tag_list}]\nQUICK = False\n\n"
                    f"# %%\n{textwrap.dedent(code).strip()}\n")
    return path


# 01_a and 02_b wait for each other (files in the notebooks folder, the kernels' cwd): both succeed only
# if they run at the same time. 00_after is tagged, so despite its name it starts after both.
_RENDEZVOUS = """
    import os, time
    from pathlib import Path
    from kvlab.report import save_results
    Path("{me}.started").touch()
    deadline = time.time() + 30
    while not Path("{other}.started").exists():
        assert time.time() < deadline, "{other} did not start while {me} ran: not in parallel"
        time.sleep(0.05)
    time.sleep(0.3)
    extra = {{}}
    if "{me}" == "01_a":
        import torch
        extra = {{"omp": os.environ["OMP_NUM_THREADS"], "torch_threads": torch.get_num_threads()}}
    save_results({{"value": {value}, **extra}})
"""
_AFTER = """
    from kvlab.report import load_results, save_results
    save_results({"total": load_results("01_a")["value"] + load_results("02_b")["value"]})
"""


@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """build_report(jobs=2) on 00_after (run-after-others), 01_a, 02_b; 4 'CPUs' -> 2 threads per kernel."""
    root = tmp_path_factory.mktemp("parallel")
    notebooks = root / "notebooks"
    notebooks.mkdir()
    _write_notebook(notebooks, "00_after", _AFTER, tags=("parameters", report.AFTER_OTHERS_TAG))
    _write_notebook(notebooks, "01_a", _RENDEZVOUS.format(me="01_a", other="02_b", value=1))
    _write_notebook(notebooks, "02_b", _RENDEZVOUS.format(me="02_b", other="01_a", value=2))
    out = root / "reports"
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setattr(report, "_cpu_count", lambda: 4)
        index = report.build_report(notebooks, out, quick=True, figures_dir=root / "figures", jobs=2)
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "index": index, "stderr": stderr.getvalue(), "summary": summary,
            "by_name": {nb["name"]: nb for nb in summary["notebooks"]}}


def test_parallel_notebooks_all_produce_outputs(parallel: dict) -> None:
    out, by_name = parallel["out"], parallel["by_name"]
    for name in ("00_after", "01_a", "02_b"):
        assert by_name[name]["ok"], by_name[name]["error"]
        assert (out / f"{name}.html").is_file() and (out / f"{name}.ipynb").is_file()
    assert report.load_results("02_b", results_dir=out / "results")["value"] == 2
    summary = parallel["summary"]
    assert summary["jobs"] == 2 and 0 < summary["wall_seconds"] and summary["total_seconds"] > 0
    assert [nb["name"] for nb in summary["notebooks"]] == ["00_after", "01_a", "02_b"]  # name order


def test_kernel_threads_follow_jobs(parallel: dict) -> None:
    results = report.load_results("01_a", results_dir=parallel["out"] / "results")
    assert results["omp"] == "2" and results["torch_threads"] == 2  # 4 CPUs // 2 workers
    assert parallel["by_name"]["01_a"]["threads"] == 2
    assert parallel["by_name"]["00_after"]["threads"] == 4  # runs alone in its batch


def test_run_after_others_starts_after_them(parallel: dict) -> None:
    by_name = parallel["by_name"]
    assert report.load_results("00_after", results_dir=parallel["out"] / "results") == {"total": 3}
    after = by_name["00_after"]
    assert after["run_after_others"] and not by_name["01_a"]["run_after_others"]
    assert all(after["started"] >= nb["started"] + nb["seconds"] - 0.05 for nb in (by_name["01_a"], by_name["02_b"]))
    assert "00_after" in parallel["stderr"].strip().splitlines()[-1]
    assert "after others" in parallel["index"].read_text()


def test_runs_after_others_reads_the_parameters_tags(tmp_path: Path) -> None:
    assert report.runs_after_others(_write_notebook(tmp_path, "07_x", "pass", ("parameters", "run-after-others")))
    assert not report.runs_after_others(_write_notebook(tmp_path, "01_y", "pass"))
    (tmp_path / "02_bare.py").write_text("# %%\nQUICK = False\n")
    assert not report.runs_after_others(tmp_path / "02_bare.py")


def test_schedule_longest_first(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.py" for name in ("00_a", "01_b", "02_c", "03_new")]
    assert report._schedule(paths, {}) == paths  # no history: name order
    previous = {"00_a": 5.0, "01_b": 300.0, "02_c": 40.0}
    assert [p.stem for p in report._schedule(paths, previous)] == ["03_new", "01_b", "02_c", "00_a"]
    (tmp_path / "summary.json").write_text(json.dumps({"notebooks": [{"name": "01_b", "seconds": 3.5}]}))
    assert report._previous_seconds(tmp_path / "summary.json", quick=False) == {"01_b": 3.5}
    assert report._previous_seconds(tmp_path / "missing.json", quick=False) == {}


def test_expected_seconds_committed_then_previous_run_of_the_same_mode(tmp_path: Path) -> None:
    (tmp_path / "expected_seconds.json").write_text(json.dumps({"full": {"00_a": 10, "01_b": 900}, "quick": {}}))
    summary = tmp_path / "summary.json"
    assert report._expected_seconds(tmp_path, summary, quick=False) == {"00_a": 10.0, "01_b": 900.0}
    assert report._expected_seconds(tmp_path, summary, quick=True) == {}
    summary.write_text(json.dumps({"notebooks": [{"name": "00_a", "seconds": 2000, "mode": "full"},
                                                 {"name": "01_b", "seconds": 1, "mode": "quick"}]}))
    assert report._expected_seconds(tmp_path, summary, quick=False) == {"00_a": 2000.0, "01_b": 900.0}
    assert report._expected_seconds(tmp_path, summary, quick=True) == {"01_b": 1.0}


def test_kernel_env_sets_thread_limits(tmp_path: Path) -> None:
    env = report._kernel_env("01_x", tmp_path, tmp_path, threads=3)
    assert all(env[var] == "3" for var in report.THREAD_ENV_VARS)
    with pytest.raises(ValueError, match="threads"):
        report._kernel_env("01_x", tmp_path, tmp_path, threads=0)


def test_report_cli_rejects_bad_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    from kvlab import cli

    assert cli.main(["report", "--jobs", "0"]) == 2
    assert "argument --jobs: expected an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- the index page (no kernel)

def test_index_renders_paper_tables_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "_git_commit", lambda root: "abc123")
    monkeypatch.setattr(report, "_gpus", lambda: "none")
    results = tmp_path / "results" / "07_paper.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"acc": 0.5, "tables": [
        {"title": "Table 1 <b>bold</b>", "caption": "ppl & acc <script>alert(1)</script>",
         "columns": ["method", "ppl", "<i>acc</i>"],
         "rows": [["pca", 12.3456789, 0.5], {"method": "full", "ppl": 11.0, "<i>acc</i>": None}]},
        {"title": "broken", "columns": ["a", "b"], "rows": [[1]]},
    ]}))
    runs = [report.NotebookRun(name="07_paper", source=tmp_path / "07_paper.py", title="Paper results",
                               quick=False, ok=True, seconds=12.0, results=results),
            report.NotebookRun(name="08_other", source=tmp_path / "08_other.py", title="Other",
                               quick=False, ok=False, seconds=1.0, error="boom")]
    index = report._write_index(tmp_path, runs, quick=False, title="t", jobs=2, wall_seconds=10.0)
    page = index.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Table 1 &lt;b&gt;bold&lt;/b&gt;" in page and "<th>&lt;i&gt;acc&lt;/i&gt;</th>" in page
    assert "<td>pca</td><td>12.35</td><td>0.5</td>" in page
    assert "<td>full</td><td>11</td><td></td>" in page  # dict row, None -> empty
    assert "row 1 has 1 cells for 2 columns" in page
    tables_part = page.split('id="paper-tables"', 1)[1]
    assert 'id="tables-07_paper"' in tables_part and "tables-08_other" not in tables_part
    assert "Paper results" in tables_part.split("<table", 1)[0]  # under the notebook's heading
    for text in ("triton", "abc123", "wall clock 10 s with 2 jobs", "sum of notebook times 13 s", "full"):
        assert text in page
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jobs"] == 2 and summary["wall_seconds"] == 10.0 and summary["total_seconds"] == 13.0
    assert "tables" not in summary["notebooks"][0]
