"""`mta demo`: the three stages end to end on the embedded model, small enough for a laptop CPU.

Uses the real LaMP-2 users in ../shared/data/lamp when present (else a generated set), builds a bank
from most users, personalizes a few held-out ones and compares outputs without and with MTA.
"""

from __future__ import annotations

import json
import time
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


def run_demo(out: Path, model_name: str, num_eval_users: int = 4, device: str | None = None, dtype: str = "auto") -> dict:
    start = time.perf_counter()
    task = get_task("LaMP-2")
    users, source = demo_users(out)
    bank_users, eval_users = users[:-num_eval_users][:24], users[-num_eval_users:]  # 24 bank users keep it ~10 min
    print(f"data: {source}\n{len(bank_users)} bank users, {len(eval_users)} held-out users")
    model, tok = load_base(model_name, device, dtype)
    embedder = load_embedder(DEFAULT_EMBEDDER)
    cfg = preset(BankConfig(task=task.id, base_model=model_name), task.id)
    print(f"stage 1: building the Meta-LoRA bank ({cfg.anchors.num_clusters} anchors, each trained on its cluster's pooled histories)")
    bank = build_bank(bank_users, out / "bank", cfg, model, tok, embedder)
    decoding = preset(Decoding(), task.id, "decoding")
    rows, base_preds, mta_preds, golds = [], [], [], []
    for user in eval_users:
        prompts = [query_prompt(task, q.input, user.profile) for q in user.queries]
        model = base_of(model)
        before = generate(model, tok, prompts, task.max_new_tokens, decoding)
        print(f"stages 2+3: personalizing user {user.user_id}")
        model, record = personalize(bank, user, preset(PersonalizeConfig(), task.id), model, tok, embedder)
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
