import pytest
import torch

import kvlab
from kvlab.methods.matryoshka import MatryoshkaKV


def test_overridden_keeps_good_options_and_rolls_back_bad_ones():
    method = MatryoshkaKV(budget=0.5, steps=10, lr=1e-3)
    with method.overridden(steps=20, lr=None):
        pass
    assert (method.steps, method.lr) == (20, 1e-3)  # set for good; None leaves a field alone
    with pytest.raises(ValueError, match="bad"):
        with method.overridden(steps=99, lr=5.0):
            raise ValueError("bad option")
    assert (method.steps, method.lr) == (20, 1e-3)


def test_fit_with_a_bad_option_leaves_the_method_as_it_was():
    model = kvlab.tiny_model("llama")
    method = MatryoshkaKV(budget=0.5, steps=3)
    calib = torch.randint(0, 50, (2, 16))
    with pytest.raises(ValueError):
        method.fit(model, calib, steps=5, batch_size=8)  # more rows asked than calib has
    assert (method.steps, method.batch_size) == (3, MatryoshkaKV().batch_size)
