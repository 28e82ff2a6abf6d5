"""Models: the bundled SmolLM2 (offline, from a PyPI package), any local or hub HF causal LM, and tiny test models.

``ModelSpec`` describes the attention geometry every method needs (layers, query heads, kv heads, head_dim, RoPE,
sliding-window layers) for the supported architectures.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
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

    folder = resolve_model(name_or_path)
    load_spec(folder)  # fail early and clearly on unsupported archs or a broken config
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # corrupt weights, a missing tokenizer, a hub error
        if isinstance(folder, str):
            raise ValueError(f"model {name_or_path!r} is not a bundled model ({', '.join(BUNDLED)}), not a folder, "
                             f"and the hub could not serve it ({type(e).__name__}: {e})") from None
        raise ValueError(f"could not load model {name_or_path!r} from {folder}: {type(e).__name__}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model(name_or_path) -> Path | str:
    """Where model ``name_or_path`` loads from: a bundled name (-> its converted folder), a local Hugging Face model
    folder, or a hub id (returned as is; needs the hub or the local HF cache). ValueError / FileNotFoundError say which
    of the three it is not, and whether the hub is reachable."""
    name = str(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    bundled = ", ".join(BUNDLED)
    if not name or not name.strip():
        raise ValueError(f"no model given: use a bundled model ({bundled}), a local model folder or a hub id 'org/name'")
    if name in BUNDLED:
        return converted_model_dir(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {name!r} is a file, not a Hugging Face model folder (a folder with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        for weights in sorted(path.glob("*.safetensors")):  # a header read each: cheap, and catches a cut download
            _check_safetensors(weights)
        return path
    close = difflib.get_close_matches(name, BUNDLED, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if name.startswith(("/", ".", "~")) or name.endswith("/") or os.sep + os.sep in name or name.count("/") > 1:
        raise FileNotFoundError(f"model folder {name} does not exist (models: a bundled name ({bundled}), a local "
                                f"model folder or a hub id 'org/name'){hint}")
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"model {name!r} is not a bundled model ({bundled}), not a folder, and not a valid hub id "
                         f"'org/name'{hint}")
    if _in_hf_cache(name):
        return name
    unreachable = hub_unreachable()
    if unreachable:
        raise ValueError(f"model {name!r} is not a bundled model ({bundled}), not a folder, and the hub is "
                         f"unreachable ({unreachable}){hint}")
    return name


def _check_safetensors(path: Path) -> None:
    """ValueError unless ``path`` is a safetensors file whose header parses and whose data is all there."""
    import json
    import struct

    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n < 100_000_000 else None
        ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"]
        complete = header is not None and path.stat().st_size >= 8 + n + max(ends, default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        complete = False
    if not complete:
        raise ValueError(f"{path} is not a complete safetensors file (corrupt or cut short): fetch or save the model "
                         "again")


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode set, or no connection within ``timeout`` s), or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    import socket
    import threading

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    result: list = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}: {e}")

    thread = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore the socket timeout
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer from {host} within {timeout:g} s"


def load_spec(folder) -> "ModelSpec":
    """The ModelSpec of the model at ``folder`` (or hub id) from its config; ValueError if unreadable/unsupported."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # a truncated config.json, an unknown model_type, a hub error
        if isinstance(folder, str):
            raise ValueError(f"model {folder!r} is not a bundled model ({', '.join(BUNDLED)}), not a folder, and the "
                             f"hub could not serve it ({type(e).__name__}: {e})") from None
        raise ValueError(f"could not read the model config of {folder}: {type(e).__name__}: {e}") from None
    return ModelSpec.from_config(config)


def converted_model_dir(name: str) -> Path:
    """Folder of the bundled model ``name`` as fp32 safetensors, converting from its GGUF on first use."""
    from .data.fetch import file_lock, artifact_path, data_dir

    out = data_dir() / "models" / name
    if _converted_ok(out, report=False):
        return out
    ggufs = sorted(artifact_path(BUNDLED[name]).rglob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file for {name} under {artifact_path(BUNDLED[name])}, found {ggufs}")
    # One conversion at a time per model: notebooks of a fresh `make report` start together and would each convert.
    with file_lock(f"convert-{name}"):
        if _converted_ok(out, report=True):  # another process converted it while we waited, or it is fine
            return out
        _convert_gguf(ggufs[0], out)
        _write_converted_stamp(out)
    return out


def _converted_ok(out: Path, report: bool) -> bool:
    if not ((out / "model.safetensors").exists() and (out / "tokenizer.json").exists()):
        return False
    problem = _converted_problem(out)
    if problem is not None and report:
        print(f"kvlab: the converted model {out} {problem}; converting it again", file=sys.stderr, flush=True)
    return problem is None


CONVERTED_STAMP = ".kvlab-converted.json"


def _converted_problem(folder: Path) -> str | None:
    """What is wrong with a converted model folder, or None. With a stamp (written by the conversion): size and mtime
    as recorded, else the sha256 must match; without one (converted by an older kvlab): a complete safetensors file."""
    import json

    from .data.fetch import sha256_of

    weights = folder / "model.safetensors"
    try:
        stamp = json.loads((folder / CONVERTED_STAMP).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp is None:
        try:
            _check_safetensors(weights)
        except ValueError:
            return "is not a complete safetensors file (corrupt or cut short)"
        return None
    st = weights.stat()
    if stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns:
        return None
    if stamp.get("size") != st.st_size or sha256_of(weights) != stamp.get("sha256"):
        return "failed its checksum (changed since it was converted)"
    return None


def _write_converted_stamp(folder: Path) -> None:
    import json

    from .atomic import write_text
    from .data.fetch import sha256_of

    weights = folder / "model.safetensors"
    st = weights.stat()
    write_text(folder / CONVERTED_STAMP, json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                      "sha256": sha256_of(weights)}) + "\n")


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
