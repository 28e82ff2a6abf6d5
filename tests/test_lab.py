"""The interactive set-up without a browser: dependencies, kernel, JupyterLab settings, ports, explorer input."""

import json
import re
import socket
import sys
import tomllib
from pathlib import Path

import pytest

from kvlab import explorer, lab
from kvlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
INTERACTIVE = ("jupyterlab", "ipykernel", "ipywidgets", "jupytext")
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {m.group(1).lower(): m.group(2).replace(" ", "") for m in map(_REQ.match, reqs)}


def _conda_requirements() -> dict[str, str]:
    """Top-level conda packages of environment.yml (not python, pip or the pip: block)."""
    found, block = {}, None
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if re.match(r"^\S", line):
            block = line.split(":")[0]
            continue
        item = re.match(r"^  - ([^:#]+?)\s*$", line)
        if block == "dependencies" and item:
            m = _REQ.match(item.group(1))
            if m.group(1) not in ("python", "pip"):
                found[m.group(1).lower()] = m.group(2).replace(" ", "")
    return found


def test_environment_yml_agrees_with_pyproject():
    pip, conda = _pyproject_requirements(), _conda_requirements()
    for name in INTERACTIVE:
        assert name in pip, f"{name} missing from pyproject.toml dependencies"
        assert name in conda, f"{name} missing from environment.yml dependencies"
    for name, spec in conda.items():
        assert pip.get(name) == spec, f"environment.yml pins {name}{spec}, pyproject.toml {name}{pip.get(name)}"
    assert "playwright" in pip  # the browser tests' driver (dev extra)
    assert "- -e .[dev" in (ROOT / "environment.yml").read_text()  # the project itself, with its dev extra


def test_settings_name_real_jupyterlab_settings():
    """Every plugin and key of the repo's overrides exists in the installed JupyterLab's schemas, and the .py
    viewer is jupytext's notebook factory."""
    overrides = json.loads(lab.settings_source().read_text())
    schemas = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"
    for plugin, values in overrides.items():
        package, name = plugin.split(":")
        schema = json.loads((schemas / package / f"{name}.json").read_text())
        assert set(values) <= set(schema["properties"]), (plugin, set(values) - set(schema["properties"]))
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["python"] == "Jupytext Notebook"
    jupytext_ext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "jupyterlab-jupytext" / "static"
    assert any("Jupytext Notebook" in p.read_text(errors="ignore") for p in jupytext_ext.glob("*.js"))


def test_install_registers_kernel_and_settings(tmp_path):
    paths = lab.install(prefix=tmp_path)
    spec = json.loads((paths["kernel"] / "kernel.json").read_text())
    assert paths["kernel"] == tmp_path / "share" / "jupyter" / "kernels" / "kvlab"
    assert Path(spec["argv"][0]).samefile(sys.executable) and spec["language"] == "python"
    assert paths["settings"].read_text() == lab.settings_source().read_text()
    assert lab.missing(prefix=tmp_path) == []
    paths["settings"].unlink()
    assert any("settings are not installed" in p for p in lab.missing(prefix=tmp_path))


def test_jupytext_pairs_py_with_ipynb_and_keeps_py_clean():
    # in notebooks/: JupyterLab (root notebooks/) finds a jupytext config only inside the folder it serves
    config = tomllib.loads((ROOT / "notebooks" / "jupytext.toml").read_text())
    assert config["formats"] == "ipynb,py:percent"
    assert config["notebook_metadata_filter"] == "-all"  # no kernelspec / outputs in the committed .py
    assert "notebooks/*.ipynb" in (ROOT / ".gitignore").read_text().split()


def test_busy_port_is_replaced_and_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        port, message = lab.pick_port(busy)
        assert port != busy and lab.port_free(port)
        assert f"port {busy} is in use" in message and f"starting on port {port}" in message
    assert lab.pick_port(port) == (port, None)


def test_lab_command_uses_this_interpreter_and_kernel(tmp_path):
    argv = lab.lab_command(tmp_path, 9999, token="t", open_browser=False)
    assert argv[:3] == [sys.executable, "-m", "jupyterlab"]
    assert "--ServerApp.port=9999" in argv and "--ServerApp.port_retries=0" in argv
    assert "--MappingKernelManager.default_kernel_name=kvlab" in argv and "--no-browser" in argv
    assert lab.lab_env({"PYTHONPATH": "/x"})["PYTHONPATH"].split(":") == [str(lab.repo_root()), "/x"]


@pytest.mark.parametrize("port", ["0", "70000"])
def test_cli_lab_bad_port_exits_2(port, capsys):
    assert main(["lab", "--port", port, "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "65535" in err and "Traceback" not in err


def test_explorer_options_and_unfetched_model(tmp_path, monkeypatch):
    assert explorer.parse_options("sinks=0, recent_frac=0.25, weighting=null") == {
        "sinks": 0, "recent_frac": 0.25, "weighting": None}
    with pytest.raises(ValueError, match="key=value"):
        explorer.parse_options("sinks")
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path))  # an empty data folder: nothing fetched
    with pytest.raises(FileNotFoundError, match=r"run `kvlab fetch gemma3-270m`"):
        explorer.check_fetched("gemma3-270m")
    with pytest.raises(FileNotFoundError, match=r"kvlab fetch smollm2"):
        explorer.Explorer("smollm2").load()
    with pytest.raises(ValueError, match="unknown bundled model"):
        explorer.check_fetched("llama-7b")
