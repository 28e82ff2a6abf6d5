import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in Triton's interpreter on CPU; must precede import triton


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled model (fetched by `make test`): (model, tokenizer)."""
    import kvlab

    return kvlab.load_model("smollm2")


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is much faster than two contending ones.
    A test file opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def tiny(request):
    import kvlab

    return kvlab.tiny_model(request.param)


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Random ids (B, T) left-padded with 0 to the longest length, mask and position ids."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, total - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """A tiny random Llama (2 layers) with the bundled SmolLM2 tokenizer, saved as a model folder: `--model DIR`
    loads it in a second. Skips without the fetched tokenizer."""
    import shutil
    from pathlib import Path

    from kvlab.data.fetch import data_dir
    from kvlab.models import tiny_model

    tokenizer_dir = data_dir() / "models" / "smollm2"
    if not (tokenizer_dir / "tokenizer.json").exists():
        pytest.skip("needs the fetched SmolLM2 tokenizer (kvlab fetch)")
    folder = Path(tmp_path_factory.mktemp("tiny-llama"))
    tiny_model("llama", n_layers=2, vocab_size=49152).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder
