import pytest
import torch

import kvlab
from kvlab.rope import Rotary


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rotate_matches_model_and_unrotate_inverts(arch):
    """Post-RoPE keys from a real forward pass are the model's pre-RoPE keys rotated; unrotate gives them back."""
    model = kvlab.tiny_model(arch)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    cap = kvlab.capture(model, ids, what=("keys", "keys_pre"))
    positions = torch.arange(11)[None].expand(2, -1)
    for layer in cap.keys:
        rot = Rotary.from_model(model, layer)
        assert torch.allclose(rot.rotate(cap.keys_pre[layer], positions), cap.keys[layer], atol=1e-5)
        assert torch.allclose(rot.unrotate(cap.keys[layer], positions), cap.keys_pre[layer], atol=1e-5)


def test_no_rope_model_is_refused():
    with pytest.raises(ValueError, match="no rotary"):
        Rotary.from_model(kvlab.tiny_model("gpt2"), 0)
    with pytest.raises(ValueError, match="out of range"):
        Rotary.from_model(kvlab.tiny_model("llama"), 7)
