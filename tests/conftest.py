import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in Triton's interpreter on CPU; must precede import triton


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled model (fetched by `make test`): (model, tokenizer)."""
    import kvlab

    return kvlab.load_model("smollm2")


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
