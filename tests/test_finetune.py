"""Task fine-tuning (kvlab.fit.finetune): the train/test split is disjoint and deterministic, LoRA steps lower the
training loss and leave the base weights alone, the joint gate variant moves its keep rate toward the target and
evaluates through the normal method/cache path, bad inputs raise clear ValueErrors."""

import pytest
import torch

import kvlab
from kvlab.fit import finetune as ft
from kvlab.data.tasks import MCItem
from kvlab.eval import multiple_choice
from kvlab.methods.attention_gate import AttentionGate


class CharTokenizer:
    """Character-level ids inside the tiny models' 97-token vocabulary (pad 0, BOS 1, EOS 2)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 90 for c in text]


def _items(n: int = 24, seed: int = 0, length: int = 20) -> list[MCItem]:
    """RTE-shaped fake items: a random letter context, choices " T" / " F", gold alternating."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        text = "".join(chr(97 + int(x)) for x in torch.randint(0, 26, (length,), generator=g)) + "\nAnswer:"
        items.append(MCItem("fake", i, [(text, " T"), (text, " F")], i % 2))
    return items


def _base_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_split_is_disjoint_deterministic_and_complete():
    items = _items(25)
    train, test = ft.split_items(items, 12, seed=3)
    assert len(train) == 12 and len(test) == 13
    tr, te = {i.idx for i in train}, {i.idx for i in test}
    assert not tr & te and tr | te == {i.idx for i in items}
    again = ft.split_items(items, 12, seed=3)
    assert [i.idx for i in again[0]] == [i.idx for i in train] and [i.idx for i in again[1]] == [i.idx for i in test]
    other = ft.split_items(items, 12, seed=4)
    assert [i.idx for i in other[0]] != [i.idx for i in train]
    assert [i.idx for i in train] == sorted(tr)  # original order kept


def test_lora_lowers_training_loss_and_keeps_base_weights():
    model, tok = kvlab.tiny_model("llama"), CharTokenizer()
    items = _items(16)
    before = _base_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    encoded = ft.encode_items(tok, items)
    with torch.no_grad():
        loss0 = float(ft.item_loss(model, encoded)[0])
    tuned = ft.finetune(model, tok, items, epochs=4, lr=1e-2, batch_size=4, progress=False)
    assert tuned.steps == 16 and list(tuned.history.columns[:3]) == ["step", "epoch", "loss"]
    with torch.no_grad():
        loss1 = float(ft.item_loss(model, encoded)[0])
    assert loss1 < loss0 - 0.05
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    params = dict(model.named_parameters())
    assert all(not params[n].requires_grad for n in lora)  # frozen again after training
    assert {n.replace(".base_layer", ""): p.requires_grad for n, p in params.items() if "lora_" not in n} == flags
    # base weights untouched while the adapters are active (state_dict keys carry peft's base_layer prefix)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(state) == set(before) and all(torch.equal(state[k], before[k]) for k in before)
    with tuned.disabled(), torch.no_grad():  # adapters off: the base model again
        assert float(ft.item_loss(model, encoded)[0]) == pytest.approx(loss0, abs=1e-6)
    tuned.unload()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_gate_variant_moves_keep_rate_and_evaluates_through_cache():
    model, tok = kvlab.tiny_model("llama"), CharTokenizer()
    items = _items(16, length=30)
    gate = AttentionGate(0.5, local=1, sinks=0).init_gate(model, seed=0)
    original = {k: v.clone() for k, v in gate.gate.tensors().items()}
    before = _base_state(model)
    tuned = ft.finetune(model, tok, items, method=gate, target=0.15, epochs=4, lr=1e-2, gate_lr=5e-2,
                        batch_size=4, progress=False)
    rates = tuned.history["keep_rate"].to_numpy()
    assert abs(rates[-4:].mean() - 0.15) < abs(rates[0] - 0.15) - 0.1
    assert all(torch.equal(gate.gate.tensors()[k], v) for k, v in original.items())  # the given gate is a copy
    assert tuned.method is not gate and tuned.method.train_target == 0.15
    assert tuned.settings["variant"] == "attention_gate+lora" and tuned.settings["rank"] == 8
    # measured keep rate of the fine-tuned gate at inference (threshold rule: what it learned) moved down too
    measured = {}
    for name, method in (("before", gate), ("after", tuned.method)):
        out = multiple_choice(model, tok, method.with_budget(selection="threshold"), items, progress=False)
        measured[name] = out["kv_bytes"]["theoretical_budget"]
    assert measured["after"] < measured["before"] - 0.1
    out = multiple_choice(model, tok, tuned.method.with_budget(0.3), items, progress=False)  # top-k at 0.3
    assert out["n"] == 16 and out["kv_bytes"]["theoretical_budget"] == pytest.approx(0.3, abs=0.06)
    tuned.unload()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_bad_inputs_raise_clear_errors():
    model, tok = kvlab.tiny_model("llama"), CharTokenizer()
    items = _items(8)
    with pytest.raises(ValueError, match="n_train"):
        ft.split_items(items, 8)
    with pytest.raises(ValueError, match="n_train"):
        ft.split_items(items, 0)
    with pytest.raises(ValueError, match="distinct"):
        ft.split_items(items + items[:1], 4)
    bad = [
        (dict(epochs=0), "epochs"), (dict(batch_size=9), "batch_size"), (dict(lr=0.0), "lr"),
        (dict(loss="mse"), "loss"), (dict(rank=0), "rank"), (dict(targets=("nope",)), "targets"),
        (dict(target=0.3), "attention_gate"), (dict(method=kvlab.methods.get("streaming", 0.5)), "method"),
        (dict(method=AttentionGate(0.5)), "no gate"), (dict(max_seconds=0), "max_seconds"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            ft.finetune(model, tok, items, progress=False, **kwargs)
        assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing left behind
    with pytest.raises(ValueError, match="gold"):
        ft.finetune(model, tok, [MCItem("fake", 0, [("a", " b"), ("a", " c")], 5)], batch_size=1, progress=False)
    with pytest.raises(ValueError, match="MCItem"):
        ft.finetune(model, tok, [("a", " b")], batch_size=1, progress=False)
    with pytest.raises(ValueError, match="target"):
        ft.finetune(model, tok, items, method=AttentionGate(0.5).init_gate(model), target=1.5, progress=False)


def test_gold_loss_is_the_gold_continuation_nll_and_rows_are_shared():
    model, tok = kvlab.tiny_model("llama"), CharTokenizer()
    items = [MCItem("fake", 0, [("ab cd", " x"), ("ab cd", " yz")], 1), MCItem("fake", 1, [("q", " T"), ("q", " F")], 0)]
    encoded = ft.encode_items(tok, items)
    assert len(encoded[1].rows) == 1  # single-token choices of one context share one fed row
    with torch.no_grad():
        gold, scores = ft.item_loss(model, encoded, loss="gold")
        choice, _ = ft.item_loss(model, encoded, loss="choice")
        ref = kvlab.eval.naive_loglikelihood_tokens(model, [kvlab.eval.encode_pair(tok, *r) for it in items
                                                             for r in it.requests])
    torch.testing.assert_close(scores.flatten().double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=0)
    n_tokens = len(tok.encode(" yz")) + len(tok.encode(" T"))
    assert float(gold) == pytest.approx(-(ref[1] + ref[2]) / n_tokens, abs=1e-4)
    expected = -(torch.log_softmax(torch.tensor(ref[:2]), 0)[1] + torch.log_softmax(torch.tensor(ref[2:]), 0)[0]) / 2
    assert float(choice) == pytest.approx(float(expected), abs=1e-4)
