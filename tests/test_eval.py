"""The evaluation harness: batched, deduplicated, protocol-aware, and equal to plain reference computations."""

from __future__ import annotations

import random

import pytest
import torch

from kvlab import methods
from kvlab.eval import (chunk_nll, encode_pair, evaluate, greedy_generate, loglikelihood_tokens, multiple_choice,
                        naive_loglikelihood_tokens, perplexity)
from kvlab.eval.forward import forward, pad_left, positions
from kvlab.models import tiny_model

ARCHS = ["llama", "gpt2", "gemma3"]


class CharTokenizer:
    """A tiny character-level tokenizer over the tiny models' 97-token vocabulary (pad 0, BOS 1, EOS 2).

    "th" is one token, so context/continuation boundaries can merge as with a real BPE tokenizer.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    name_or_path = "char-tokenizer"
    vocab_size = 97

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("th", i):
                ids.append(96)
                i += 2
            else:
                ids.append(3 + ord(text[i]) % 90)
                i += 1
        return ids

    def __call__(self, text, add_special_tokens: bool = False):
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}


def random_pairs(seed: int = 0, n_ctx: int = 7):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_ctx):
        ctx = tuple(rng.randrange(3, 97) for _ in range(rng.randrange(1, 20)))
        for _ in range(rng.randrange(1, 5)):
            pairs.append((ctx, tuple(rng.randrange(3, 97) for _ in range(rng.randrange(1, 9)))))
    rng.shuffle(pairs)
    return pairs


@pytest.fixture(scope="module", params=ARCHS)
def tiny_arch(request):
    return tiny_model(request.param)


# ------------------------------------------------------------------------------------------------------------------
# helpers


def test_positions_left_padding_and_offsets():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert positions(torch.tensor([[0, 1, 1]]), torch.tensor([4])).tolist() == [[3, 4, 5]]  # the pad is masked


def test_left_padded_forward_equals_unpadded(tiny_arch):
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]
    ids, mask = pad_left(seqs)
    for name in ("none", "full"):
        method = methods.get(name)
        with torch.inference_mode(), method.attached(tiny_arch):
            logits = forward(tiny_arch, ids, mask, positions(mask), method.new_cache(tiny_arch))
            alone = tiny_arch(input_ids=torch.tensor([seqs[1]])).logits
        assert not logits.isnan().any()
        torch.testing.assert_close(logits[1, -3:], alone[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# perplexity


def test_ppl_full_equals_none_and_batching_invariant(tiny_arch):
    chunks = torch.randint(3, 97, (5, 40), generator=torch.Generator().manual_seed(0))
    ref = chunk_nll(tiny_arch, methods.get("none"), chunks, batch_size=5, progress=False)
    assert not ref.isnan().any()
    for name, batch in (("full", 5), ("full", 1), ("none", 2)):
        got = chunk_nll(tiny_arch, methods.get(name), chunks, batch_size=batch, progress=False)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ppl_context_protocol_with_full_equals_throughout(tiny_arch):
    chunks = torch.randint(3, 97, (3, 30), generator=torch.Generator().manual_seed(1))
    through = chunk_nll(tiny_arch, methods.get("full"), chunks, batch_size=2, progress=False)
    ctx = chunk_nll(tiny_arch, methods.get("full"), chunks, batch_size=2, protocol="context", context_frac=0.4,
                    progress=False)
    assert ctx[:, :11].isnan().all() and not ctx[:, 11:].isnan().any()  # 12 context tokens: targets 12..29 scored
    torch.testing.assert_close(ctx[:, 11:], through[:, 11:], rtol=1e-5, atol=1e-5)


def test_perplexity_result_dict():
    model = tiny_model("llama")
    chunks = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    r = perplexity(model, None, methods.get("full"), chunks, batch_size=3, progress=False)
    assert r["tokens"] == 4 * 15 and r["n_chunks"] == 4 and r["chunk_len"] == 16 and r["protocol"] == "throughout"
    assert r["ppl"] == pytest.approx(torch.tensor(r["nll"]).exp().item())
    assert r["kv_bytes"]["budget"] == pytest.approx(1.0) and r["tokens_forwarded"] == 64
    r = perplexity(model, None, methods.get("full"), chunks, protocol="context", progress=False)
    assert r["tokens"] == 4 * 8 and r["context_len"] == 8
    with pytest.raises(ValueError, match="throughout, context"):
        perplexity(model, None, methods.get("full"), chunks, protocol="nope", progress=False)


# ------------------------------------------------------------------------------------------------------------------
# multiple choice


@pytest.mark.parametrize("protocol", ["throughout", "context"])
def test_dedup_loglikelihoods_equal_naive(tiny_arch, protocol):
    pairs = random_pairs()
    ref = naive_loglikelihood_tokens(tiny_arch, pairs)
    for name in ("none", "full"):
        for batch_tokens in (1, 4096):  # one context per batch, everything in one batch
            got = loglikelihood_tokens(tiny_arch, methods.get(name), pairs, batch_tokens=batch_tokens,
                                       protocol=protocol, progress=False)
            assert [g[0] for g in got] == pytest.approx(ref, abs=1e-4)


def test_dedup_prefills_each_context_once():
    model = tiny_model("llama")
    pairs = random_pairs(seed=3)
    from kvlab.eval import Meter

    meter = Meter()
    loglikelihood_tokens(model, methods.get("full"), pairs, batch_tokens=4096, progress=False, meter=meter)
    unique = {p[0] for p in pairs}
    fed_conts = sum(len(c) - 1 for _, c in pairs)  # the last continuation token is never fed
    assert meter.tokens == sum(len(c) for c in unique) + fed_conts


def test_greedy_flag():
    model = tiny_model("llama")
    ctx = (5, 6, 7)
    with torch.inference_mode():
        ids = list(ctx)
        for _ in range(3):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_cont = tuple(ids[3:])
    other = (greedy_cont[0], (greedy_cont[1] + 1) % 97 or 3, greedy_cont[2])
    got = loglikelihood_tokens(model, methods.get("full"), [(ctx, greedy_cont), (ctx, other)], progress=False)
    assert got[0][1] is True and got[1][1] is False


def test_encode_pair_lm_eval_semantics():
    tok = CharTokenizer()
    # trailing spaces move to the continuation; "th" merges across the boundary in the whole encoding
    ctx, cont = encode_pair(tok, "go t", "he end")
    assert ctx == tuple(tok.encode("go t")) and tok.encode("go the end")[len(ctx):] == list(cont)
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tuple(tok.encode("Answer:")) and cont == tuple(tok.encode(" yes"))
    assert encode_pair(tok, "", "abc") == ((1,), tuple(tok.encode("abc")))


def _items():
    from kvlab.data import MCItem

    return [MCItem("toy", 0, [("The cat sat on", " the mat"), ("The cat sat on", " a hat")], 0),
            MCItem("toy", 1, [("Pick one:", " red"), ("Pick one:", " green"), ("Pick one:", " blue")], 2),
            MCItem("toy", 2, [("Alice went", " home today"), ("Bob went", " home today")], 1),
            MCItem("toy", 3, [("Question: what?\nAnswer:", " this"), ("Question: what?\nAnswer:", " that")], 1)]


def test_multiple_choice_full_equals_none(tiny_arch):
    tok = CharTokenizer()
    results = {name: multiple_choice(tiny_arch, tok, methods.get(name), _items(), progress=False)
               for name in ("none", "full")}
    a, b = results["none"], results["full"]
    assert a["n"] == b["n"] == 4 and a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
    assert a["unique_contexts"] == 5 and a["requests"] == 9
    ll_a = [x for row in a["records"]["loglik"] for x in row]
    ll_b = [x for row in b["records"]["loglik"] for x in row]
    assert ll_a == pytest.approx(ll_b, rel=1e-5)
    # acc / acc_norm from the log-likelihoods, lm-eval's way
    rec = a["records"].iloc[1]
    assert rec["pred"] == max(range(3), key=lambda i: rec["loglik"][i])
    assert rec["bytes"] == [3, 5, 4]


def test_unknown_names_raise_with_allowed_list():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"piqa.*needle, longqa"):
        evaluate(model, CharTokenizer(), methods.get("full"), tasks=["piqa", "nope"], progress=False)
    with pytest.raises(ValueError, match="wiki, c4"):
        evaluate(model, CharTokenizer(), methods.get("full"), ppl=["wikitext"], progress=False)
    with pytest.raises(ValueError, match="allowed: piqa"):
        multiple_choice(model, CharTokenizer(), methods.get("full"), "nope", progress=False)


# ------------------------------------------------------------------------------------------------------------------
# long context


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_loop_equals_hf_generate(arch):
    model = tiny_model(arch)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    prompts = [([5, 6, 7, 8, 9, 10, 11], [12, 13]), ([20, 21], [22, 23, 24])]
    whole = [d + q for d, q in prompts]
    ids, mask = pad_left(whole)
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    expected = []
    for row in ref.tolist():
        out = []
        for t in row:
            out.append(t)
            if t == 2:
                break
        expected.append(out)
    for name in ("none", "full"):
        got = greedy_generate(model, methods.get(name), prompts, setting="query_aware", max_new_tokens=12,
                              stop_ids=[2], batch_size=2, progress=False)
        assert got == expected
    # query-agnostic feeds the same tokens (question after the compression point, padding in the middle)
    got = greedy_generate(model, methods.get("full"), prompts, setting="query_agnostic", max_new_tokens=12,
                          stop_ids=[2], batch_size=2, progress=False)
    assert got == expected


def test_long_context_bad_setting():
    from kvlab.eval import long_context

    with pytest.raises(ValueError, match="query_aware, query_agnostic"):
        long_context(tiny_model("llama"), CharTokenizer(), methods.get("full"), "needle", setting="both")


# ------------------------------------------------------------------------------------------------------------------
# real SmolLM2 (fetched by `make test`): a few items each


@pytest.mark.slow
def test_real_dedup_equals_naive(smollm2):
    from kvlab.data import load_task

    model, tok = smollm2
    items = [it for task in ("piqa", "hellaswag", "winogrande") for it in load_task(task, limit=1, seed=1)]
    pairs = [encode_pair(tok, c, k) for it in items for c, k in it.requests]
    ref = naive_loglikelihood_tokens(model, pairs)
    got = loglikelihood_tokens(model, methods.get("full"), pairs, batch_tokens=1024, progress=False,
                               pad_id=tok.pad_token_id)
    assert [g[0] for g in got] == pytest.approx(ref, abs=1e-4)
    # lm-eval tokenisation: the continuation is what the whole string adds after the context
    ctx, cont = pairs[0]
    c, k = items[0].requests[0]
    assert list(ctx) + list(cont) == tok(c + k, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_real_ppl_full_equals_none_and_evaluate(smollm2):
    model, tok = smollm2
    ppl = {name: perplexity(model, tok, methods.get(name), "wiki", chunk_len=64, n_chunks=2, progress=False)
           for name in ("none", "full")}
    assert ppl["full"]["ppl"] == pytest.approx(ppl["none"]["ppl"], rel=1e-5)
    assert ppl["full"]["tokens"] == 2 * 63 and 3 < ppl["full"]["ppl"] < 200
    r = evaluate(model, tok, methods.get("full"), tasks=["copa"], ppl=["wiki"], limit=2, progress=False,
                 chunk_len=64)
    assert r["method"] == "full" and r["tasks"]["copa"]["n"] == 2 and r["ppl"]["wiki"]["tokens"] == 2 * 63
    assert r["kv_bytes"]["full"] > 0 and r["budget"] >= r["budget_theoretical"] == pytest.approx(1.0)
    import json

    json.dumps(r, allow_nan=False)
