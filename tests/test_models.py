import json

import pytest
from transformers import AutoConfig, BertConfig

import kvlab
from kvlab.models import ModelSpec


def test_spec_of_tiny_models():
    llama = ModelSpec.from_model(kvlab.tiny_model("llama"))
    assert (llama.n_heads, llama.n_kv_heads, llama.group_size, llama.rope) == (4, 2, 2, True)
    gpt2 = ModelSpec.from_model(kvlab.tiny_model("gpt2"))
    assert (gpt2.n_kv_heads, gpt2.rope) == (4, False)
    gemma = ModelSpec.from_model(kvlab.tiny_model("gemma3"))
    assert gemma.n_kv_heads == 1 and gemma.sliding_layers == (0, 1) and gemma.sliding_window == 8
    assert json.loads(json.dumps(gemma.to_dict()))["arch"] == "gemma3_text"


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="supports llama, mistral"):
        ModelSpec.from_config(BertConfig())


def test_unknown_model_name():
    with pytest.raises(ValueError, match="smollm2"):
        kvlab.load_model("no-such-model")


def test_local_folder_round_trip(tmp_path):
    model = kvlab.tiny_model("llama")
    model.save_pretrained(tmp_path)
    assert ModelSpec.from_config(AutoConfig.from_pretrained(tmp_path)).n_layers == 3


@pytest.mark.slow
def test_smollm2_spec_and_converted_once(smollm2):
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    assert (spec.arch, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == ("llama", 30, 9, 3, 64)
    assert spec.dtype == "float32"
    folder = kvlab.models.converted_model_dir("smollm2")  # converted once; later loads read safetensors
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.gguf"))


def test_every_submodule_is_reachable_from_the_package():
    """``kvlab.<name>`` works for every module and subpackage (the lazy map names them all)."""
    import pkgutil

    import kvlab

    names = {m.name for m in pkgutil.iter_modules(kvlab.__path__) if not m.name.startswith("_")}
    assert names <= set(kvlab.__all__), f"missing from kvlab's lazy map: {sorted(names - set(kvlab.__all__))}"
    for name in names:
        assert getattr(kvlab, name).__name__ == f"kvlab.{name}"
