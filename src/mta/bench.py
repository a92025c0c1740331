"""`mta bench`: MTA against six baselines on LaMP, quality and cost side by side.

One base model is loaded once and every method starts from it (`base_of` strips what the previous
method attached; a method's adapter layers stay from one user to the next, as in `mta personalize`).
Methods differ only in how they adapt the model to a user — they are small functions behind `METHODS`,
so they share the prompt template, the BM25 history item, the decoding, the timing and the scoring. The
bank is built from the bank users only (or reused) and never sees an eval user.

Every method runs in every *condition*: LaMP's own (the whole profile, the query alone), and per history size n
each user personalized from n profile items and scored on every other item too (`history_split`), and per bank
fraction a bank of a share of the bank users (`bank_subsets`). Intervals resample users, paired across methods.

Output in the run folder: results.json, results.md, results.png; per condition (the run folder itself for the
full profile, h<n>/ and f<fraction>/ for the others) predictions/<method>.json (LaMP format), answers/<method>.json
(outputs and seconds, read back by a rerun), users/<method>/<user>/ (what each method stores to serve the user
again) and eval_users.json (the users as asked); bank/ and bank-f<fraction>/ (unless reused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from mta.adapters import fresh_adapter, save_adapter
from mta.bank import Bank, build_bank
from mta.config import BankConfig, BenchConfig, FusionConfig
from mta.data.lamp import Query, User, load_users, predictions_file
from mta.embedding import profile_embedding
from mta.fusion import merge, plan_fusion
from mta.generation import generate
from mta.io import MTAError, atomic_write_bytes, atomic_write_json, read_json
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
    adapts: bool = True  # False: the base model as it is, so an answer depends on the prompt alone
    uses: frozenset[str] = frozenset()  # the ADAPTER_SETTINGS (BenchConfig fields) that shape this method's adapter


def _unadapted(run: Run, model, user: User, folder: Path) -> tuple[torch.nn.Module, int]:
    return model, 0


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _per_user_lora(run: Run, model, user: User, folder: Path) -> tuple[torch.nn.Module, int]:
    """OPPU-style: a LoRA of the bank's rank trained from scratch on the user's leave-one-out samples."""
    pm = fresh_adapter(model, run.cfg.lora.peft_config(), "default", run.cfg.user_lora_train.seed)
    train(pm, run.tokenizer, loo_examples(run.task, user.profile, run.cfg.num_retrieved), run.cfg.user_lora_train,
          desc=f"per-user LoRA {user.user_id}", progress=run.progress)
    save_adapter(pm, folder / "adapter")
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


# BenchConfig fields that shape some method's adapter: a method's answers depend on those it uses, not the others'
ADAPTER_SETTINGS = {"anchors", "fusion", "merge_only", "stack", "stack_only", "bank_train", "lora", "user_lora_train",
                    "recipe_stack"}
BANK = frozenset({"anchors", "bank_train", "lora"})
METHODS: dict[str, Method] = {
    "base": Method(_unadapted, history=False, adapts=False),
    "rag": Method(_unadapted, adapts=False),
    "per-user-lora": Method(_per_user_lora, uses=frozenset({"lora", "user_lora_train"})),
    "merge-only": Method(_personalized(lambda c: PersonalizeConfig(c.merge_only, None, c.num_retrieved)), needs_bank=True,
                         uses=BANK | {"merge_only"}),
    "stack-only": Method(_personalized(lambda c: PersonalizeConfig(None, c.stack_only, c.num_retrieved)),
                         uses=frozenset({"stack_only"})),
    "recipe": Method(_personalized(_recipe), needs_bank=True, uses=BANK | {"recipe_stack"}),
    "mta": Method(_personalized(lambda c: PersonalizeConfig(c.fusion, c.stack, c.num_retrieved)), needs_bank=True,
                  uses=BANK | {"fusion", "stack"}),
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


def history_split(task: Task, users: list[User], n: int, seed: int = 0) -> list[User]:
    """Each user as personalized from `n` of their profile items, asked their query and every other profile item.

    The `n` items are the first `n` of a permutation of the profile seeded by (seed, user id): the same for every
    method, and a smaller size's items lie among a larger size's, so the curve compares like with like. A held-out
    item is asked in the task's own query wording (id "<user>-p<its index in the profile>"), and retrieval only ever
    sees the `n` items. One personalization answers len(profile) − n + 1 questions at the cost of one.
    """
    if n < 1 or any(n >= len(u.profile) for u in users):
        raise MTAError(f"history size {n} must be at least 1 and below every eval user's profile length (smallest: "
                       f"{min(len(u.profile) for u in users)} items)")
    out = []
    for u in users:
        order = random.Random(f"{seed}:{u.user_id}").sample(range(len(u.profile)), len(u.profile))
        kept = sorted(order[:n])
        held = [Query(f"{u.user_id}-p{i}", *map(str, task.item_pair(item))) for i, item in enumerate(u.profile) if i not in kept]
        out.append(User(u.user_id, [u.profile[i] for i in kept], held + u.queries))
    return out


def bank_subsets(users: list[User], fractions: list[float], seed: int = 0) -> dict[float, list[User]]:
    """Nested seeded shares of the bank users (each smaller share inside every larger one), in file order."""
    order = random.Random(seed).sample(range(len(users)), len(users))
    subsets = {}
    for f in fractions:
        kept = set(order[: max(1, round(f * len(users)))])
        subsets[f] = [u for i, u in enumerate(users) if i in kept]
    return subsets


# -- the run ---------------------------------------------------------------------------------------

def _prepare_bank(cfg: BenchConfig, bank_users: list[User], folder: Path, reuse: Path | None, model, tokenizer, embedder,
                  progress: bool) -> Bank:
    """The bank, built into `folder` (resuming an interrupted build) or reused."""
    if reuse is None:
        return build_bank(bank_users, folder, bank_config(cfg), model, tokenizer, embedder, progress)
    bank = Bank.load(reuse)
    if bank.task.id != get_task(cfg.task).id:
        raise MTAError(f"bank {reuse} is for {bank.task.id}, not {get_task(cfg.task).id}")
    return bank


def _fusion_ms(bank: Bank, run: Run, users: list[User], fusion: FusionConfig) -> float:
    """Milliseconds to plan and merge one user's adapter, steady state: anchors already in memory, embedding untimed."""
    total = 0.0
    for u in users:
        emb = profile_embedding(run.embedder, run.task, u.profile)
        start = time.perf_counter()
        merge(bank, plan_fusion(bank, emb, fusion))
        total += time.perf_counter() - start
    return 1000 * total / len(users)


@dataclass
class Condition:
    """One way of asking every eval user: what each method personalizes them from (their profile) and what is scored
    (their queries). `full` is LaMP's protocol, `h<n>` a history size, `f<fraction>` a smaller bank at a history size."""

    key: str
    folder: Path
    users: list[User]
    methods: list[str]
    bank: Bank | None
    bank_users: list[User]


@dataclass
class Answers:
    """One method's outputs in one condition, with what they cost per user."""

    outputs: dict[str, str]  # query id → output
    train: dict[str, float]  # user id → seconds
    infer: dict[str, float]
    bytes: dict[str, int]


# BenchConfig fields that shape which conditions run, not how a method answers in one
_RUN_SHAPE = {"methods", "limit_users", "full_profile", "history_sizes", "bank_fractions"}


def _fingerprint(run: Run, name: str, cond: Condition) -> str:
    """What a method's answers in a condition depend on: the settings it uses, the bank it fuses from, the users as
    asked. A rerun with another setting of MTA's answers the other methods from what they saved."""
    unused = _RUN_SHAPE | (ADAPTER_SETTINGS - METHODS[name].uses)
    settings = {k: v for k, v in dataclasses.asdict(run.cfg).items() if k not in unused}
    bank = cond.bank.fingerprint if METHODS[name].needs_bank else None
    users = [[u.user_id, u.profile, [dataclasses.asdict(q) for q in u.queries]] for u in cond.users]
    return hashlib.sha256(json.dumps([name, settings, bank, users], sort_keys=True, default=str).encode()).hexdigest()


def _answer(run: Run, model, name: str, cond: Condition, memo: dict[str, str]) -> tuple[torch.nn.Module, Answers]:
    """Every user of `cond` personalized by `name` and answering all their queries in one generation call; read back
    instead when an earlier, interrupted run of the same settings finished this method in this condition."""
    path = cond.folder / "answers" / f"{name}.json"
    fingerprint = _fingerprint(run, name, cond)
    if path.is_file() and (saved := read_json(path, "saved answers")).get("fingerprint") == fingerprint:
        return model, Answers(saved["outputs"], saved["train"], saved["infer"], saved["bytes"])
    method, task, cfg = METHODS[name], run.task, run.cfg
    run = dataclasses.replace(run, bank=cond.bank)
    result = Answers({}, {}, {}, {})
    model = base_of(model)  # strip the previous method's adapters outside the timer; its own stay from user to user
    for user in tqdm(cond.users, desc=f"{task.id} {cond.key} {name}", disable=not run.progress, leave=False):
        start = time.perf_counter()
        model, size = method.adapt(run, model, user, cond.folder / "users" / name / user.user_id)
        result.train[user.user_id], result.bytes[user.user_id] = time.perf_counter() - start, size
        start = time.perf_counter()
        prompts = [query_prompt(task, q.input, user.profile, cfg.num_retrieved if method.history else 0) for q in user.queries]
        # an unadapted model's answer depends on the prompt alone: asked once per run, whatever the condition
        todo = [p for p in dict.fromkeys(prompts) if method.adapts or p not in memo]
        found = dict(zip(todo, generate(model, run.tokenizer, todo, task.max_new_tokens, cfg.decoding)))
        if not method.adapts:
            memo.update(found)
            found = memo
        result.infer[user.user_id] = time.perf_counter() - start
        result.outputs.update({q.id: found[p] for q, p in zip(user.queries, prompts)})
    atomic_write_json(path, {"fingerprint": fingerprint, **dataclasses.asdict(result)})
    atomic_write_json(cond.folder / "predictions" / f"{name}.json",
                      predictions_file(task.id, [{"id": q.id, "output": result.outputs[q.id]} for u in cond.users for q in u.queries]))
    return model, result


def user_interval(values: list[float], users: list[str], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of per-answer values with a 95 % bootstrap interval that resamples users, a user's answers together.

    One user's answers come from one adapter and are not independent; every main metric (accuracy, MAE, ROUGE-1) is a
    mean over answers, so the resampled statistic is a ratio of sums over the drawn users.
    """
    keys = {u: i for i, u in enumerate(dict.fromkeys(users))}
    sums, counts = np.zeros(len(keys)), np.zeros(len(keys))
    np.add.at(sums, [keys[u] for u in users], values)
    np.add.at(counts, [keys[u] for u in users], 1)
    mean = float(np.mean(values))
    if len(keys) < 2 or np.ptp(sums / counts) == 0:  # nothing to resample: every user alike
        return mean, mean, mean
    return mean, *ratio_interval(sums, counts, resamples, seed)


def ratio_interval(num, den, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of Σ num / Σ den that resamples rows (users), each row's num and den together."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) < 2 or np.ptp(num / den) == 0:  # nothing to resample: every row alike
        return float(num.sum() / den.sum()), float(num.sum() / den.sum())
    ci = bootstrap((num, den), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True, vectorized=True,
                   n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def per_answer(task: Task, outputs: list[str], golds: list[str]) -> list[float]:
    main = task.main_metric
    return [task.evaluate([o], [g])[main] for o, g in zip(outputs, golds)]


def versus(task: Task, ours: list[str], theirs: list[str], golds: list[str], users: list[str] | None = None,
           resamples: int = 2000, seed: int = 0) -> dict:
    """Our main metric minus theirs, with a 95 % paired bootstrap interval over the eval users (`users`: each
    answer's user; by default each answer its own). With a few dozen eval users one answer moves accuracy by several
    points; the interval says whether a difference is more than that."""
    diffs = [a - b for a, b in zip(per_answer(task, ours, golds), per_answer(task, theirs, golds))]
    d, lo, hi = user_interval(diffs, users if users is not None else list(range(len(golds))), resamples, seed)
    return {"diff": d, "ci95": [lo, hi]}


def _scored(task: Task, cond: Condition, answers: dict[str, Answers]) -> dict:
    """Per method: every metric, the main one's 95 % interval over users, the main one on the answers whose item no
    bank user's history holds, and cost per user; mta minus each method with a paired interval."""
    queries = [q for u in cond.users for q in u.queries]
    golds, asked_by = [q.gold for q in queries], [u.user_id for u in cond.users for _ in u.queries]
    seen = in_bank_histories(task, cond.bank_users, cond.users)
    main, n = task.main_metric, len(cond.users)
    outputs = {name: [a.outputs[q.id] for q in queries] for name, a in answers.items()}
    methods = {}
    for name, a in answers.items():
        scores = task.evaluate(outputs[name], golds)
        _, lo, hi = user_interval(per_answer(task, outputs[name], golds), asked_by)
        scores[f"{main}_ci95"] = [lo, hi]
        if not all(seen):
            scores[f"{main}_unseen"] = main_metric_where(task, outputs[name], golds, [not x for x in seen])
        methods[name] = {**scores, "train_seconds_per_user": sum(a.train.values()) / n,
                         "infer_seconds_per_user": sum(a.infer.values()) / n, "bytes_per_user": sum(a.bytes.values()) / n}
    vs = {name: versus(task, outputs["mta"], outputs[name], golds, asked_by) for name in answers if name != "mta"} \
        if "mta" in answers else {}
    return {"n_answers": len(golds), "n_answers_in_bank": sum(seen), "methods": methods, "versus": vs}


def break_even_users(bank_bytes: int, bytes_per_user: float, reference: float) -> int | None:
    """The number of users from which a method's total storage (its share of the bank included) is below the
    reference's (the per-user LoRA's); None when it never is."""
    if bytes_per_user >= reference:
        return None
    return int(bank_bytes // (reference - bytes_per_user)) + 1


def break_even_table(cost: dict, bank_bytes: int) -> dict[str, int | None]:
    """`break_even_users` of every method in a cost block but the per-user LoRA, the bank counted for those that fuse
    from it; empty when the block has no per-user LoRA to compare with."""
    reference = cost.get("per-user-lora", {}).get("bytes_per_user")
    return {name: break_even_users(bank_bytes if METHODS[name].needs_bank else 0, m["bytes_per_user"], reference)
            for name, m in cost.items() if name != "per-user-lora"} if reference else {}


def run_bench(cfg: BenchConfig, bank_users: list[User], eval_users: list[User], out: str | Path,
              reuse_bank: str | Path | None = None, split: dict | None = None, device: str | None = None,
              dtype: str = "auto", progress: bool = True) -> dict:
    """Build (or reuse) the bank, personalize every eval user with every method in every condition, score, report.

    A rerun with the same settings into the same folder reads back what an interrupted run finished (per condition
    and method) and the bank build resumes too, so only what is missing runs.
    """
    wall = time.perf_counter()
    out = Path(out)
    task = get_task(cfg.task)
    if cfg.limit_users is not None:
        bank_users, eval_users = bank_users[: cfg.limit_users], eval_users[: cfg.limit_users]
    dropped: set[str] = set()  # bank users left out for sharing an item with an eval user
    if cfg.bank_without_shared:
        kept = without_shared_items(task, bank_users, eval_users)
        dropped = {u.user_id for u in bank_users} - {u.user_id for u in kept}
        bank_users = kept
        if not bank_users:
            raise MTAError("every bank user shares an item with an eval user: no bank is left without them")
    _check_disjoint(bank_users, eval_users, None)
    _check_eval_users(eval_users)
    sized = {n: history_split(task, eval_users, n, cfg.history_seed) for n in sorted(cfg.history_sizes)}
    needs_bank = [m for m in cfg.methods if METHODS[m].needs_bank]
    fractions = sorted(cfg.bank_fractions) if needs_bank else []
    model, tokenizer = load_base(cfg.base_model, device, dtype)
    embedder = load_embedder(cfg.embedding_model)
    bank = (_prepare_bank(cfg, bank_users, out / "bank", Path(reuse_bank) if reuse_bank else None, model, tokenizer,
                          embedder, progress) if needs_bank else None)
    bank_seconds = bank.train_seconds if bank else None
    _check_disjoint(bank_users, eval_users, bank)
    if bank is not None and (held := dropped & _trained_on(bank)):
        raise MTAError(f"bank {bank.path} was trained on bank user(s) {sorted(held)[:5]}, who share an item with an eval "
                       "user: with --bank-without-shared reuse a bank built with it, or build a new one")
    run = Run(cfg, task, tokenizer, embedder, bank, progress)

    conditions = ([Condition("full", out, eval_users, cfg.methods, bank, bank_users)] if cfg.full_profile else [])
    conditions += [Condition(f"h{n}", out / f"h{n}", users, cfg.methods, bank, bank_users) for n, users in sized.items()]
    for c in conditions[1 if cfg.full_profile else 0:]:
        write_users(c.folder / "eval_users.json", c.users)  # as asked: `mta eval --data` scores its predictions
    smallest = next(iter(sized), None)  # the bank-size curve asks the sparsest users, where a bank should help most
    base_cond = next(c for c in conditions if c.key == (f"h{smallest}" if smallest else "full"))
    fraction_seconds: dict[str, float] = {}
    for f, subset in bank_subsets(bank_users, fractions, cfg.history_seed).items():
        if f == 1:
            continue
        fbank = build_bank(subset, out / f"bank-f{f:g}", bank_config(cfg), model, tokenizer, embedder, progress)
        fraction_seconds[f"{f:g}"] = fbank.train_seconds
        conditions.append(Condition(f"f{f:g}", out / f"f{f:g}", base_cond.users, needs_bank, fbank, subset))

    memo: dict[str, str] = {}
    answers: dict[str, dict[str, Answers]] = {}
    for cond in conditions:
        answers[cond.key] = {}
        for name in cond.methods:
            model, answers[cond.key][name] = _answer(run, model, name, cond, memo)
    scored = {c.key: _scored(task, c, answers[c.key] if c.key[0] != "f" else {**answers[base_cond.key], **answers[c.key]})
              for c in conditions}

    results = {"task": task.id, "main_metric": task.main_metric, "n_eval_users": len(eval_users),
               "n_bank_users": len(bank_users)}
    if cfg.full_profile:
        full = scored["full"]
        results.update({"n_eval_answers": full["n_answers"], "n_eval_answers_in_bank": full["n_answers_in_bank"],
                        "methods": full["methods"], "mta_versus": full["versus"]})
    if sized:
        results["history_sizes"] = {str(n): {**scored[f"h{n}"], "versus": {m: [v["diff"], *v["ci95"]]
                                                                         for m, v in scored[f"h{n}"]["versus"].items()}}
                                    for n in sized}
    if fractions:
        results["bank_fractions"] = {}
        for f in fractions:
            s = scored[base_cond.key if f == 1 else f"f{f:g}"]
            results["bank_fractions"][f"{f:g}"] = {
                "n_bank_users": len(bank_users) if f == 1 else len(next(c for c in conditions if c.key == f"f{f:g}").bank_users),
                "history_size": smallest, "methods": s["methods"], "versus": {m: [v["diff"], *v["ci95"]] for m, v in s["versus"].items()}}
    bank_bytes = bank.serving_bytes() if bank else 0
    results.update({
        "bank_bytes": bank_bytes,
        "bank_build_seconds": bank_seconds,
        "break_even_users": break_even_table(scored[conditions[0].key]["methods"], bank_bytes),
        "fusion_ms_per_user": _fusion_ms(bank, run, eval_users, cfg.fusion if "mta" in cfg.methods else cfg.merge_only
                                         if "merge-only" in cfg.methods else FusionConfig(merge="recipe")) if bank else None,
        "seconds": {"total": time.perf_counter() - wall, "bank_build": bank_seconds, "fraction_banks": fraction_seconds,
                    "conditions": {k: {m: {"train": sum(a.train.values()), "infer": sum(a.infer.values())} for m, a in v.items()}
                                   for k, v in answers.items()}},
        "config": {"bench": dataclasses.asdict(cfg), "bank": bank.config.to_dict() if bank else None,
                   "bank_path": str(bank.path) if bank else None, "bank_fingerprint": bank.fingerprint if bank else None,
                   "split": {**(split or {}), "bank_user_ids": [u.user_id for u in bank_users],
                             "eval_user_ids": [u.user_id for u in eval_users]}},
    })
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", results_markdown(results).encode())
    plot_results(results, out / "results.png")
    return results


# -- report ----------------------------------------------------------------------------------------

def verdict(diff_ci: list[float], main: str) -> str:
    """'better', 'worse' or 'level' for mta against a method: better only when the whole interval favours mta."""
    _, lo, hi = diff_ci
    sign = -1 if main in LOWER_IS_BETTER else 1
    lo, hi = sorted((sign * lo, sign * hi))
    return "better" if lo > 0 else "worse" if hi < 0 else "level"


def _num(x: float, digits: int, sign: str = "") -> str:
    return f"{round(x, digits) + 0.0:{sign}.{digits}f}"  # + 0.0: no "-0.000"


def _ci(m: dict, main: str) -> str:
    lo, hi = m[f"{main}_ci95"]
    return f"{_num(m[main], 4)} [{_num(lo, 3)}, {_num(hi, 3)}]"


def _vs(v: list[float] | None, main: str) -> str:
    return f"{_num(v[0], 4, '+')} [{_num(v[1], 3, '+')}, {_num(v[2], 3, '+')}] {verdict(v, main)}" if v else ""


def _ordered(methods: dict) -> dict:
    """`methods` in METHODS' order, whatever order results.json (written with sorted keys) holds them in."""
    return {n: methods[n] for n in METHODS if n in methods}


def _by_point(blocks: dict[str, dict]) -> dict[str, dict]:
    """A curve's points in numeric order: results.json sorts its keys as strings ("10" before "2")."""
    return dict(sorted(blocks.items(), key=lambda kv: float(kv[0])))


def _condition_order(key: str) -> tuple:
    """The order a run asks its conditions in: the full profile, the history sizes, the bank fractions."""
    return (0, 0.0) if key == "full" else (1 if key[0] == "h" else 2, float(key[1:]))


def cost_of(results: dict) -> tuple[dict, str | None]:
    """The methods whose cost is reported: the full profile's, else the smallest history size's (and that size)."""
    if "methods" in results:
        return _ordered(results["methods"]), None
    n = min(results["history_sizes"], key=int)
    return _ordered(results["history_sizes"][n]["methods"]), n


def _curve_tables(title: str, blocks: dict[str, dict], label, main: str) -> list[str]:
    """One table of the main metric (with its interval) and one of mta minus each method, a column per point."""
    points = list(blocks)
    names = list(_ordered(next(iter(blocks.values()))["methods"]))
    head = "| method | " + " | ".join(label(p, blocks[p]) for p in points) + " |"
    rule = "|---|" + "---|" * len(points)
    lines = [title, "", head, rule]
    lines += [f"| {n} | " + " | ".join(_ci(blocks[p]["methods"][n], main) if n in blocks[p]["methods"] else "" for p in points)
              + " |" for n in names]
    if any(blocks[p]["versus"] for p in points):
        lines += ["", f"mta − it, {main} [95 % CI], and what that says:", "", head, rule]
        lines += [f"| {n} | " + " | ".join(_vs(blocks[p]["versus"].get(n), main) for p in points) + " |" for n in names if n != "mta"]
    unseen = f"{main}_unseen"
    if any(unseen in m for p in points for m in blocks[p]["methods"].values()):
        lines += ["", f"{main} on the answers whose item no bank user's history holds:", "", head, rule]
        lines += [f"| {n} | " + " | ".join(f"{blocks[p]['methods'][n].get(unseen, float('nan')):.4f}" if n in blocks[p]["methods"] else ""
                                          for p in points) + " |" for n in names]
    return lines + [""]


def results_markdown(results: dict) -> str:
    main = results["main_metric"]
    lines = [f"## {results['task']}: {results['n_eval_users']} eval users, {results['n_bank_users']} bank users", "",
             f"Main metric: {main} ({'lower' if main in LOWER_IS_BETTER else 'higher'} is better). Intervals: 95 % "
             "bootstrap over eval users (a user's answers resampled together); mta − it is paired. *better*/*worse*: the "
             "whole interval on one side of 0; *level*: it holds 0.", ""]
    if "methods" in results:
        m, v = _ordered(results["methods"]), results["mta_versus"]
        unseen = f"{main}_unseen" if any(f"{main}_unseen" in x for x in m.values()) else None
        lines += [f"### Full profile, query only (LaMP's protocol): {results['n_eval_answers']} answers", "",
                  f"| method | {main} [95% CI] | mta − it |{f' {unseen} |' if unseen else ''} train s/user | infer s/user | "
                  "bytes/user |", "|---|---|---|---|---|---|" + ("---|" if unseen else "")]
        lines += [f"| {n} | {_ci(x, main)} | {_vs([v[n]['diff'], *v[n]['ci95']], main) if n in v else ''} |"
                  f"{f' {x[unseen]:.4f} |' if unseen else ''} {x['train_seconds_per_user']:.2f} | {x['infer_seconds_per_user']:.2f} | "
                  f"{x['bytes_per_user']:,.0f} |" for n, x in m.items()]
        if unseen:
            lines += ["", f"{results['n_eval_answers_in_bank']} of {results['n_eval_answers']} answers ask about an item that a "
                      f"bank user's history holds (LaMP's users share items); {unseen} scores the others."]
        lines.append("")
    if "history_sizes" in results:
        lines += _curve_tables("### History sizes: personalized from n profile items, scored on the query and every other item",
                               _by_point(results["history_sizes"]), lambda n, b: f"n = {n} ({b['n_answers']} answers)", main)
    if "bank_fractions" in results:
        fr = _by_point(results["bank_fractions"])
        size = next(iter(fr.values()))["history_size"]
        lines += _curve_tables(f"### Bank size: banks from nested shares of the bank users, {'n = ' + str(size) if size else 'full profile'}",
                               fr, lambda f, b: f"{b['n_bank_users']} bank users", main)
    cost, _ = cost_of(results)
    even = results["break_even_users"]
    lines += ["### Storage: marginal bytes per user, the shared bank, break-even against the per-user LoRA", "",
              "| method | bytes/user | bank bytes | total below the per-user LoRA's from |", "|---|---|---|---|"]
    for n, x in cost.items():
        shared = results["bank_bytes"] if METHODS[n].needs_bank else 0
        from_ = ("—" if n == "per-user-lora" else "never" if even.get(n) is None
                 else f"{even[n]:,} user{'s' if even[n] > 1 else ''}") if even else "—"
        lines.append(f"| {n} | {x['bytes_per_user']:,.0f} | {shared:,} | {from_} |")
    s = results["seconds"]
    lines += ["", "### Where the time went", "", "| condition | " + " | ".join(cost) + " | total |", "|---|" + "---|" * (len(cost) + 1)]
    for key, per in sorted(s["conditions"].items(), key=lambda kv: _condition_order(kv[0])):
        cells = [f"{per[n]['train'] + per[n]['infer']:.0f}" if n in per else "" for n in cost]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {sum(x['train'] + x['infer'] for x in per.values()):.0f} |")
    spent = ([f"bank training {s['bank_build']:.0f} s (its anchors' recorded time, reused or resumed alike)"]
             if s["bank_build"] is not None else [])
    spent += [f"bank of fraction {f}: {t:.0f} s" for f, t in s["fraction_banks"].items()] + [f"{'these runs' if results['config'].get('parts') else 'this invocation'}: {s['total']:.0f} s"]
    lines += ["", "Seconds of training + inference per method (a method's answers read back from an interrupted run keep "
              f"the seconds they took then). {'; '.join(spent)}."]
    if results["fusion_ms_per_user"] is not None:
        lines.append(f"Fusion (plan + merge): {results['fusion_ms_per_user']:.1f} ms per user.")
    split = results["config"]["split"]
    lines += [f"Eval users: {', '.join(split['eval_user_ids'])}.",
              f"Settings: {json.dumps({k: v for k, v in split.items() if not k.endswith('_ids')})} and `config` in results.json."]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """The main metric per method (full profile), seconds per user, and the history-size and bank-size curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    main = results["main_metric"]
    panels = [p for p in ("methods", "history_sizes", "bank_fractions") if p in results]
    fig = Figure(figsize=(6 * (len(panels) + 1), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, len(panels) + 1))
    cost, size = cost_of(results)
    names = list(cost)
    ax = axes.pop()
    train = [cost[n]["train_seconds_per_user"] for n in names]
    ax.bar(names, train, label="train", color="tab:orange")
    ax.bar(names, [cost[n]["infer_seconds_per_user"] for n in names], bottom=train, label="inference", color="tab:gray")
    ax.set_title("seconds per user" + (f", n = {size}" if size else ""))
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend()
    if "methods" in results:
        ax = axes.pop(0)
        m = _ordered(results["methods"])
        values = [m[n][main] for n in names]
        err = [[v - m[n][f"{main}_ci95"][0] for n, v in zip(names, values)], [m[n][f"{main}_ci95"][1] - v for n, v in zip(names, values)]]
        ax.bar_label(ax.bar(names, values, yerr=err, capsize=3, color="tab:blue"), fmt="%.3f", padding=3)
        ax.set_title(f"{results['task']} {main}, full profile ({results['n_eval_answers']} answers)")
        ax.tick_params(axis="x", labelrotation=30)
    for key, xlabel in (("history_sizes", "history size n (profile items personalized from)"), ("bank_fractions", "bank users")):
        if key not in results:
            continue
        ax, blocks = axes.pop(0), _by_point(results[key])
        xs = [int(k) for k in blocks] if key == "history_sizes" else [b["n_bank_users"] for b in blocks.values()]
        for n in _ordered(next(iter(blocks.values()))["methods"]):
            ys = [b["methods"][n][main] for b in blocks.values()]
            lo = [b["methods"][n][f"{main}_ci95"][0] for b in blocks.values()]
            hi = [b["methods"][n][f"{main}_ci95"][1] for b in blocks.values()]
            line, = ax.plot(xs, ys, marker="o", label=n, linewidth=2.5 if n == "mta" else 1.2)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.08 if n != "mta" else 0.2)
        ax.set_xticks(xs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(main)
        ax.set_title(f"{main} with 95 % intervals" + (f" (n = {next(iter(blocks.values()))['history_size']})"
                                                      if key == "bank_fractions" else ""))
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


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
