"""Run the notebooks, collect what they write, and build the HTML report.

Two halves, both light to import (the Jupyter machinery is imported only when a notebook is run):

Inside a notebook
    ``save_results(dict)`` writes the notebook's key numbers to ``<results dir>/<notebook>.json``;
    ``kvlab.plotting.savefig`` writes figures to ``<figures dir>/<notebook>/<name>.png|pdf``.
    Where those are is decided by :func:`notebook_name`, :func:`results_dir` and :func:`figures_dir`:

    ================  ===========================  ==========================================
    what              set by the runner             default when run by hand in Jupyter
    ================  ===========================  ==========================================
    notebook name     ``KVLAB_NOTEBOOK``           ``notebook=`` argument, else the Jupyter
                                                   session's file name (``JPY_SESSION_NAME``)
    results dir       ``KVLAB_RESULTS_DIR``        ``<repo root>/reports/results``
    figures dir       ``KVLAB_FIGURES_DIR``        ``<repo root>/figures``
    ================  ===========================  ==========================================

    The repo root is the parent of the ``kvlab`` package directory if it holds a ``pyproject.toml``
    (a source checkout), otherwise the current directory.

Outside
    :func:`run_notebook` executes one py:percent notebook (with ``QUICK`` injected after its
    ``parameters`` cell) in a kernel running this very interpreter and writes ``.ipynb`` + ``.html``;
    :func:`build_report` runs every ``notebooks/NN_*.py`` and writes ``reports/index.html`` and
    ``reports/summary.json``.

Running the report in parallel
    :func:`build_report` runs ``jobs`` notebooks at a time (default :func:`default_jobs`, i.e.
    ``min(2, cpu count)``), each in its own kernel process driven from a worker thread. Every kernel
    gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ... set to
    ``cpu count // workers`` (torch takes its intra-op thread count from ``OMP_NUM_THREADS`` at
    import), so the kernels do not oversubscribe the cores. When ``<out_dir>/summary.json`` of a
    previous run in the same mode (else ``notebooks/expected_seconds.json``, committed from a measured full
    report) holds per-notebook seconds, the longest notebooks start first (notebooks it does not
    know start before all others); otherwise they start in name order.

    Dependencies: a notebook that reads other notebooks' results tags its parameters cell
    ``run-after-others``::

        # %% tags=["parameters", "run-after-others"]

    Such notebooks start only after every untagged notebook has finished (ok or failed); they may
    run in parallel with each other (see :func:`runs_after_others`).

The index page
    ``reports/index.html`` shows the environment (versions, machine, git commit, date), the jobs, the
    wall-clock time of the whole report and the sum of notebook times, and one card per notebook
    (title, status, seconds, quick/full, link to its HTML, key figure, headline numbers). If a
    results JSON holds ``"tables"`` -- a list of ``{"title", "caption", "columns", "rows"}`` -- each
    table is rendered (escaped) in a "Paper tables" section under that notebook's heading.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import functools
import html
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import atomic

if TYPE_CHECKING:  # heavy imports only for type checkers
    from nbformat import NotebookNode

__all__ = [
    "ENV_FIGURES_DIR",
    "ENV_NOTEBOOK",
    "ENV_RESULTS_DIR",
    "NotebookFormatError",
    "NotebookRun",
    "ReportError",
    "build_report",
    "default_jobs",
    "discover_notebooks",
    "environment_info",
    "figures_dir",
    "inject_parameters",
    "load_results",
    "notebook_name",
    "read_notebook",
    "repo_root",
    "results_dir",
    "run_notebook",
    "runs_after_others",
    "save_results",
]

ENV_NOTEBOOK = "KVLAB_NOTEBOOK"
ENV_RESULTS_DIR = "KVLAB_RESULTS_DIR"
ENV_FIGURES_DIR = "KVLAB_FIGURES_DIR"
NOTEBOOK_GLOB = "[0-9][0-9]_*.py"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
AFTER_OTHERS_TAG = "run-after-others"  # on the parameters cell: start after all untagged notebooks
# thread-pool sizes the kernel's numeric libraries read at import (torch: OMP_NUM_THREADS)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
KERNEL_NAME = "python3"
DEFAULT_CELL_TIMEOUT = 3600  # seconds per cell; full-mode training cells on a 2-core CPU are slow

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------------------------
# Where things go (used inside notebooks)
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The source checkout holding the ``kvlab`` package, else the current directory."""
    candidate = Path(__file__).resolve().parent.parent
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits, '_', '-', '.' (no path separators), "
            "e.g. '01_kv_spectra'"
        )
    return name


def notebook_name(notebook: str | None = None) -> str:
    """The running notebook's stem, e.g. ``"01_kv_spectra"``.

    Order: ``$KVLAB_NOTEBOOK`` (set by the runner, so outputs land where it looks for them), the
    ``notebook`` argument, then the file of the Jupyter session (``$JPY_SESSION_NAME``, set by
    Jupyter Server >= 2). Raises ``ValueError`` if none is available.
    """
    env_name = os.environ.get(ENV_NOTEBOOK)
    if env_name:
        return check_name(env_name, f"${ENV_NOTEBOOK}")
    if notebook is not None:
        return check_name(Path(notebook).stem if notebook.endswith((".py", ".ipynb")) else notebook,
                           "notebook name")
    session = os.environ.get("JPY_SESSION_NAME")
    if session:
        return check_name(Path(session).stem, "Jupyter session notebook name")
    raise ValueError(
        f"cannot tell which notebook is running: ${ENV_NOTEBOOK} is unset and no notebook= was given; "
        "pass e.g. notebook='01_kv_spectra'"
    )


def _dir_from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def results_dir() -> Path:
    """Where results JSON files go: ``$KVLAB_RESULTS_DIR`` or ``<repo root>/reports/results``."""
    return _dir_from_env(ENV_RESULTS_DIR, repo_root() / "reports" / "results")


def figures_dir() -> Path:
    """Where figures go (one sub-folder per notebook): ``$KVLAB_FIGURES_DIR`` or ``<repo root>/figures``."""
    return _dir_from_env(ENV_FIGURES_DIR, repo_root() / "figures")


# aliases for functions whose arguments are also called results_dir / figures_dir
_current_results_dir = results_dir
_current_figures_dir = figures_dir


def _to_jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback for numpy / torch values, paths, dataclasses and sets."""
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "detach"):  # torch.Tensor
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"save_results cannot store a {type(obj).__name__}: {obj!r:.80}")


def _portable_figure_path(value: Any) -> Any:
    """Store a figure path relative to the figures dir's parent (``figures/<nb>/x.png``) when possible."""
    if not isinstance(value, (str, Path)):
        return value
    path = Path(value)
    if path.is_absolute():
        base = figures_dir().parent
        try:
            return path.resolve().relative_to(base).as_posix()
        except ValueError:
            return str(path)
    return path.as_posix()


def save_results(results: Mapping[str, Any], *, notebook: str | None = None) -> Path:
    """Write a notebook's key numbers to ``<results dir>/<notebook>.json`` and return that path.

    Values may be plain Python, numpy or torch values, paths or dataclasses. An optional
    ``"key_figure"`` entry (e.g. the path :func:`kvlab.plotting.savefig` returned) names the figure the
    report shows for this notebook.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"save_results needs a mapping of names to values, got {type(results).__name__}")
    data = dict(results)
    if "key_figure" in data:
        data["key_figure"] = _portable_figure_path(data["key_figure"])
    text = json.dumps(data, indent=2, default=_to_jsonable)
    path = results_dir() / f"{notebook_name(notebook)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text + "\n")  # a per-process temp name: parallel notebooks never share one
    return path


def load_results(notebook: str, *, results_dir: str | Path | None = None) -> dict[str, Any]:
    """Read back what :func:`save_results` wrote for ``notebook`` (default: the current results dir)."""
    base = Path(results_dir) if results_dir is not None else _current_results_dir()
    path = base / f"{check_name(notebook, 'notebook name')}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results for notebook {notebook!r}: {path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Reading notebooks and injecting parameters
# --------------------------------------------------------------------------------------------


class NotebookFormatError(ValueError):
    """The notebook does not follow the kvlab conventions (e.g. no ``parameters`` cell)."""


class ReportError(RuntimeError):
    """Raised by :func:`build_report` after the index is written, when some notebooks failed."""

    def __init__(self, failed: list[NotebookRun], index: Path) -> None:
        self.failed = failed
        self.index = index
        lines = [f"{len(failed)} notebook(s) failed (report: {index}):"]
        lines += [f"  {run.name}: {run.error}" for run in failed]
        super().__init__("\n".join(lines))


def read_notebook(path: str | Path) -> NotebookNode:
    """Read a py:percent (or .ipynb) notebook with jupytext."""
    import jupytext

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    return jupytext.read(path)


def _parameters_cell_index(nb: NotebookNode) -> int:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return index
    raise NotebookFormatError(
        "no code cell tagged 'parameters': start the first code cell with "
        "'# %% tags=[\"parameters\"]' and define QUICK = False in it"
    )


def _assigned_names(source: str) -> set[str]:
    """Top-level names a cell assigns (``x = ...``, ``x: int = ...``, ``a, b = ...``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise NotebookFormatError(f"the parameters cell is not valid Python: {exc}") from exc
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _literal_source(name: str, value: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"parameter name {name!r} is not a Python identifier")
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise TypeError(
            f"parameter {name}={value!r:.60} cannot be injected: use Python literals "
            "(bool, int, float, str, None, and lists/tuples/dicts of them)"
        )
    return f"{name} = {text}"


def inject_parameters(nb: NotebookNode, parameters: Mapping[str, Any]) -> NotebookNode:
    """Insert an ``injected-parameters`` cell right after the ``parameters`` cell (papermill style).

    Every overridden name must be assigned in the ``parameters`` cell, so a typo fails loudly.
    Raises :class:`NotebookFormatError` for notebook problems, ``TypeError``/``ValueError`` for bad
    parameters. Modifies ``nb`` in place and returns it.
    """
    import nbformat

    index = _parameters_cell_index(nb)
    lines = [_literal_source(name, value) for name, value in parameters.items()]
    known = _assigned_names(nb.cells[index].source)
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise NotebookFormatError(
            f"parameter(s) {', '.join(unknown)} not defined in the parameters cell; "
            f"it defines: {', '.join(sorted(known)) or 'nothing'}"
        )
    source = "# Parameters injected by kvlab.report.run_notebook\n" + "\n".join(lines)
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    nb.cells.insert(index + 1, cell)
    return nb


def _notebook_title(nb: NotebookNode, default: str) -> str:
    """The first Markdown heading of the notebook, else ``default``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip() or default
    return default


# --------------------------------------------------------------------------------------------
# Executing one notebook
# --------------------------------------------------------------------------------------------


@dataclass
class NotebookRun:
    """The outcome of :func:`run_notebook`. Paths are absolute; ``None`` when not produced."""

    name: str
    source: Path
    title: str
    quick: bool
    ok: bool
    seconds: float
    html: Path | None = None
    ipynb: Path | None = None
    results: Path | None = None
    key_figure: Path | None = None
    error: str | None = None  # one line: where and what
    traceback: str | None = None  # full text, ANSI colours stripped
    kernel_python: str | None = None
    threads: int | None = None  # OMP_NUM_THREADS etc. given to the kernel (None: inherited)
    started: float | None = None  # time.time() when the run began

    def load_results(self) -> dict[str, Any]:
        """The notebook's results JSON as a dict (raises if it wrote none)."""
        if self.results is None:
            raise FileNotFoundError(f"notebook {self.name} wrote no results ({self.error or 'ok run'})")
        return json.loads(self.results.read_text(encoding="utf-8"))


class KernelMismatchError(RuntimeError):
    """The kernel is not running the interpreter that runs the report."""


@functools.cache
def _client_class() -> type:
    """A NotebookClient whose kernel is ipykernel in *this* interpreter, checked at start-up.

    The kernel spec is built from ``ipykernel.kernelspec.get_kernel_dict()`` (argv =
    ``[sys.executable, "-m", "ipykernel_launcher", ...]``) instead of being looked up by name, so
    no user-level or system ``python3`` kernelspec can point the notebooks at another Python.
    """
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.util import ensure_async
    import zmq

    class CurrentPythonKernelSpecManager(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(resource_dir=RESOURCES, name=kernel_name, **get_kernel_dict())

    class KvlabNotebookClient(NotebookClient):
        kernel_python: str | None = None

        def create_kernel_manager(self) -> AsyncKernelManager:
            self.km = AsyncKernelManager(
                kernel_name=KERNEL_NAME,
                kernel_spec_manager=CurrentPythonKernelSpecManager(),
                # encrypt the local ZMQ channels when pyzmq can (also silences ipykernel's warning)
                transport_encryption="auto" if zmq.has("curve") else "disabled",
                config=self.config,
            )
            return self.km

        async def async_start_new_kernel_client(self):  # type: ignore[override]
            kc = await super().async_start_new_kernel_client()
            msg_id = await ensure_async(kc.execute(
                "", silent=True, store_history=False,
                user_expressions={"prefix": "__import__('sys').prefix",
                                  "executable": "__import__('sys').executable"}))
            reply = await self.async_wait_for_reply(msg_id)
            found = {key: ast.literal_eval(value["data"]["text/plain"])
                     for key, value in reply["content"]["user_expressions"].items()}
            self.kernel_python = found["executable"]
            if os.path.realpath(found["prefix"]) != os.path.realpath(sys.prefix):
                await self._async_cleanup_kernel()
                raise KernelMismatchError(
                    f"kernel runs {found['executable']} (prefix {found['prefix']}), "
                    f"expected this interpreter {sys.executable} (prefix {sys.prefix})")
            return kc

    return KvlabNotebookClient


def _kernel_env(name: str, results: Path, figures: Path, threads: int | None = None) -> dict[str, str]:
    """This process's environment plus the kvlab output variables for the kernel.

    ``threads`` (if given) sets :data:`THREAD_ENV_VARS`; torch reads ``OMP_NUM_THREADS`` when it is
    imported and uses it for ``torch.get_num_threads()``.
    """
    env = dict(os.environ)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        env.update(dict.fromkeys(THREAD_ENV_VARS, str(threads)))
    env.pop("MPLBACKEND", None)  # let ipykernel use its inline backend so figures appear in the HTML
    env[ENV_NOTEBOOK] = name
    env[ENV_RESULTS_DIR] = str(results)
    env[ENV_FIGURES_DIR] = str(figures)
    package_parent = str(Path(__file__).resolve().parent.parent)  # the kernel imports this kvlab
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence debugpy's frozen-modules warning
    return env


def _describe_failure(exc: BaseException, nb: NotebookNode) -> tuple[str, str]:
    """(one-line error, full traceback) for an execution failure."""
    from nbclient.exceptions import CellExecutionError

    text = _ANSI_RE.sub("", str(exc)).strip()
    if isinstance(exc, CellExecutionError):
        failed = next((cell for cell in nb.cells if cell.cell_type == "code" and any(
            out.get("output_type") == "error" for out in cell.get("outputs", []))), None)
        where = f"cell In[{failed.execution_count}]: " if failed is not None else ""
        return f"{where}{exc.ename}: {_ANSI_RE.sub('', exc.evalue)}", text
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}", text


def _write_outputs(nb: NotebookNode, out_dir: Path, name: str, title: str,
                   banner: str | None) -> tuple[Path, Path]:
    """Write the executed notebook and its HTML rendering; return (ipynb, html)."""
    import copy

    import nbformat
    from nbconvert import HTMLExporter

    ipynb = out_dir / f"{name}.ipynb"
    nbformat.write(nb, ipynb)
    shown = copy.deepcopy(nb)
    if banner:
        shown.cells.insert(0, nbformat.v4.new_markdown_cell(banner))
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(
        shown, resources={"metadata": {"name": title}})
    page = out_dir / f"{name}.html"
    atomic.write_text(page, body)
    return ipynb, page


def _resolve_key_figure(value: Any, figures: Path, name: str) -> Path | None:
    """Find the file a results JSON's ``key_figure`` names (absolute, or relative to the figures dir)."""
    if not isinstance(value, str) or not value:
        return None
    rel = Path(value)
    if rel.is_absolute():
        return rel if rel.is_file() else None
    candidates = [figures.parent / rel, figures / rel, figures / name / rel]
    candidates += [c.with_suffix(".png") for c in candidates if not c.suffix]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def _find_key_figure(results: Path | None, figures: Path, name: str, since: float) -> Path | None:
    """``key_figure`` from the results JSON, else the first PNG the notebook wrote in this run."""
    if results is not None:
        try:
            value = json.loads(results.read_text(encoding="utf-8")).get("key_figure")
        except (json.JSONDecodeError, AttributeError):
            value = None
        found = _resolve_key_figure(value, figures, name)
        if found is not None:
            return found
    folder = figures / name
    fresh = [p for p in folder.glob("*.png") if p.stat().st_mtime >= since] if folder.is_dir() else []
    return min(fresh, key=lambda p: (p.stat().st_mtime, p.name)).resolve() if fresh else None


def run_notebook(
    path: str | Path,
    *,
    quick: bool,
    out_dir: str | Path,
    parameters: Mapping[str, Any] | None = None,
    timeout: int | None = DEFAULT_CELL_TIMEOUT,
    results_dir: str | Path | None = None,
    figures_dir: str | Path | None = None,
    banner: str | None = None,
    threads: int | None = None,
) -> NotebookRun:
    """Execute one notebook and write ``<out_dir>/<name>.ipynb`` and ``<out_dir>/<name>.html``.

    ``QUICK = quick`` and any ``parameters`` overrides are injected in a cell right after the
    notebook's ``parameters`` cell. The kernel is ipykernel in this interpreter (checked), started in
    the notebook's folder with ``KVLAB_NOTEBOOK``/``KVLAB_RESULTS_DIR``/``KVLAB_FIGURES_DIR`` set;
    results and figures default to ``<out_dir>/results`` and ``<out_dir>/figures`` so a test run
    leaves the repository alone. ``timeout`` is per cell, in seconds (``None``: no limit).
    ``banner`` is Markdown shown on top of the HTML page only. ``threads`` limits the kernel's
    numeric thread pools (see :func:`_kernel_env`; ``None``: inherit this process's environment).
    Safe to call from several threads at once (each call starts its own kernel).

    Never raises for a failing notebook: returns ``ok=False`` with ``error``/``traceback`` and keeps
    the partially executed notebook and its HTML, so the error is visible. Raises for bad arguments
    (missing file, parameters that are not literals).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    out = Path(out_dir).resolve()
    results_base = Path(results_dir).resolve() if results_dir is not None else out / "results"
    figures_base = Path(figures_dir).resolve() if figures_dir is not None else out / "figures"
    for folder in (out, results_base, figures_base):
        folder.mkdir(parents=True, exist_ok=True)
    name = path.stem
    overrides = {"QUICK": bool(quick), **dict(parameters or {})}
    for key, value in overrides.items():
        _literal_source(key, value)  # argument errors raise here, before anything runs
    results_file = results_base / f"{name}.json"
    results_file.unlink(missing_ok=True)  # a failed run must not show a previous run's numbers

    start = time.time()
    run = NotebookRun(name=name, source=path, title=name, quick=bool(quick), ok=False, seconds=0.0,
                      threads=threads, started=start)
    try:
        nb = read_notebook(path)
        run.title = _notebook_title(nb, name)
        inject_parameters(nb, overrides)
    except (NotebookFormatError, SyntaxError, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        run.seconds = time.time() - start
        return run
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}

    client = _client_class()(nb, kernel_name=KERNEL_NAME, timeout=timeout, allow_errors=False,
                             record_timing=True)
    try:
        client.execute(cwd=str(path.parent), env=_kernel_env(name, results_base, figures_base, threads))
        run.ok = True
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        run.error, run.traceback = _describe_failure(exc, nb)
    run.kernel_python = client.kernel_python
    run.seconds = time.time() - start
    run.ipynb, run.html = _write_outputs(nb, out, name, run.title, banner)
    run.results = results_file if results_file.is_file() else None
    run.key_figure = _find_key_figure(run.results, figures_base, name, since=start - 1.0)
    return run


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def discover_notebooks(notebooks_dir: str | Path, only: str | Iterable[str] | None = None) -> list[Path]:
    """The ``NN_*.py`` notebooks of a folder in order, optionally only those ``only`` selects.

    ``only`` holds stems (``"01_kv_spectra"``) or numbers (``"01"``); a string may list several,
    comma-separated. Unknown selectors raise ``ValueError``.
    """
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"notebooks folder not found: {folder.resolve()}")
    paths = sorted(folder.glob(NOTEBOOK_GLOB))
    if only is None:
        return paths
    selectors = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    chosen = []
    for selector in selectors:
        matches = [p for p in paths if p.stem == selector or p.stem.split("_", 1)[0] == selector]
        if not matches:
            raise ValueError(f"no notebook matches {selector!r}; available: "
                             f"{', '.join(p.stem for p in paths) or 'none'}")
        chosen += [p for p in matches if p not in chosen]
    return sorted(chosen)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command(args: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a command, or None if it is missing or fails."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_commit(root: Path) -> str:
    commit = _command(["git", "rev-parse", "--short=12", "HEAD"], cwd=root)
    if not commit:
        return "unknown (not a git checkout, or no commit yet)"
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return f"{commit} (with uncommitted changes)" if dirty else commit


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "unknown"
    return f"{total / 2**30:.1f} GiB"


def _gpus() -> str:
    listing = _command(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    return "; ".join(listing.splitlines()) if listing else "none"


def environment_info() -> dict[str, str]:
    """Versions and machine facts for the report header (torch is not imported: versions come from
    package metadata, GPUs from ``nvidia-smi``)."""
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "kvlab": _version("kvlab"),
        "git commit": _git_commit(repo_root()),
        "platform": platform.platform(),
        "CPU": f"{os.cpu_count()} x {_cpu_model()}",
        "RAM": _ram(),
        "GPU": _gpus(),
    }


_INDEX_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem;
         color: #222; }
  h1 { margin-bottom: .2rem; }
  .sub { color: #666; margin-top: 0; }
  table.env { border-collapse: collapse; margin: 1rem 0 2rem; }
  table.env th { text-align: left; padding: .15rem 1rem .15rem 0; color: #555; font-weight: 600; }
  table.env td { padding: .15rem 0; font-family: ui-monospace, monospace; font-size: .9rem; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1rem; }
  .card { border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; background: #fff; }
  .card.failed { border-color: #c62828; background: #fff6f6; }
  .card h2 { font-size: 1.05rem; margin: 0 0 .3rem; }
  .card h2 a { color: inherit; }
  .meta { color: #555; font-size: .9rem; margin-bottom: .5rem; }
  .badge { display: inline-block; padding: 0 .45rem; border-radius: 3px; color: #fff; font-size: .8rem; }
  .badge.ok { background: #2e7d32; } .badge.failed { background: #c62828; }
  .card img { width: 100%; border: 1px solid #eee; }
  .nofig { color: #999; font-style: italic; }
  pre.error { white-space: pre-wrap; font-size: .8rem; background: #fdecea; padding: .5rem; }
  dl.numbers { display: grid; grid-template-columns: auto 1fr; gap: 0 .8rem; font-size: .85rem; }
  dl.numbers dt { color: #555; } dl.numbers dd { margin: 0; font-family: ui-monospace, monospace; }
  section.tables h3 { margin: 1.5rem 0 .5rem; }
  table.paper { border-collapse: collapse; margin: .5rem 0 .3rem; font-size: .9rem; }
  table.paper caption { text-align: left; padding-bottom: .3rem; }
  table.paper th, table.paper td { padding: .2rem .7rem; border-bottom: 1px solid #ddd; text-align: right; }
  table.paper th:first-child, table.paper td:first-child { text-align: left; }
  table.paper thead th { border-bottom: 2px solid #444; }
  p.caption { color: #555; font-size: .85rem; margin: 0 0 1.2rem; max-width: 60rem; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="sub">{{ date }} &middot; mode: <b>{{ mode }}</b> &middot;
  {{ n_ok }}/{{ runs|length }} notebooks ok &middot;
  wall clock {{ "%.0f"|format(wall_seconds) }} s with {{ jobs }} job{{ '' if jobs == 1 else 's' }}
  (notebooks in parallel) &middot; sum of notebook times {{ "%.0f"|format(total_seconds) }} s</p>
<table class="env">
{% for key, value in environment.items() %}  <tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
<div class="grid">
{% for run in runs %}  <div class="card{{ '' if run.ok else ' failed' }}">
    <h2>{% if run.html %}<a href="{{ run.html }}">{{ run.name }}</a>{% else %}{{ run.name }}{% endif %}</h2>
    <div class="meta">{{ run.title }}<br>
      <span class="badge {{ 'ok' if run.ok else 'failed' }}">{{ 'ok' if run.ok else 'FAILED' }}</span>
      {{ "%.1f"|format(run.seconds) }} s &middot; {{ run.mode }}
      {% if run.run_after_others %}&middot; after others{% endif %}
      {% if run.results %}&middot; <a href="{{ run.results }}">results JSON</a>{% endif %}
      {% if run.tables %}&middot; <a href="#tables-{{ run.name }}">tables</a>{% endif %}</div>
    {% if run.error %}<pre class="error">{{ run.error }}</pre>{% endif %}
    {% if run.key_figure %}<a href="{{ run.html or run.key_figure }}"><img src="{{ run.key_figure }}"
      alt="key figure of {{ run.name }}" loading="lazy"></a>
    {% else %}<p class="nofig">no figure</p>{% endif %}
    {% if run.numbers %}<dl class="numbers">
    {% for key, value in run.numbers.items() %}  <dt>{{ key }}</dt><dd>{{ value }}</dd>
    {% endfor %}</dl>{% endif %}
  </div>
{% endfor %}</div>
{% if runs|selectattr("tables")|list %}<h2 id="paper-tables">Paper tables</h2>
{% for run in runs if run.tables %}<section class="tables" id="tables-{{ run.name }}">
  <h3>{% if run.html %}<a href="{{ run.html }}">{{ run.name }}</a>{% else %}{{ run.name }}{% endif %}
    &middot; {{ run.title }}</h3>
{% for table in run.tables %}  <table class="paper">
    <caption><b>{{ table.title }}</b></caption>
    <thead><tr>{% for column in table.columns %}<th>{{ column }}</th>{% endfor %}</tr></thead>
    <tbody>
{% for row in table.rows %}      <tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}    </tbody>
  </table>
  {% if table.caption %}<p class="caption">{{ table.caption }}</p>{% endif %}
  {% if table.error %}<pre class="error">{{ table.error }}</pre>{% endif %}
{% endfor %}</section>
{% endfor %}{% endif %}
</body>
</html>
"""


def _relative(path: Path | None, base: Path) -> str | None:
    """``path`` as a POSIX path relative to ``base`` (for links that work when the folder is opened)."""
    return None if path is None else Path(os.path.relpath(path, base)).as_posix()


def _publish_figure(figure: Path | None, out_dir: Path, name: str) -> Path | None:
    """Copy a key figure into ``<out_dir>/figures/<name>/`` unless it already lives under out_dir."""
    if figure is None:
        return None
    if figure.resolve().is_relative_to(out_dir.resolve()):
        return figure
    target = out_dir / "figures" / name / figure.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(figure, target)
    return target


def _headline_numbers(results: Path | None, limit: int = 8) -> dict[str, str]:
    """Up to ``limit`` top-level scalar entries of a results JSON, formatted for the index."""
    if results is None:
        return {}
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    numbers: dict[str, str] = {}
    for key, value in data.items() if isinstance(data, dict) else []:
        if key == "key_figure" or isinstance(value, (dict, list)) or value is None:
            continue
        numbers[key] = f"{value:.4g}" if isinstance(value, float) else str(value)
        if len(numbers) == limit:
            break
    return numbers


def _table_cell(value: Any) -> str:
    """A table value as text: floats with 4 significant digits (pass strings for exact formatting)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != 0 and not 1e-4 <= abs(value) < 1e15:
            return f"{value:.3e}"
        import numpy as np

        return np.format_float_positional(value, precision=4, unique=False, fractional=False, trim="-")
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _paper_tables(results: Path | None) -> list[dict[str, Any]]:
    """The ``"tables"`` of a results JSON, as ``{"title", "caption", "columns", "rows", "error"}`` with
    every cell as text. Rows may be lists or dicts keyed by column. Problems are noted in ``error``
    (shown on the index) rather than raised."""
    if results is None:
        return []
    try:
        tables = json.loads(results.read_text(encoding="utf-8")).get("tables")
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    if tables is None:
        return []
    if not isinstance(tables, list):
        return [{"title": "tables", "caption": "", "columns": [], "rows": [],
                 "error": f"'tables' must be a list of tables, got {type(tables).__name__}"}]
    shown = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            shown.append({"title": f"table {number}", "caption": "", "columns": [], "rows": [],
                          "error": f"a table must be an object, got {type(table).__name__}"})
            continue
        columns = table.get("columns") or []
        rows = table.get("rows") or []
        problems = []
        if not isinstance(columns, list):
            problems.append(f"'columns' must be a list, got {type(columns).__name__}")
            columns = []
        if not isinstance(rows, list):
            problems.append(f"'rows' must be a list, got {type(rows).__name__}")
            rows = []
        cells = []
        for index, row in enumerate(rows, 1):
            if isinstance(row, dict):
                row = [row.get(column) for column in columns]
            elif not isinstance(row, list):
                row = [row]
            if columns and len(row) != len(columns):
                problems.append(f"row {index} has {len(row)} cells for {len(columns)} columns")
            cells.append([_table_cell(value) for value in row])
        shown.append({"title": _table_cell(table.get("title")) or f"table {number}",
                      "caption": _table_cell(table.get("caption")),
                      "columns": [_table_cell(column) for column in columns], "rows": cells,
                      "error": "; ".join(problems) or None})
    return shown


def _run_record(run: NotebookRun, out_dir: Path) -> dict[str, Any]:
    """A JSON-ready view of a run with paths relative to the report folder."""
    record = dataclasses.asdict(run)
    for key in ("source", "html", "ipynb", "results", "key_figure"):
        record[key] = _relative(getattr(run, key), out_dir)
    record["seconds"] = round(run.seconds, 2)
    return record


def _write_index(out_dir: Path, runs: list[NotebookRun], *, quick: bool, title: str, jobs: int = 1,
                 wall_seconds: float | None = None, started: float | None = None,
                 after_others: Iterable[str] = ()) -> Path:
    """Write ``index.html`` and ``summary.json`` into ``out_dir``; return the index path.

    ``summary.json`` holds the jobs, ``wall_seconds`` (the whole report), ``total_seconds`` (the sum
    of notebook times) and per notebook its ``seconds`` and ``started`` (seconds after the report
    began), which the next report uses to start the longest notebooks first.
    """
    import jinja2

    environment = environment_info()
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mode = "quick" if quick else "full"
    total = sum(r.seconds for r in runs)
    after_others = set(after_others)
    records, tables = [], {}
    for run in runs:
        record = _run_record(run, out_dir)
        record["key_figure"] = _relative(_publish_figure(run.key_figure, out_dir, run.name), out_dir)
        record["numbers"] = _headline_numbers(run.results)
        record["mode"] = "quick" if run.quick else "full"
        record["run_after_others"] = run.name in after_others
        record["started"] = (round(run.started - started, 2)
                             if run.started is not None and started is not None else None)
        records.append(record)
        tables[run.name] = _paper_tables(run.results)
    summary = {
        "title": title, "date": date, "mode": mode, "environment": environment, "jobs": jobs,
        "wall_seconds": round(total if wall_seconds is None else wall_seconds, 2),
        "total_seconds": round(total, 2),
        "ok": all(r.ok for r in runs), "failed": [r.name for r in runs if not r.ok],
        "notebooks": records,
    }
    atomic.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
        _INDEX_TEMPLATE)
    shown_env = {"date": date, **environment}
    page = template.render(title=title, date=date, mode=mode, environment=shown_env, jobs=jobs,
                           runs=[{**record, "tables": tables[record["name"]]} for record in records],
                           n_ok=sum(r.ok for r in runs), total_seconds=summary["total_seconds"],
                           wall_seconds=summary["wall_seconds"])
    index = out_dir / "index.html"
    atomic.write_text(index, page)
    return index


def _banner(name: str, quick: bool) -> str:
    mode = "quick" if quick else "full"
    return f"[&larr; kvlab report index](index.html) &middot; `{html.escape(name)}` &middot; {mode} mode"


def _cpu_count() -> int:
    return os.cpu_count() or 1


def default_jobs() -> int:
    """Notebooks run at a time by default: ``min(2, cpu count)``."""
    return min(2, _cpu_count())


def runs_after_others(path: str | Path) -> bool:
    """True if the notebook's ``parameters`` cell is tagged ``run-after-others``.

    Such a notebook reads other notebooks' results, so :func:`build_report` starts it only after all
    untagged notebooks have finished. A notebook that cannot be read (or has no parameters cell) is
    not tagged; running it reports the problem.
    """
    try:
        nb = read_notebook(path)
        cell = nb.cells[_parameters_cell_index(nb)]
    except (NotebookFormatError, ValueError, SyntaxError, OSError):
        return False
    return AFTER_OTHERS_TAG in cell.get("metadata", {}).get("tags", [])


EXPECTED_SECONDS_FILE = "expected_seconds.json"  # beside the notebooks: {"full": {name: s}, "quick": {...}}


def _previous_seconds(summary: Path, quick: bool) -> dict[str, float]:
    """Per-notebook seconds of the runs made in this mode recorded by a previous report's ``summary.json``
    (empty if none; entries without a mode count)."""
    mode = "quick" if quick else "full"
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
        return {nb["name"]: float(nb["seconds"]) for nb in data["notebooks"] if nb.get("mode", mode) == mode}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _expected_seconds(notebooks_dir: Path, summary: Path, quick: bool) -> dict[str, float]:
    """How long each notebook should take in this mode: the committed ``expected_seconds.json`` beside the
    notebooks (measured by a full report; what a fresh clone schedules by), overridden by the previous
    ``summary.json`` of this output folder."""
    seconds: dict[str, float] = {}
    try:
        committed = json.loads((notebooks_dir / EXPECTED_SECONDS_FILE).read_text(encoding="utf-8"))
        seconds.update({k: float(v) for k, v in committed.get("quick" if quick else "full", {}).items()})
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    seconds.update(_previous_seconds(summary, quick))
    return seconds


def _schedule(paths: Sequence[Path], previous: Mapping[str, float]) -> list[Path]:
    """Start order: longest previous run first, notebooks without a previous time before all of
    them (they may be long); ties and no history at all: name order."""
    return sorted(paths, key=lambda p: (p.stem in previous, -previous.get(p.stem, 0.0), p.stem))


def _run_guarded(path: Path, **kwargs: Any) -> NotebookRun:
    """:func:`run_notebook`, turning an unexpected exception (e.g. while writing the HTML) into a failed
    run so that the other notebooks and the index still get done."""
    start = time.time()
    try:
        return run_notebook(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported on the index and by ReportError
        import traceback

        return NotebookRun(name=path.stem, source=path.resolve(), title=path.stem,
                           quick=bool(kwargs.get("quick")), ok=False, seconds=time.time() - start,
                           error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                           threads=kwargs.get("threads"), started=start)


def _run_batch(paths: list[Path], jobs: int, log: Any, **kwargs: Any) -> list[NotebookRun]:
    """Run ``paths`` (already in start order) with up to ``jobs`` kernels at a time; each kernel gets
    ``cpu count // workers`` threads. ``log(run)`` is called as each one finishes."""
    if not paths:
        return []
    workers = min(jobs, len(paths))
    threads = max(1, _cpu_count() // workers)
    banners = {path: _banner(path.stem, kwargs["quick"]) for path in paths}
    if workers == 1:
        runs = []
        for path in paths:
            runs.append(_run_guarded(path, threads=threads, banner=banners[path], **kwargs))
            log(runs[-1])
        return runs
    _client_class()  # import the Jupyter machinery once, before the worker threads start
    runs = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvlab-report") as pool:
        futures = [pool.submit(_run_guarded, path, threads=threads, banner=banners[path], **kwargs)
                   for path in paths]
        try:
            for future in as_completed(futures):
                runs.append(future.result())
                log(runs[-1])
        except BaseException:  # Ctrl-C: do not start the notebooks still waiting
            for future in futures:
                future.cancel()
            raise
    return runs


def build_report(
    notebooks_dir: str | Path = "notebooks",
    out_dir: str | Path = "reports",
    *,
    quick: bool = False,
    only: str | Iterable[str] | None = None,
    figures_dir: str | Path | None = None,
    timeout: int | None = DEFAULT_CELL_TIMEOUT,
    title: str = "kvlab report",
    jobs: int | None = None,
) -> Path:
    """Run every ``NN_*.py`` notebook and write the report; return ``<out_dir>/index.html``.

    Writes ``<out_dir>/<name>.html`` and ``.ipynb`` per notebook, results to ``<out_dir>/results/``,
    figures to ``figures_dir`` (default: :func:`figures_dir`, i.e. ``$KVLAB_FIGURES_DIR`` or the
    repo's ``figures/``; each key figure is also copied under ``<out_dir>/figures/`` so the report
    folder stands alone), then ``index.html`` and ``summary.json``.

    ``jobs`` notebooks run at a time (default :func:`default_jobs`), longest first according to the
    previous ``summary.json`` of this mode, else ``notebooks/expected_seconds.json``; notebooks tagged
    ``run-after-others`` start after all the others have finished (see the module docstring). Prints one progress line per finished notebook to stderr.
    Raises :class:`ReportError` after writing the index if any notebook failed.
    """
    jobs = default_jobs() if jobs is None else jobs
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    paths = discover_notebooks(notebooks_dir, only)
    if not paths:
        raise FileNotFoundError(f"no notebooks matching {NOTEBOOK_GLOB} in {Path(notebooks_dir).resolve()}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    figures = Path(figures_dir).resolve() if figures_dir is not None else _current_figures_dir()
    order = _schedule(paths, _expected_seconds(Path(notebooks_dir), out / "summary.json", bool(quick)))
    after = [path for path in order if runs_after_others(path)]
    first = [path for path in order if path not in after]

    done = 0

    def log(run: NotebookRun) -> None:
        nonlocal done
        done += 1
        status = "ok" if run.ok else f"FAILED  {run.error}"
        print(f"[{done}/{len(paths)}] {run.name:<32} {run.seconds:7.1f} s  {status}", file=sys.stderr,
              flush=True)

    start = time.time()
    runs = []
    for batch in (first, after):
        runs += _run_batch(batch, jobs, log, quick=quick, out_dir=out, timeout=timeout,
                           results_dir=out / "results", figures_dir=figures)
    wall = time.time() - start
    names = [path.stem for path in paths]
    runs.sort(key=lambda run: names.index(run.name))  # index and ReportError in name order
    index = _write_index(out, runs, quick=quick, title=title, jobs=jobs, wall_seconds=wall,
                         started=start, after_others={p.stem for p in after})
    failed = [run for run in runs if not run.ok]
    if failed:
        raise ReportError(failed, index)
    return index
