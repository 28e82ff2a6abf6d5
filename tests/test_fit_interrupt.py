"""An interrupted fit never leaves a half artefact: the previous one stays intact (kvlab.atomic)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvlab import cli

ROOT = Path(__file__).resolve().parents[1]
FIT = ["fit", "--method", "matryoshka", "--eval-chunks", "0", "--opt", "calib_chunks=2", "--opt", "chunk_len=64",
       "--opt", "train_chunks=4", "--opt", "train_chunk_len=32"]


def artefact_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def previous(tiny_model_folder, tmp_path):
    """A finished matryoshka artefact (2 steps) in tmp/out: {file name: bytes}."""
    out = tmp_path / "out"
    assert cli.main([*FIT, "--model", str(tiny_model_folder), "--out", str(out), "--opt", "steps=2"]) == 0
    files = artefact_files(out)
    assert set(files) == {f"{tiny_model_folder.name}.safetensors", f"{tiny_model_folder.name}.json"}
    return out, files


def test_killed_fit_leaves_the_previous_artefact_intact(previous, tiny_model_folder):
    out, before = previous
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", *FIT, "--model", str(tiny_model_folder), "--out",
                             str(out), "--opt", "steps=100000"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    seen, deadline = b"", time.time() + 240
    try:
        while b"step/s" not in seen and time.time() < deadline:  # training has started (tqdm rate shown)
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        assert b"step/s" in seen, seen[-2000:]
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: the harshest interruption
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert artefact_files(out) == before  # same files, same bytes


def test_interrupt_while_writing_keeps_the_previous_artefact(previous, tiny_model_folder, monkeypatch):
    """The interruption lands inside the tensor write itself: the temp file goes, the old artefact stays."""
    import safetensors.torch

    out, before = previous
    real = safetensors.torch.save_file

    def half_then_interrupt(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*FIT, "--model", str(tiny_model_folder), "--out", str(out), "--opt", "steps=1", "--opt", "seed=1"])
    assert artefact_files(out) == before  # no temp file left, old bytes kept
