"""Per-row LoRA batching: one batch of distinct users computes exactly what each user's PEFT model computes alone."""

import pytest
import torch
from conftest import logits

from mta.adapters import LoraWeights
from mta.config import Decoding
from mta.fusion import plan_fusion
from mta.generation import generate
from mta.models import load_base
from mta.serve.batched import LRUCache, PerRowLora, Row, generate_rows
from mta.stacking import UserRecord, load_personalized, save_user, user_adapters, with_adapters
from mta.tasks import get_task, query_prompt
from mta.training import prompt_ids

TASK = get_task("LaMP-2")
INPUTS = ["A clumsy wedding planner starts a prank war", "Detectives chase a killer through the rain",
          "A robot learns to love on a distant planet", "Two friends drive across the country"]


def _random_stack(linears: dict, rank: int, seed: int) -> LoraWeights:
    """A stacked LoRA of visible size (a trained one moves little in the few steps a test affords)."""
    gen = torch.Generator().manual_seed(seed)
    return LoraWeights({n: (torch.randn(rank, m.in_features, generator=gen) * 0.3, torch.randn(m.out_features, rank, generator=gen) * 0.3)
                        for n, m in linears.items()})


@pytest.fixture(scope="module")
def user_dirs(tmp_path_factory, random_bank, tiny_model_dir, users):
    """Three saved users of the random bank: fused + stacked (rank 2), fused + stacked (rank 1), fused only."""
    model, _ = load_base(str(tiny_model_dir), device="cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    out, dirs = tmp_path_factory.mktemp("users"), []
    for i, (direction, stack_rank) in enumerate([([1, 0.2, 0], 2), ([0, 0.3, 1], 1), ([0.5, 1, 0], None)]):
        record = plan_fusion(random_bank, torch.tensor(direction, dtype=torch.float32))
        stacked = _random_stack(linears, stack_rank, seed=i) if stack_rank else None
        model = with_adapters(model, None, stacked) if stacked else model  # save_user writes the model's stacked LoRA
        user = UserRecord(f"user{i}", TASK.id, str(tiny_model_dir), random_bank.fingerprint, record,
                          {"rank": stack_rank} if stacked else None)
        save_user(out / user.user_id, model, user, users[i].profile)
        dirs.append(out / user.user_id)
    return dirs


def _prompts(tok, dirs, users):
    return [prompt_ids(tok, query_prompt(TASK, INPUTS[i], users[i].profile)) for i in range(len(dirs))]


def _row_adapters(lora, bank, dirs):
    """Each user's fused and stacked parts, prepared apart: the rows lay them side by side in rank (as the server does)."""
    out = []
    for d in dirs:
        _, fused, stacked = user_adapters(bank, d)
        out.append(tuple(lora.prepare(p) for p in (fused, stacked) if p is not None))
    return out


def test_batched_logits_match_each_users_peft_model(tiny_model_dir, random_bank, user_dirs, users):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    lora = PerRowLora(model)
    prompts = _prompts(tok, user_dirs, users) + [prompt_ids(tok, INPUTS[3])]
    adapters = _row_adapters(lora, random_bank, user_dirs) + [None]  # last row: the plain base model
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with lora.rows(adapters), torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits

    refs = []
    for i, p in enumerate(prompts):
        ref_model = load_personalized(random_bank, user_dirs[i], load_base(str(tiny_model_dir), device="cpu")[0])[0] \
            if i < len(user_dirs) else load_base(str(tiny_model_dir), device="cpu")[0]
        refs.append(logits(ref_model, torch.tensor([p]))[0])
        torch.testing.assert_close(batched[i, width - len(p):], refs[-1], atol=1e-4, rtol=1e-4)
    last = [r[-1] for r in refs]
    assert all(not torch.allclose(last[i], last[j], atol=1e-2) for i in range(4) for j in range(i)), "rows must differ"
    with torch.no_grad():  # hooks are gone after the block
        torch.testing.assert_close(model(input_ids=torch.tensor([prompts[3]])).logits[0], refs[3])


def test_batched_generation_equals_sequential_generation(tiny_model_dir, random_bank, user_dirs, users):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    lora = PerRowLora(model)
    prompts = _prompts(tok, user_dirs, users)
    adapters = _row_adapters(lora, random_bank, user_dirs)
    # the same users twice in one batch, in another order, with other budgets: rows must not leak into each other
    order = [0, 1, 2, 2, 0, 1]
    budgets = [12, 12, 12, 5, 7, 1]
    outs = generate_rows(lora, [Row(prompts[u], adapters[u], n) for u, n in zip(order, budgets)], tok.pad_token_id, tok.eos_token_id)

    texts = []
    for i, d in enumerate(user_dirs):
        ref_model, _ = load_personalized(random_bank, d, load_base(str(tiny_model_dir), device="cpu")[0])
        ref_text = generate(ref_model, tok, [query_prompt(TASK, INPUTS[i], users[i].profile)], max_new_tokens=12)[0]
        ref_ids = ref_model.generate(input_ids=torch.tensor([prompts[i]]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompts[i]):].tolist()
        ref_ids = ref_ids[: ref_ids.index(tok.eos_token_id)] if tok.eos_token_id in ref_ids else ref_ids
        for row, (u, n) in enumerate(zip(order, budgets)):
            if u == i:
                assert outs[row].tokens == ref_ids[:n]
        assert tok.decode(outs[order.index(i)].tokens, skip_special_tokens=True).strip() == ref_text
        texts.append(ref_text)
    assert len(set(texts)) > 1, "distinct users should answer differently"


def test_rows_without_adapters_are_the_base_model(tiny_model_dir):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    prompt = prompt_ids(tok, INPUTS[0])
    out = generate_rows(PerRowLora(model), [Row(prompt, None, 6)], tok.pad_token_id, None)[0]
    ref = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None)[0, len(prompt):].tolist()
    assert out.tokens == ref and not out.stopped


def _repeats(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_rule_is_the_same_in_both_decoders(tiny_model_dir):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    rows = [Row(prompt_ids(tok, x), None, 16) for x in INPUTS]
    plain = generate_rows(PerRowLora(model), rows, tok.pad_token_id, tok.eos_token_id)
    assert any(_repeats(o.tokens, 2) for o in plain), "the random model should loop, or the rule has nothing to do"
    outs = generate_rows(PerRowLora(model), rows, tok.pad_token_id, tok.eos_token_id, Decoding(no_repeat_ngram=2))
    assert not any(_repeats(o.tokens, 2) for o in outs)
    texts = generate(model, tok, INPUTS, 16, Decoding(no_repeat_ngram=2))
    assert texts == [tok.decode(o.tokens, skip_special_tokens=True).strip() for o in outs]


def test_lru_cache_counts_and_evicts():
    cache, built = LRUCache(capacity=2), []
    build = lambda k: lambda: built.append(k) or k.upper()  # noqa: E731
    assert cache.get("a", build("a")) == "A" and cache.get("b", build("b")) == "B"
    assert cache.get("a", build("a")) == "A"  # hit; "b" is now least recent
    cache.get("c", build("c"))
    cache.get("b", build("b"))
    assert built == ["a", "b", "c", "b"] and (cache.hits, cache.misses) == (1, 4) and len(cache) == 2
