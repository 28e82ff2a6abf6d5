"""Models: the bundled SmolLM2 (offline, from a PyPI package), any local or hub HF causal LM, and tiny test models.

``ModelSpec`` describes the attention geometry every method needs (layers, query heads, kv heads, head_dim, RoPE,
sliding-window layers) for the supported architectures.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")
BUNDLED = {"smollm2": "smollm2", "gemma3-270m": "gemma3-270m"}  # name -> fetch artifact


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: bool
    layer_types: tuple[str, ...] = field(default=())  # "full_attention" / "sliding_attention" per layer
    sliding_window: int | None = None
    dtype: str = "float32"

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA ratio)."""
        return self.n_heads // self.n_kv_heads

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "sliding_attention")

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes a full cache holds per token of one sequence (keys and values, all layers)."""
        size = torch.empty((), dtype=dtype or getattr(torch, self.dtype)).element_size()
        return self.n_layers * self.n_kv_heads * self.head_dim * 2 * size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "ModelSpec":
        config = config.get_text_config(decoder=True)
        arch = config.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; kvlab supports {', '.join(SUPPORTED_ARCHS)}")
        dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        if arch == "gpt2":
            return cls(arch, config.n_layer, config.n_head, config.n_head, config.n_embd // config.n_head,
                       config.n_embd, config.vocab_size, rope=False,
                       layer_types=("full_attention",) * config.n_layer, dtype=dtype)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer_types = tuple(getattr(config, "layer_types", None) or ("full_attention",) * config.num_hidden_layers)
        window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
        return cls(arch, config.num_hidden_layers, heads, config.num_key_value_heads or heads, head_dim,
                   config.hidden_size, config.vocab_size, rope=True, layer_types=layer_types,
                   sliding_window=window, dtype=dtype)

    @classmethod
    def from_model(cls, model) -> "ModelSpec":
        spec = cls.from_config(model.config)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        return cls(**{**asdict(spec), "dtype": dtype})


def load_model(name_or_path: str = "smollm2", *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) in eval mode: ``smollm2`` (default) or ``gemma3-270m`` offline, a local HF folder, or a hub id.

    The bundled models come as GGUF in PyPI packages; the first load converts them once to safetensors under the
    data folder (see ``kvlab.data.data_dir``), later loads read that.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in BUNDLED:
        folder = converted_model_dir(name_or_path)
    elif Path(name_or_path).exists():
        folder = Path(name_or_path)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    elif "/" in name_or_path:
        folder = name_or_path  # a hub id: needs internet (or the HF cache)
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {', '.join(BUNDLED)}, a local model folder or a hub id 'org/name'"
        )
    from transformers import AutoConfig

    ModelSpec.from_config(AutoConfig.from_pretrained(folder))  # fail early and clearly on unsupported archs
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def converted_model_dir(name: str) -> Path:
    """Folder of the bundled model ``name`` as fp32 safetensors, converting from its GGUF on first use."""
    from .data.fetch import artifact_path, data_dir

    out = data_dir() / "models" / name
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    ggufs = sorted(artifact_path(BUNDLED[name]).rglob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file for {name} under {artifact_path(BUNDLED[name])}, found {ggufs}")
    _convert_gguf(ggufs[0], out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (4-bit) -> dequantised fp32 safetensors + tokenizer, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    kwargs = dict(gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"kvlab: converted {gguf.name} to safetensors in {time.time() - start:.0f}s -> {out}")


def tiny_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 3, vocab_size: int = 97):
    """A randomly initialised tiny model for tests: ``llama`` (GQA 4 q / 2 kv heads, RoPE), ``gpt2`` (MHA, no RoPE),
    ``gemma3`` (MQA, sliding-window layers). Runs in milliseconds."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=n_layers, n_head=4, n_positions=512)
    elif arch == "gemma3":
        config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=32, sliding_window=8, max_position_embeddings=512,
                                  layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    else:
        raise ValueError(f"unknown tiny model {arch!r}; choose llama, gpt2 or gemma3")
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def context_window(model_or_config) -> int | None:
    """Tokens the model can attend over (``max_position_embeddings``, GPT-2's ``n_positions``); None if unknown."""
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(model_or_config, n_tokens: int, what: str = "the context") -> None:
    """ValueError naming the model's limit when ``n_tokens`` (everything one sequence feeds) exceeds its window."""
    limit = context_window(model_or_config)
    if limit is not None and n_tokens > limit:
        name = getattr(getattr(model_or_config, "config", model_or_config), "_name_or_path", "") or "the model"
        raise ValueError(f"{what} needs {n_tokens} tokens but {name} attends over at most {limit} tokens "
                         f"(max_position_embeddings); ask for at most {limit}")
