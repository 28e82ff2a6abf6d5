"""kvlab.report and kvlab.plotting: notebook execution, the HTML report, where outputs go.

One real report run (two fixture notebooks, one kernel each) is shared by the end-to-end tests;
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
        report.build_report(notebooks, out, quick=True, figures_dir=figures)
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
    lines = built["stderr"].strip().splitlines()
    assert len(lines) == 2 and "00_fixture" in lines[0] and "ok" in lines[0] and "FAILED" in lines[1]


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
