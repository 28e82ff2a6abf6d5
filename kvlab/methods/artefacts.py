"""Fitted artefacts of methods (bases, rank sensitivities): safetensors + a JSON provenance record beside them.

A record says what made the tensors (options, command, commit, steps, tokens, metrics) and for which model (a
fingerprint of its geometry and weights), so :func:`find_shipped` can pick the artefact committed under ``data/``
for the model and options at hand, and never hands a user tensors fitted to another model or other options.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from ..atomic import atomic_path

FORMAT_VERSION = 1


def shipped_dir() -> Path:
    """``data/`` of the kvlab checkout: where trained compressors are committed."""
    return Path(__file__).resolve().parents[2] / "data"


@torch.no_grad()
def model_fingerprint(model) -> dict:
    """Geometry and a weight checksum (sum of squares of every parameter, float64, 9 significant digits)."""
    from ..models import ModelSpec

    spec = ModelSpec.from_model(model)
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    return {"arch": spec.arch, "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
            "weights_sq": float(f"{total:.9g}")}


def same_model(a: dict | None, b: dict | None) -> bool:
    if not a or not b or any(a.get(k) != b.get(k) for k in ("arch", "n_layers", "n_kv_heads", "head_dim")):
        return False
    return abs(a["weights_sq"] - b["weights_sq"]) <= 1e-6 * max(abs(a["weights_sq"]), 1.0)


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the repository kvlab runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def jsonable_options(options: dict) -> dict:
    """Options ready for JSON: per-head ranks as lists; tensors and objects holding tensors (a measured
    sensitivity) dropped, since they live in the safetensors file."""
    out = {}
    for key, value in options.items():
        if isinstance(value, torch.Tensor):
            if key.endswith("_ranks"):
                out[key] = value.tolist()
            continue
        if hasattr(value, "tensors"):
            continue
        out[key] = value
    return out


def write(path: str | Path, method_name: str, tensors: dict[str, torch.Tensor], record: dict) -> Path:
    """``path`` (.safetensors) with ``tensors`` (fp32) and ``path.json`` with ``record`` plus versions and time."""
    import sys

    import transformers
    from safetensors.torch import save_file

    from .. import __version__
    from ..eval.run import jsonable

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"method": method_name, "format": FORMAT_VERSION, "tensors": path.name, **record,
              "command": record.get("command", sys.argv), "git_commit": git_commit(),
              "versions": {"kvlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # Both files are written under temporary names and renamed into place only once complete, so an interrupted
    # fit leaves the previous artefact (or none) but never a half-written one.
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items() if v is not None}, str(tmp),
                  metadata={"format": "pt", "method": method_name, "kvlab_format": str(FORMAT_VERSION)})
        with atomic_path(path.with_suffix(".json")) as tmp_json:
            tmp_json.write_text(json.dumps(jsonable(record), indent=1) + "\n")
    return path


def header(path: str | Path) -> dict:
    """The metadata of safetensors file ``path`` (reads only its header); ValueError if it is not a readable
    safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError (corrupt, truncated) is not an OSError
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def read(path: str | Path, method_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, record) of an artefact written by :func:`write` for ``method_name``; clear errors otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{path} must hold exactly one .safetensors artefact, found {len(candidates)}")
        path = candidates[0]
    if not path.exists():
        raise FileNotFoundError(f"no {method_name} artefact at {path}")
    meta = header(path)
    if meta.get("method") != method_name:
        raise ValueError(f"{path} holds an artefact of method {meta.get('method')!r}, not {method_name!r}")
    record_path = path.with_suffix(".json")
    try:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    except ValueError as e:  # truncated or hand-edited record
        raise ValueError(f"the record {record_path} of artefact {path} is not valid JSON ({e})") from None
    try:
        return load_file(str(path)), record
    except Exception as e:  # SafetensorError: a header that reads but data that does not
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_method(cls, path: str | Path, **overrides):
    """A ``cls`` method with the options of artefact ``path``'s record (``overrides`` win) that takes its tensors
    (through ``cls._take``); ``source`` records where they came from."""
    import dataclasses

    tensors, record = read(path, cls.name)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.repr} - {"source"}
    options = {k: v for k, v in record.get("options", {}).items() if k in allowed}
    method = cls(**{**options, **overrides, "source": str(path)})
    method._take(tensors, record, path)
    return method


def adopt_fit_options(method, path, record: dict, keys: tuple[str, ...]) -> dict:
    """Give ``method`` the record's values of its fit options ``keys`` (tensors fitted under other options, e.g. a
    gate trained with local=16 read with local=1, would silently mean something else). An option still at its
    class default takes the record's value; one the user set to a different value is a conflict and raises.
    Returns the options taken, {name: value}."""
    import dataclasses

    have = record.get("options", {})
    defaults = {f.name: f.default for f in dataclasses.fields(method) if f.default is not dataclasses.MISSING}
    taken, conflicts = {}, {}
    for key in keys:
        if key not in have:
            continue
        current = jsonable_options({key: getattr(method, key)})[key]
        if current == have[key]:
            continue
        if key in defaults and current == jsonable_options({key: defaults[key]})[key]:
            taken[key] = have[key]
        else:
            conflicts[key] = (have[key], current)
    if conflicts:
        listed = ", ".join(f"{k}={a!r} (asked: {b!r})" for k, (a, b) in conflicts.items())
        raise ValueError(f"{path} was fitted with {listed}: leave these options out to use the artefact's, or load it "
                         "with <Method>.load(path, **options) to override them on purpose")
    for key, value in taken.items():
        setattr(method, key, value)
    return taken


def find_shipped(method_name: str, model, options: dict, keys: tuple[str, ...]) -> Path | None:
    """The artefact under ``data/<method_name>/`` made for ``model`` with the same values of ``options[keys]``."""
    folder = shipped_dir() / method_name
    if not folder.is_dir():
        return None
    fingerprint = None
    wanted = jsonable_options({k: options[k] for k in keys})
    for record_path in sorted(folder.glob("*.json")):
        record = json.loads(record_path.read_text())
        if any(record.get("options", {}).get(k) != v for k, v in wanted.items()):
            continue
        fingerprint = fingerprint or model_fingerprint(model)
        if same_model(record.get("model"), fingerprint):
            return record_path.with_suffix(".safetensors")
    return None


def fit_command(method_name: str, model, *, search: bool = False) -> str:
    """The ``kvlab fit`` command that makes a shipped artefact of ``method_name`` for ``model`` (named as the CLI
    takes it: a bundled name, else the model's folder)."""
    from ..models import BUNDLED

    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    name = Path(path).name if path else ""
    model_arg = name if name in BUNDLED else (path or "<your model folder>")
    return (f"kvlab fit --model {model_arg} --method {method_name}{' --search' if search else ''} "
            f"--out data/{method_name}")
