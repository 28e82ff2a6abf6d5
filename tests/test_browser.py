"""JupyterLab and the report in a real browser: headless system Chromium driven by Playwright for Python.

JupyterLab runs headless on a free port with token auth and temp config / settings / runtime / workspace dirs, on a
temp copy of the tour and explorer notebooks set to QUICK (results and figures go to temp dirs too, never the repo).
Screenshots go to ``reports/browser/`` (git-ignored). Without Chromium or Playwright these tests skip with a reason;
with ``KVLAB_REQUIRE_BROWSER=1`` (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kvlab import lab

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "reports" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps"]
RUN_TIMEOUT_MS = 600_000  # bound on one run-all (the tour in QUICK mode: ~40 s idle, 211 s on a 2-core machine at load 18)


def chromium_path() -> str | None:
    """$KVLAB_CHROMIUM if set (only it), else the Debian package's /usr/bin/chromium or a chromium on PATH."""
    chosen = os.environ.get("KVLAB_CHROMIUM")
    for candidate in ([chosen] if chosen else ["/usr/bin/chromium", shutil.which("chromium"),
                                               shutil.which("chromium-browser")]):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium():
    """(playwright, browser); skip (or fail under KVLAB_REQUIRE_BROWSER=1) when Chromium or Playwright is missing."""
    reason = None
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "Playwright for Python is not installed (pip install playwright; make setup installs it)"
    if reason is None and exe is None:
        reason = (f"no Chromium at {os.environ.get('KVLAB_CHROMIUM') or '/usr/bin/chromium'} ($KVLAB_CHROMIUM points "
                  "elsewhere): `apt-get install chromium` to run the browser tests")
    if reason is not None:
        if os.environ.get("KVLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"KVLAB_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(f"{reason}; KVLAB_REQUIRE_BROWSER=1 turns this skip into a failure")
    problems = lab.missing()
    if problems:
        pytest.fail("the interactive set-up is incomplete (make setup does it): " + "; ".join(problems))
    manager = sync_playwright().start()
    browser = manager.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    manager.stop()


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """A JupyterLab on a temp copy of notebooks 00 and 10 (QUICK = True): (base url, token, notebooks dir)."""
    base = tmp_path_factory.mktemp("lab")
    notebooks = base / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / "jupytext.toml", notebooks / "jupytext.toml")
    for name in ("00_tour.py", "10_explorer.py"):
        text = (ROOT / "notebooks" / name).read_text()
        quick = text.replace("\nQUICK = False\n", "\nQUICK = True\n", 1)
        assert quick != text, f"{name}: no 'QUICK = False' line in its parameters cell"
        (notebooks / name).write_text(quick)
    env = lab.lab_env()
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("KVLAB_RESULTS_DIR", "results"), ("KVLAB_FIGURES_DIR", "figures"), ("MPLCONFIGDIR", "mpl")):
        env[var] = str(base / sub)
    env.pop("KVLAB_NOTEBOOK", None)  # a live lab: the explorer shows widgets
    env.setdefault("OMP_NUM_THREADS", "1")
    port, _ = lab.pick_port(8888 + secrets.randbelow(1000))
    token = secrets.token_hex(16)
    log = (base / "lab.log").open("w")
    proc = subprocess.Popen(lab.lab_command(notebooks, port, token=token, open_browser=False), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"JupyterLab did not start on port {port}:\n{(base / 'lab.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, token, notebooks
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def shot(page, name: str, selector: str | None = None) -> Path:
    """Screenshot of the page (or of the element ``selector``, scrolled into view) to reports/browser/NAME.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    if selector:
        page.locator(selector).first.screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=True)
    return path


def open_notebook(browser, lab_server, name: str):
    """A page with ``name`` opened by double-click in the file browser, its kernel idle."""
    url, token, _ = lab_server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{url}/lab?token={token}")
    item = page.locator(".jp-DirListing-item", has_text=name)
    item.wait_for()
    item.dblclick()
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.wait_for()  # a notebook, not the text editor
    assert page.locator(".jp-FileEditor:visible").count() == 0
    wait_idle(page)
    return page


def wait_idle(page, timeout: int = 120_000) -> None:
    page.wait_for_function(
        """() => { const s = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
                   const k = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-KernelName');
                   return s && s.getAttribute('data-status') === 'idle' && k && !k.textContent.includes('No Kernel'); }""",
        timeout=timeout)


def run_all(page, timeout: int = RUN_TIMEOUT_MS) -> float:
    """Run > Run All Cells; wait until no cell is queued or running and the kernel is idle. Returns seconds."""
    tic = time.perf_counter()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    page.wait_for_function(
        """() => { const p = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')];
                   const s = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
                   return p.length > 0 && p.every(x => !x.textContent.includes('*')) && s && s.getAttribute('data-status') === 'idle'; }""",
        timeout=timeout, polling=1000)
    return time.perf_counter() - tic


def cell_errors(page) -> list[str]:
    errors = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) [data-mime-type='application/vnd.jupyter.error']")
    return [text[:2000] for text in errors.all_text_contents()]


def test_tour_opens_as_notebook_and_runs(chromium, lab_server):
    page = open_notebook(chromium, lab_server, "00_tour.py")
    kernel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-KernelName").inner_text()
    assert "kvlab" in kernel, f"the tour runs on kernel {kernel!r}, not the kvlab kernel"
    seconds = run_all(page)
    print(f"tour run-all: {seconds:.1f} s")
    assert cell_errors(page) == []
    prompts = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt").all_text_contents()
    assert prompts and all(re.search(r"\[\d+\]", p) for p in prompts), prompts  # every cell ran
    images = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedImage img")
    assert images.count() >= 1
    assert images.first.evaluate("img => img.naturalWidth") > 0
    shot(page, "tour")
    # saving keeps the pair: the .py (committed) stays output-free text, the .ipynb (git-ignored) holds the outputs
    _, _, notebooks = lab_server
    before = (notebooks / "00_tour.py").read_text()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^File$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save Python File$")).click()
    deadline = time.monotonic() + 30
    while not (notebooks / "00_tour.ipynb").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (notebooks / "00_tour.ipynb").exists(), "saving did not write the paired .ipynb"
    after = (notebooks / "00_tour.py").read_text()
    assert after == before, "saving changed the paired .py text"
    page.close()


def _numbers(page) -> tuple[float, float]:
    return float(page.locator(".kvlab-bytes").inner_text()), float(page.locator(".kvlab-ppl").inner_text())


def _wait_answer(page, n: int, timeout: int = 120_000) -> float:
    page.locator(f".kvlab-done[data-n='{n}'], .kvlab-error").first.wait_for(timeout=timeout)
    assert page.locator(".kvlab-error").count() == 0, page.locator(".kvlab-status").inner_text()
    return float(page.locator(".kvlab-seconds").inner_text())


def test_explorer_widgets_change_bytes_and_perplexity(chromium, lab_server):
    page = open_notebook(chromium, lab_server, "10_explorer.py")
    run_all(page)
    assert cell_errors(page) == []
    first = _wait_answer(page, 1)
    bytes_half, ppl_half = _numbers(page)  # pca at 0.5 (the notebook's default selection)
    page.locator(".kvlab-budget select").select_option(label="0.25")
    budget_seconds = _wait_answer(page, 2)
    bytes_quarter, ppl_quarter = _numbers(page)
    assert bytes_quarter < bytes_half - 0.2 and ppl_quarter > ppl_half  # fewer bytes, worse perplexity
    page.locator(".kvlab-method select").select_option(label="h2o")
    method_seconds = _wait_answer(page, 3)
    bytes_h2o, ppl_h2o = _numbers(page)
    assert bytes_h2o == pytest.approx(0.25, abs=0.01) and ppl_h2o != ppl_quarter
    shot(page, "explorer", ".kvlab-explorer")
    # an invalid combination: a readable message, not a traceback
    box = page.locator(".kvlab-options input")
    box.fill("recent_frac=2")
    box.press("Enter")
    error = page.locator(".kvlab-error")
    error.wait_for(timeout=60_000)
    assert "recent_frac must be in [0, 1]" in error.inner_text()
    assert "Traceback" not in page.locator(".kvlab-explorer").inner_text()
    shot(page, "explorer-error", ".kvlab-explorer")
    print(f"explorer answers: first {first:.2f} s, budget change {budget_seconds:.2f} s, method change "
          f"{method_seconds:.2f} s")
    page.close()


def test_quick_report_index_loads(chromium, tmp_path):
    from kvlab.report import build_report

    out = tmp_path / "reports"
    index = build_report(ROOT / "notebooks", out, quick=True, only="01_kv_spectra", figures_dir=out / "figures")
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    images = page.locator("img")
    assert images.count() >= 1
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete && i.naturalWidth])")
    assert all(w for _, w in widths), f"images that did not load: {[s for s, w in widths if not w]}"
    hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
    local = [h for h in hrefs if h.startswith("file://")]
    assert local, "the index links to no local page"
    for href in local:
        path = Path(urllib.request.url2pathname(href.removeprefix("file://").split("#")[0]))
        assert path.exists(), f"broken local link {href}"
    shot(page, "report-index")
    page.close()
