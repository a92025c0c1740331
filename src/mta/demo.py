"""`mta demo`: the three stages end to end on the embedded model, small enough for a laptop CPU.

Uses the real LaMP-2 users in ../shared/data/lamp when present (else a generated set), builds a small bank
from a few users, personalizes a few held-out ones and compares outputs without and with MTA.

The bank is the demo's own, far smaller than the tuned one (`mta bank build`'s defaults): on a CPU without
fast bf16 one anchor-training example costs ~3 s, so LaMP-2's tuned bank (8 anchors over every user, 3 epochs)
would take an hour; the demo trains DEMO_ANCHORS anchors over DEMO_BANK_USERS users for one epoch.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from mta.bank import build_bank
from mta.config import DEFAULT_EMBEDDER, BankConfig, Decoding, PersonalizeConfig
from mta.data.lamp import User, load_users
from mta.data.synthetic import make_movie_tagging
from mta.generation import generate
from mta.models import load_base, load_embedder
from mta.presets import preset
from mta.stacking import base_of, personalize, save_user
from mta.tasks import get_task, query_prompt


def find_lamp_dir() -> Path | None:
    """../shared/data/lamp beside the checkout (or the working directory)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        d = root.parent / "shared" / "data" / "lamp"
        if (d / "movie_tagging.json").exists():
            return d
    return None


def demo_users(out: Path) -> tuple[list[User], str]:
    lamp = find_lamp_dir()
    if lamp is not None:
        return load_users(lamp / "movie_tagging.json", get_task("LaMP-2")), str(lamp / "movie_tagging.json")
    path = out / "synthetic_movie_tagging.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(make_movie_tagging(num_users=24, items_per_user=10, seed=0)))
    return load_users(path, get_task("LaMP-2")), f"{path} (generated: ../shared/data/lamp not found)"


DEMO_BANK_USERS = 6
DEMO_ANCHORS = 3
DEMO_EPOCHS = 1.0
# Seconds per training example and for the rest (loading, embedding, generating), from `mta demo` on an idle
# 2-core AMD EPYC with AVX2 only (fp32 training; 4 min 3 s with the shared LaMP-2 users): a bank example trains
# every layer, a stacked-LoRA example only the top layers (and, after its first epoch, reuses what the layers below
# made of it).
SECONDS_PER_BANK_EXAMPLE, SECONDS_PER_STACK_EXAMPLE, SECONDS_OTHER = 2.1, 0.7, 60


def demo_bank_config(model_name: str) -> BankConfig:
    """LaMP-2's tuned bank settings with fewer anchors and one epoch: minutes, not an hour, on a CPU."""
    cfg = preset(BankConfig(task="LaMP-2", base_model=model_name), "LaMP-2")
    return replace(cfg, anchors=replace(cfg.anchors, num_clusters=DEMO_ANCHORS), train=replace(cfg.train, epochs=DEMO_EPOCHS))


def estimate_minutes(bank_users: list[User], eval_users: list[User], bank: BankConfig, personalize_cfg: PersonalizeConfig) -> float:
    """A rough wall time on an idle 2-core AVX2 CPU in fp32; a CPU with AVX512-BF16/AMX or a GPU is faster."""
    bank_examples = sum(len(u.profile) for u in bank_users) * bank.train.epochs
    stack_examples = sum(len(u.profile) for u in eval_users) * personalize_cfg.stack.train.epochs
    return (bank_examples * SECONDS_PER_BANK_EXAMPLE + stack_examples * SECONDS_PER_STACK_EXAMPLE + SECONDS_OTHER) / 60


def run_demo(out: Path, model_name: str, num_eval_users: int = 4, device: str | None = None, dtype: str = "auto") -> dict:
    start = time.perf_counter()
    task = get_task("LaMP-2")
    users, source = demo_users(out)
    bank_users, eval_users = users[:-num_eval_users][:DEMO_BANK_USERS], users[-num_eval_users:]
    cfg, personalize_cfg = demo_bank_config(model_name), preset(PersonalizeConfig(), task.id)
    print(f"data: {source}\n{len(bank_users)} bank users, {len(eval_users)} held-out users")
    print(f"plan: a bank of {cfg.anchors.num_clusters} anchors ({cfg.train.epochs:g} epoch over {len(bank_users)} users' histories; "
          f"`mta bank build` trains a larger one), then a rank-{personalize_cfg.stack.rank} stacked LoRA per held-out user; roughly "
          f"{estimate_minutes(bank_users, eval_users, cfg, personalize_cfg):.0f} min on an idle 2-core AVX2 CPU, less with "
          "AVX512-BF16, AMX or a GPU")
    model, tok = load_base(model_name, device, dtype)
    embedder = load_embedder(DEFAULT_EMBEDDER)
    print(f"stage 1: building the Meta-LoRA bank ({cfg.anchors.num_clusters} anchors, each trained on its cluster's pooled histories)")
    bank = build_bank(bank_users, out / "bank", cfg, model, tok, embedder)
    decoding = preset(Decoding(), task.id, "decoding")
    rows, base_preds, mta_preds, golds = [], [], [], []
    for user in eval_users:
        prompts = [query_prompt(task, q.input, user.profile) for q in user.queries]
        model = base_of(model)
        before = generate(model, tok, prompts, task.max_new_tokens, decoding)
        print(f"stages 2+3: personalizing user {user.user_id}")
        model, record = personalize(bank, user, personalize_cfg, model, tok, embedder)
        size = save_user(out / "users" / user.user_id, model, record, user.profile)
        after = generate(model, tok, prompts, task.max_new_tokens, decoding)
        for q, b, a in zip(user.queries, before, after):
            rows.append((user.user_id, q.gold, b, a, ", ".join(f"{i}:{w:.2f}" for i, w in zip(record.fusion.anchor_ids, record.fusion.weights)), size))
        base_preds += before
        mta_preds += after
        golds += [q.gold for q in user.queries]
    base_m, mta_m = task.evaluate(base_preds, golds), task.evaluate(mta_preds, golds)
    print()
    print("| user | gold | base model (+BM25 history) | MTA | anchors:weights | bytes stored |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()
    print("| metric | base | MTA |\n|---|---|---|")
    for k in base_m:
        print(f"| {k} | {base_m[k]:.3f} | {mta_m[k]:.3f} |")
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{len(eval_users)} held-out users, {minutes:.1f} min; bank in {out / 'bank'}, user adapters in {out / 'users'}")
    return {"base": base_m, "mta": mta_m, "minutes": minutes}
