"""JupyterLab for kvlab: register the ``kvlab`` kernel, install the repo's JupyterLab defaults, start the lab.

    python -m kvlab.lab setup          # what `make setup` runs: kernel + settings into this environment (idempotent)
    python -m kvlab.lab check          # exit 1 and say what is missing
    kvlab lab [--port 8888] [--no-browser]   # (= make lab) set up if needed, then JupyterLab in notebooks/

The settings file is ``jupyter/overrides.d/kvlab.json`` in the repo (the paired ``.py`` notebooks open with
jupytext's notebook view; the preferred kernel starts without a dialog). It is copied to
``<sys.prefix>/share/jupyter/lab/settings/overrides.d/``, JupyterLab's place for package defaults. The kernel
``kvlab`` runs this very interpreter; the lab is started with this checkout first on ``PYTHONPATH`` so its kernels
import the ``kvlab`` being edited.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

KERNEL_NAME = "kvlab"
KERNEL_DISPLAY_NAME = "Python (kvlab)"
SETTINGS_NAME = "kvlab.json"
DEFAULT_PORT = 8888
REQUIRED_MODULES = ("jupyterlab", "ipykernel", "ipywidgets", "jupytext")


def repo_root() -> Path:
    from .report import repo_root as root

    return root()


def settings_source() -> Path:
    """The repo's JupyterLab defaults (``jupyter/overrides.d/kvlab.json``)."""
    path = repo_root() / "jupyter" / "overrides.d" / SETTINGS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: kvlab lab needs a source checkout of kvlab (git clone)")
    return path


def settings_target(prefix: str | Path | None = None) -> Path:
    """Where JupyterLab reads package defaults: ``<prefix>/share/jupyter/lab/settings/overrides.d/kvlab.json``."""
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / SETTINGS_NAME


def kernel_dir(prefix: str | Path | None = None) -> Path:
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def install(prefix: str | Path | None = None) -> dict[str, Path]:
    """Register the ``kvlab`` kernel (this interpreter) and copy the repo's lab settings under ``prefix``."""
    from ipykernel.kernelspec import install as install_kernel

    prefix = str(prefix or sys.prefix)
    kernel = Path(install_kernel(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, prefix=prefix))
    target = settings_target(prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(settings_source(), target)
    return {"kernel": kernel, "settings": target}


def missing(prefix: str | Path | None = None) -> list[str]:
    """What the interactive set-up lacks in this environment (empty: ready), each with how to fix it."""
    problems = [f"Python package {m!r} is not installed (make setup installs it from pyproject.toml)"
                for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    spec = kernel_dir(prefix) / "kernel.json"
    if not spec.is_file():
        problems.append(f"no '{KERNEL_NAME}' kernel at {spec} (run `python -m kvlab.lab setup`)")
    else:
        argv0 = json.loads(spec.read_text())["argv"][0]
        if not (os.path.isfile(argv0) and os.path.samefile(argv0, sys.executable)):
            problems.append(f"the '{KERNEL_NAME}' kernel runs {argv0}, not {sys.executable} (run `python -m kvlab.lab "
                            "setup` again)")
    target = settings_target(prefix)
    try:
        same = target.is_file() and target.read_text() == settings_source().read_text()
    except FileNotFoundError:
        same = False
    if not same:
        problems.append(f"the repo's JupyterLab settings are not installed at {target} (run `python -m kvlab.lab "
                        "setup`)")
    return problems


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> tuple[int, str | None]:
    """``(port, None)`` if ``port`` is free, else another free port and a message naming the busy one."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if port_free(port, host):
        return port, None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        other = s.getsockname()[1]
    return other, (f"port {port} is in use (free it, e.g. `jupyter server stop {port}` or stop what `ss -ltnp "
                   f"'sport = :{port}'` shows, or pass --port); starting on port {other} instead")


def lab_command(root: str | Path, port: int, *, token: str | None = None, open_browser: bool = True,
                host: str = "127.0.0.1", extra: list[str] | None = None) -> list[str]:
    """The ``jupyter lab`` command line kvlab uses (this interpreter, ``root`` as the file browser's root)."""
    argv = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}", f"--ServerApp.ip={host}",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}"]
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root; Jupyter refuses without this
        argv.append("--allow-root")
    if not open_browser:
        argv.append("--no-browser")
    return argv + list(extra or [])


def lab_env(env: dict | None = None) -> dict[str, str]:
    """``env`` (default: this process') with the checkout first on PYTHONPATH, so kernels import this kvlab."""
    env = dict(os.environ if env is None else env)
    root = str(repo_root())
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return env


def run(port: int = DEFAULT_PORT, open_browser: bool = True, notebooks: str | Path | None = None) -> int:
    """Set up if needed, then run JupyterLab in ``notebooks`` (default: the repo's notebooks/) until it stops."""
    root = Path(notebooks) if notebooks else repo_root() / "notebooks"
    if not root.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {root}")
    chosen, message = pick_port(port)
    if missing():
        lacking = [p for p in missing() if "Python package" in p]
        if lacking:
            raise FileNotFoundError("cannot start JupyterLab: " + "; ".join(lacking))
        for what, path in install().items():
            print(f"kvlab lab: installed {what}: {path}", file=sys.stderr)
    if message:
        print(f"kvlab lab: {message}", file=sys.stderr)
    print(f"kvlab lab: JupyterLab in {root} on http://127.0.0.1:{chosen}/lab (kernel '{KERNEL_NAME}'; Ctrl-C stops "
          "it)", file=sys.stderr)
    argv = lab_command(root, chosen, open_browser=open_browser)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":  # become the lab process: Ctrl-C and kill reach JupyterLab itself
        os.execve(argv[0], argv, lab_env())
    try:
        return subprocess.call(argv, env=lab_env())
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvlab.lab", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("setup", "check", "start"))
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.action == "setup":
            for what, path in install().items():
                print(f"{what}: {path}")
            return 0
        if args.action == "check":
            problems = missing()
            for p in problems:
                print(f"missing: {p}", file=sys.stderr)
            return 1 if problems else 0
        return run(args.port, open_browser=not args.no_browser)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvlab lab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
