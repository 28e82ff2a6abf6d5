"""A cached download or converted model that fails its checksum is detected and fetched (converted) again, with a
message. The real-data test works on a temporary KVLAB_DATA copy: ~/.cache/kvlab is never touched."""

from __future__ import annotations

import hashlib
import sys
import shutil
from pathlib import Path

import pytest

from kvlab import models
import kvlab.data  # noqa: F401

fetch_mod = sys.modules["kvlab.data.fetch"]  # the module (kvlab.data.fetch is also the name of a function)


@pytest.mark.slow
def test_truncated_real_download_is_fetched_again(tmp_path, monkeypatch, capsys):
    """`text` (exllamav3's calibration texts, a 3.8 MB wheel): copy it, cut one file, fetch: pip downloads again."""
    source = Path.home() / ".cache" / "kvlab" / "text"
    if not fetch_mod._stamp_ok(source, fetch_mod.load_manifest()["text"]):
        pytest.skip("needs the fetched `text` artefact")
    data = tmp_path / "kvlab-data"
    shutil.copytree(source, data / "text")  # a copy: the shared cache is never damaged
    monkeypatch.setenv("KVLAB_DATA", str(data))
    wiki = data / "text" / "wiki.utf8"
    want = hashlib.sha256(wiki.read_bytes()).hexdigest()
    wiki.write_bytes(wiki.read_bytes()[: wiki.stat().st_size // 3])
    assert not fetch_mod.is_fetched("text")
    capsys.readouterr()
    assert fetch_mod.fetch(["text"]) == {"text": data / "text"}
    assert "text: wiki.utf8 failed its checksum (corrupt or cut short); fetching it again" in capsys.readouterr().err
    assert hashlib.sha256(wiki.read_bytes()).hexdigest() == want and fetch_mod.is_fetched("text")
    assert not list(data.rglob("*.tmp")) and not list(data.rglob("*.whl"))


def test_converted_model_failing_its_checksum_is_converted_again(tmp_path, monkeypatch, capsys):
    """The GGUF -> safetensors conversion stamps its output; a changed or cut file is converted again."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("KVLAB_DATA", str(tmp_path))
    gguf = tmp_path / "smollm2" / "model.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(fetch_mod, "artifact_path", lambda name: gguf.parent)
    conversions = []

    def fake_convert(source, out):
        conversions.append(source)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.arange(1000.0)}, str(out / "model.safetensors"))
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    folder = models.converted_model_dir("smollm2")
    assert len(conversions) == 1 and (folder / models.CONVERTED_STAMP).is_file()
    assert models.converted_model_dir("smollm2") == folder and len(conversions) == 1  # stamp ok: no work
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-200])  # cut short
    capsys.readouterr()
    models.converted_model_dir("smollm2")
    assert len(conversions) == 2
    assert "failed its checksum (changed since it was converted); converting it again" in capsys.readouterr().err
    (folder / models.CONVERTED_STAMP).unlink()  # converted by an older kvlab: a complete file is accepted
    assert models.converted_model_dir("smollm2") == folder and len(conversions) == 2
    weights.write_bytes(weights.read_bytes()[:-200])
    models.converted_model_dir("smollm2")
    assert len(conversions) == 3 and "not a complete safetensors file" in capsys.readouterr().err
