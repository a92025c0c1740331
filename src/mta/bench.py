"""`mta bench`: MTA against six baselines on LaMP, quality and cost side by side (issue 3).

One base model is loaded once and every method starts from it (`base_of` strips what the previous
method attached). Methods differ only in how they adapt the model to a user — they are small functions
behind `METHODS`, so they share the prompt template, the BM25 history item, the decoding, the timing
and the scoring. The bank is built from the bank users only (or reused) and never sees an eval user.

Output in the run folder: results.json, results.md, results.png, predictions/<method>.json (LaMP format),
users/<method>/<user>/ (what each method stores to serve the user again), bank/ (unless reused).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from peft import get_peft_model
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from mta.bank import Bank, build_bank
from mta.config import BankConfig, BenchConfig, FusionConfig
from mta.data.lamp import Query, User, load_users, predictions_file
from mta.embedding import profile_embedding
from mta.fusion import merge, plan_fusion
from mta.generation import generate
from mta.io import MTAError, atomic_write_bytes, atomic_write_json
from mta.metrics import LOWER_IS_BETTER
from mta.models import load_base, load_embedder
from mta.stacking import PersonalizeConfig, base_of, personalize, save_user
from mta.tasks import Task, get_task, loo_examples, query_prompt
from mta.training import train


@dataclass
class Run:
    """What every method needs besides the user and the model."""

    cfg: BenchConfig
    task: Task
    tokenizer: object
    embedder: object
    bank: Bank | None
    progress: bool


# adapt(run, base model, user, folder to store the user in) -> (model to answer with, bytes stored for the user)
AdaptFn = Callable[[Run, torch.nn.Module, User, Path], tuple[torch.nn.Module, int]]


@dataclass(frozen=True)
class Method:
    adapt: AdaptFn
    history: bool = True  # the BM25 top history item goes into the prompt
    needs_bank: bool = False


def _unadapted(run: Run, model, user: User, folder: Path) -> tuple[torch.nn.Module, int]:
    return model, 0


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _per_user_lora(run: Run, model, user: User, folder: Path) -> tuple[torch.nn.Module, int]:
    """OPPU-style: a LoRA of the bank's rank trained from scratch on the user's leave-one-out samples."""
    torch.manual_seed(run.cfg.user_lora_train.seed)
    pm = get_peft_model(model, run.cfg.lora.peft_config())
    train(pm, run.tokenizer, loo_examples(run.task, user.profile, run.cfg.num_retrieved), run.cfg.user_lora_train,
          desc=f"per-user LoRA {user.user_id}", progress=run.progress)
    pm.save_pretrained(folder / "adapter")
    return pm, _dir_bytes(folder / "adapter")


def _personalized(settings: Callable[[BenchConfig], PersonalizeConfig]) -> AdaptFn:
    """A method that is `personalize` with its own settings; stores what `save_user` writes."""
    def adapt(run: Run, model, user: User, folder: Path) -> tuple[torch.nn.Module, int]:
        pcfg = settings(run.cfg)
        model, record = personalize(run.bank if pcfg.fusion else None, user, pcfg, model, run.tokenizer, run.embedder,
                                    task=run.task, progress=run.progress)
        return model, save_user(folder, model, record, user.profile)
    return adapt


def _recipe(c: BenchConfig) -> PersonalizeConfig:
    """The published code: top-2 anchors, factor averaging with its α, rank-4 stacking."""
    return PersonalizeConfig(FusionConfig(merge="recipe"), c.recipe_stack, c.num_retrieved)


METHODS: dict[str, Method] = {
    "base": Method(_unadapted, history=False),
    "rag": Method(_unadapted),
    "per-user-lora": Method(_per_user_lora),
    "merge-only": Method(_personalized(lambda c: PersonalizeConfig(c.merge_only, None, c.num_retrieved)), needs_bank=True),
    "stack-only": Method(_personalized(lambda c: PersonalizeConfig(None, c.stack_only, c.num_retrieved))),
    "recipe": Method(_personalized(_recipe), needs_bank=True),
    "mta": Method(_personalized(lambda c: PersonalizeConfig(c.fusion, c.stack, c.num_retrieved)), needs_bank=True),
}


def bank_config(cfg: BenchConfig) -> BankConfig:
    """The bank a run builds: the run's model, embedder, anchors, LoRA and retrieval."""
    return BankConfig(task=get_task(cfg.task).id, base_model=cfg.base_model, embedding_model=cfg.embedding_model,
                      anchors=cfg.anchors, lora=cfg.lora, train=cfg.bank_train, num_retrieved=cfg.num_retrieved)


# -- data split ------------------------------------------------------------------------------------

def split_users(users: list[User], eval_fraction: float, seed: int) -> tuple[list[User], list[User]]:
    """A seeded shuffle, then the first share are eval users; file order is kept within each part."""
    if not 0 < eval_fraction < 1:
        raise MTAError(f"--eval-fraction must lie strictly between 0 and 1, got {eval_fraction}")
    order = list(range(len(users)))
    random.Random(seed).shuffle(order)
    n_eval = round(eval_fraction * len(users))
    if not 0 < n_eval < len(users):
        raise MTAError(f"{len(users)} users cannot be split with eval fraction {eval_fraction}: one part would be empty")
    held = set(order[:n_eval])
    return [u for i, u in enumerate(users) if i not in held], [u for i, u in enumerate(users) if i in held]


def hold_out_items(task: Task, users: list[User], n: int) -> list[User]:
    """Each user's last `n` profile items become queries too, and leave the profile: n more scored answers per
    personalization at the same training cost, where one query per user leaves a comparison mostly noise."""
    if n < 0:
        raise MTAError(f"cannot hold out {n} profile items: give 0 or more")
    if n == 0:
        return users
    if any(len(u.profile) <= n for u in users):
        raise MTAError(f"cannot hold out {n} profile items: every user must keep at least one (smallest profile: "
                       f"{min(len(u.profile) for u in users)} items)")
    return [User(u.user_id, u.profile[:-n], [Query(f"{u.user_id}-p{j}", *map(str, task.item_pair(item)))
                                            for j, item in enumerate(u.profile[-n:])] + u.queries) for u in users]


def in_bank_histories(task: Task, bank_users: list[User], eval_users: list[User]) -> list[bool]:
    """Per eval answer: does a bank user's history hold its item (the same movie, the same article)?

    LaMP's users share items: in the shared files every LaMP-2 user shares a movie with another user, and 42 of
    the 64 LaMP-4 users share a headline with another (some profiles are near copies). The split keeps eval users
    out of the bank, not their items, and an anchor trained on such a history may have learned the answer; scores
    without these answers say how much of a result rests on them. An item counts when the start of its text (the
    task's first field) appears in the query.
    """
    starts = _item_keys(task, bank_users)
    return [any(t in q for t in starts) for q in _query_texts(eval_users)]


def without_shared_items(task: Task, bank_users: list[User], eval_users: list[User]) -> list[User]:
    """The bank users whose histories hold no item of an eval user (in their profile or asked about): a bank that
    can only help the eval users by what it learned from other items."""
    profiles, queries = _item_keys(task, eval_users), _query_texts(eval_users)
    return [b for b in bank_users
            if not (keys := _item_keys(task, [b])) & profiles and not any(k in q for k in keys for q in queries)]


def linked_groups(task: Task, users: list[User]) -> list[list[User]]:
    """Users linked, directly or through others, by an item one holds in its profile and another holds or is asked
    about: folds that keep each group whole keep every item on one side (LaMP-4's 64 users form 21 pairs and 22
    singles; 46 of LaMP-2's 48 users form one group). Groups in order of their first user, file order within."""
    owner: dict[str, int] = {}
    links = [(i, owner.setdefault(k, i)) for i, u in enumerate(users) for k in _item_keys(task, [u])]
    links += [(i, j) for i, u in enumerate(users) for q in _query_texts([u]) for k, j in owner.items() if k in q]
    rows, cols = zip(*links) if links else ((), ())
    _, label = connected_components(coo_matrix((np.ones(len(links)), (rows, cols)), shape=(len(users),) * 2))
    groups: dict[int, list[User]] = {}
    for u, g in zip(users, label):
        groups.setdefault(g, []).append(u)
    return list(groups.values())


def _item_keys(task: Task, users: list[User]) -> set[str]:
    """The start of each profile item's text, whitespace normalised; texts too short to identify an item are left out."""
    texts = (" ".join(str(it[task.item_fields[0]]).split()) for u in users for it in u.profile)
    return {t[:200] for t in texts if len(t) >= 40}


def _query_texts(users: list[User]) -> list[str]:
    return [" ".join(q.input.split()) for u in users for q in u.queries]


def main_metric_where(task: Task, answers: list[str], golds: list[str], keep: list[bool]) -> float | None:
    """The main metric over the answers `keep` marks; None when it marks none."""
    kept = [(a, g) for a, g, k in zip(answers, golds, keep) if k]
    return task.evaluate(*map(list, zip(*kept)))[task.main_metric] if kept else None


def write_users(path: Path, users: list[User]) -> None:
    """The per-user LaMP layout, so a split can be rerun with --bank-users/--eval-users."""
    atomic_write_json(path, [{"user_id": u.user_id, "profile": u.profile,
                              "query": [dataclasses.asdict(q) for q in u.queries]} for u in users])


def _check_disjoint(bank_users: list[User], eval_users: list[User], bank: Bank | None) -> None:
    eval_ids = {u.user_id for u in eval_users}
    shared = eval_ids & {u.user_id for u in bank_users}
    if bank is not None:
        shared |= eval_ids & _trained_on(bank)
    if shared:
        raise MTAError(f"eval user(s) {sorted(shared)[:5]} are also bank users: the bank must never see an eval user")


def _trained_on(bank: Bank) -> set[str]:
    return {uid for a in bank.manifest["anchors"] for uid in a["user_ids"]}


def _check_eval_users(users: list[User]) -> None:
    for u in users:
        if not u.profile or not u.queries or any(q.gold is None for q in u.queries):
            raise MTAError(f"eval user {u.user_id!r} needs a profile and queries with golds")


# -- the run ---------------------------------------------------------------------------------------

def _prepare_bank(cfg: BenchConfig, bank_users: list[User], out: Path, reuse: Path | None, model, tokenizer, embedder,
                  progress: bool) -> tuple[Bank | None, float | None]:
    """The bank, built once into out/bank (resuming an interrupted build) or reused; None when no method needs it."""
    if not any(METHODS[m].needs_bank for m in cfg.methods):
        return None, None
    if reuse is not None:
        bank = Bank.load(reuse)
        if bank.task.id != get_task(cfg.task).id:
            raise MTAError(f"bank {reuse} is for {bank.task.id}, not {get_task(cfg.task).id}")
        return bank, None
    start = time.perf_counter()
    bank = build_bank(bank_users, out / "bank", bank_config(cfg), model, tokenizer, embedder, progress)
    return bank, time.perf_counter() - start


def _fusion_ms(bank: Bank, run: Run, users: list[User], fusion: FusionConfig) -> float:
    """Milliseconds to plan and merge one user's adapter, steady state: anchors already in memory, embedding untimed."""
    total = 0.0
    for u in users:
        emb = profile_embedding(run.embedder, run.task, u.profile)
        start = time.perf_counter()
        merge(bank, plan_fusion(bank, emb, fusion))
        total += time.perf_counter() - start
    return 1000 * total / len(users)


def run_bench(cfg: BenchConfig, bank_users: list[User], eval_users: list[User], out: str | Path,
              reuse_bank: str | Path | None = None, split: dict | None = None, device: str | None = None,
              dtype: str = "auto", progress: bool = True) -> dict:
    """Build (or reuse) the bank, personalize every eval user with every method, score and write the report."""
    out = Path(out)
    task = get_task(cfg.task)
    if cfg.limit_users is not None:
        bank_users, eval_users = bank_users[: cfg.limit_users], eval_users[: cfg.limit_users]
    eval_users = hold_out_items(task, eval_users, cfg.eval_holdout)
    dropped: set[str] = set()  # bank users left out for sharing an item with an eval user
    if cfg.bank_without_shared:
        kept = without_shared_items(task, bank_users, eval_users)
        dropped = {u.user_id for u in bank_users} - {u.user_id for u in kept}
        bank_users = kept
        if not bank_users:
            raise MTAError("every bank user shares an item with an eval user: no bank is left without them")
    _check_disjoint(bank_users, eval_users, None)
    _check_eval_users(eval_users)
    model, tokenizer = load_base(cfg.base_model, device, dtype)
    embedder = load_embedder(cfg.embedding_model)
    bank, bank_seconds = _prepare_bank(cfg, bank_users, out, Path(reuse_bank) if reuse_bank else None, model, tokenizer,
                                       embedder, progress)
    _check_disjoint(bank_users, eval_users, bank)
    if bank is not None and (held := dropped & _trained_on(bank)):
        raise MTAError(f"bank {bank.path} was trained on bank user(s) {sorted(held)[:5]}, who share an item with an eval "
                       "user: with --bank-without-shared reuse a bank built with it, or build a new one")
    run = Run(cfg, task, tokenizer, embedder, bank, progress)

    preds = {m: [] for m in cfg.methods}
    cost = {m: {"train": 0.0, "infer": 0.0, "bytes": 0} for m in cfg.methods}
    golds = [q.gold for u in eval_users for q in u.queries]
    asked_by = [u.user_id for u in eval_users for q in u.queries]
    bar = tqdm(total=len(eval_users) * len(cfg.methods), desc=f"{task.id} users x methods", disable=not progress)
    for user in eval_users:
        for name in cfg.methods:
            method = METHODS[name]
            bar.set_postfix_str(f"user {user.user_id}: {name}")
            model = base_of(model)  # strip the previous method's adapters outside the timer
            start = time.perf_counter()
            model, size = method.adapt(run, model, user, out / "users" / name / user.user_id)
            cost[name]["train"] += time.perf_counter() - start
            start = time.perf_counter()
            prompts = [query_prompt(task, q.input, user.profile, cfg.num_retrieved if method.history else 0) for q in user.queries]
            outputs = generate(model, tokenizer, prompts, task.max_new_tokens, cfg.decoding)
            cost[name]["infer"] += time.perf_counter() - start
            cost[name]["bytes"] += size
            preds[name] += [{"id": q.id, "output": o} for q, o in zip(user.queries, outputs)]
            bar.update()
    bar.close()

    n = len(eval_users)
    methods = {}
    answers = {name: [p["output"] for p in preds[name]] for name in cfg.methods}
    seen = in_bank_histories(task, bank_users, eval_users)
    for name in cfg.methods:
        atomic_write_json(out / "predictions" / f"{name}.json", predictions_file(task.id, preds[name]))
        scores = task.evaluate(answers[name], golds)
        if not all(seen):  # the main metric on the answers whose item no bank user's history holds
            scores[f"{task.main_metric}_unseen"] = main_metric_where(task, answers[name], golds, [not x for x in seen])
        methods[name] = {**scores, "train_seconds_per_user": cost[name]["train"] / n,
                         "infer_seconds_per_user": cost[name]["infer"] / n, "bytes_per_user": cost[name]["bytes"] / n}
    fusion_cfg = (cfg.fusion if "mta" in cfg.methods else cfg.merge_only if "merge-only" in cfg.methods
                  else FusionConfig(merge="recipe"))
    results = {
        "task": task.id, "main_metric": task.main_metric, "n_eval_users": n, "n_eval_answers": len(golds),
        "n_bank_users": len(bank_users), "n_eval_answers_in_bank": sum(seen),
        "methods": methods, "mta_versus": {name: versus(task, answers["mta"], answers[name], golds, asked_by)
                                           for name in cfg.methods if name != "mta"} if "mta" in answers else {},
        "fusion_ms_per_user": _fusion_ms(bank, run, eval_users, fusion_cfg) if bank else None,
        "bank_build_seconds": bank_seconds,
        "config": {"bench": dataclasses.asdict(cfg), "bank": bank.config.to_dict() if bank else None,
                   "bank_path": str(bank.path) if bank else None, "bank_fingerprint": bank.fingerprint if bank else None,
                   "split": {**(split or {}), "bank_user_ids": [u.user_id for u in bank_users],
                             "eval_user_ids": [u.user_id for u in eval_users]}},
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", results_markdown(results).encode())
    plot_results(results, out / "results.png")
    return results


def versus(task: Task, ours: list[str], theirs: list[str], golds: list[str], users: list[str] | None = None,
           resamples: int = 2000, seed: int = 0) -> dict:
    """Our main metric minus theirs, with a 95 % paired bootstrap interval over the eval users.

    With a few dozen eval users one answer moves accuracy by several points; the interval says whether a
    difference is more than that. Every main metric (accuracy, MAE, ROUGE-1) is a mean over queries, so
    the per-query differences are what is resampled, a user's together (`users`: each query's user; by
    default each query its own): one user's answers come from one adapter and are not independent.
    """
    main = task.main_metric
    per_query = np.array([task.evaluate([a], [g])[main] - task.evaluate([b], [g])[main] for a, b, g in zip(ours, theirs, golds)])
    users = list(range(len(golds))) if users is None else users
    keys = {u: i for i, u in enumerate(dict.fromkeys(users))}
    sums, counts = np.zeros(len(keys)), np.zeros(len(keys))
    np.add.at(sums, [keys[u] for u in users], per_query)
    np.add.at(counts, [keys[u] for u in users], 1)
    ci = bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True, vectorized=True,
                   n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return {"diff": float(per_query.mean()), "ci95": [float(ci.low), float(ci.high)]}


# -- report ----------------------------------------------------------------------------------------

def results_markdown(results: dict) -> str:
    methods = results["methods"]
    metrics = [k for k in next(iter(methods.values())) if not k.endswith("_per_user")]
    main, versus_ = results["main_metric"], results.get("mta_versus", {})
    head = ["method", *metrics, "train s/user", "infer s/user", "bytes/user"] + ([f"mta − it, {main} [95% CI]"] if versus_ else [])
    answers = results["n_eval_answers"]
    more = f" ({answers} answers)" if answers != results["n_eval_users"] else ""
    lines = [f"## {results['task']}: {results['n_eval_users']} eval users{more}, {results['n_bank_users']} bank users", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, *(f"{m[k]:.4f}" for k in metrics), f"{m['train_seconds_per_user']:.2f}",
                 f"{m['infer_seconds_per_user']:.2f}", f"{m['bytes_per_user']:,.0f}"]
        if versus_:
            v = versus_.get(name)
            cells.append(f"{v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if v else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Main metric: {main} ({'lower' if main in LOWER_IS_BETTER else 'higher'} is better)."]
    if "n_eval_answers_in_bank" in results:
        lines.append(f"{results['n_eval_answers_in_bank']} of {answers} answers ask about an item that a bank user's history "
                     f"holds (LaMP's users share items); {main}_unseen scores the others.")
    if versus_:
        lines.append("mta − it: mta's main metric minus that method's, with a 95 % paired bootstrap interval over the eval users (a user's answers resampled together).")
    if results["fusion_ms_per_user"] is not None:
        lines.append(f"Fusion (plan + merge): {results['fusion_ms_per_user']:.1f} ms per user.")
    if results["bank_build_seconds"] is not None:
        lines.append(f"Bank build: {results['bank_build_seconds']:.0f} s.")
    split = results["config"]["split"]
    lines += [f"Eval users: {', '.join(split['eval_user_ids'])}.",
              f"Settings: {json.dumps({k: v for k, v in split.items() if not k.endswith('_ids')})} "
              "and `config` in results.json."]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Two bar charts: the main metric, and seconds per user (training + inference stacked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["methods"])
    m = results["methods"]
    main = results["main_metric"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar_label(ax1.bar(names, [m[n][main] for n in names], color="tab:blue"), fmt="%.3f")
    ax1.set_title(f"{results['task']} {main} ({results['n_eval_users']} eval users)")
    train = [m[n]["train_seconds_per_user"] for n in names]
    ax2.bar(names, train, label="train", color="tab:orange")
    ax2.bar(names, [m[n]["infer_seconds_per_user"] for n in names], bottom=train, label="inference", color="tab:gray")
    ax2.set_title("seconds per user")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def load_split(task: Task, bank_file: str | None, eval_file: str | None, data_file: str | None, eval_fraction: float,
               seed: int, out: Path) -> tuple[list[User], list[User], dict]:
    """Either two files, or one file split here; a split made here is written into `out` to be rerun from."""
    if data_file is not None:
        bank_users, eval_users = split_users(load_users(data_file, task), eval_fraction, seed)
        write_users(out / "bank_users.json", bank_users)
        write_users(out / "eval_users.json", eval_users)
        return bank_users, eval_users, {"data": str(data_file), "eval_fraction": eval_fraction, "seed": seed}
    if not (bank_file and eval_file):
        raise MTAError("pass --bank-users FILE and --eval-users FILE, or --data FILE to split here")
    return load_users(bank_file, task), load_users(eval_file, task), {"bank_users": str(bank_file), "eval_users": str(eval_file)}
