"""`mta` command line: a thin shell over the library; every subcommand maps onto one library call."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mta.io import MTAError


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")


def _train_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)


def _train_config(a):
    from mta.training import TrainConfig

    return TrainConfig(epochs=a.epochs, learning_rate=a.lr, batch_size=a.batch_size, max_length=a.max_length, seed=a.seed)


def cmd_bank_build(a) -> None:
    from mta.anchors import AnchorConfig
    from mta.bank import BankConfig, LoraSpec, build_bank
    from mta.data.lamp import load_users
    from mta.models import load_base
    from mta.tasks import get_task

    task = get_task(a.task)
    users = load_users(a.data, task)
    cfg = BankConfig(task=task.id, base_model=a.model, embedding_model=a.embedder,
                     anchors=AnchorConfig(a.num_clusters, a.min_history, a.anchor_mode, a.seed),
                     lora=LoraSpec(rank=a.rank), train=_train_config(a), num_retrieved=a.retrieve)
    model, tok = load_base(a.model, a.device, a.dtype)
    bank = build_bank(users, a.out, cfg, model, tok)
    print(f"bank {bank.path}: {len(bank)} anchors {bank.anchor_ids}, fingerprint {bank.fingerprint}")


def cmd_bank_info(a) -> None:
    from mta.bank import Bank

    bank = Bank.load(a.bank)
    m = bank.manifest
    print(f"task {m['task']}  base {m['base_model']}  embedder {m['embedding_model']}  fingerprint {bank.fingerprint}")
    for r in m["anchors"]:
        print(f"  {r['id']}: users {r['user_ids'][:4]}{'...' if len(r['user_ids']) > 4 else ''}  examples {r['num_examples']}  "
              f"loss {r['final_loss']:.3f}  {r['train_seconds']}s")


def cmd_personalize(a) -> None:
    from mta.bank import Bank
    from mta.data.lamp import find_user, load_users
    from mta.fusion import FusionConfig
    from mta.models import load_base, load_embedder
    from mta.stacking import PersonalizeConfig, StackConfig, personalize, save_user

    bank = Bank.load(a.bank)
    user = find_user(load_users(a.user_data, bank.task), a.user_id)
    fusion = FusionConfig(k=a.k, weighting=a.weighting, temperature=a.temperature, merge=a.merge, rank=a.svd_rank)
    stack = None if a.no_stack else StackConfig(rank=a.stack_rank, train=_train_config(a))
    model, tok = load_base(bank.manifest["base_model"], a.device, a.dtype)
    model, record = personalize(bank, user, PersonalizeConfig(fusion, stack, a.retrieve), model, tok,
                                load_embedder(bank.manifest["embedding_model"]))
    size = save_user(a.out, model, record, user.profile)
    f = record.fusion
    print(f"user {user.user_id}: anchors {f.anchor_ids} weights {[round(w, 3) for w in f.weights]} merge {f.merge}")
    print(f"saved {a.out}: {size} bytes per user" + ("" if stack else " (fusion record only, no stacked adapter)"))


def _user_folders(path: Path) -> list[Path]:
    if (path / "user.json").exists():
        return [path]
    folders = sorted(p for p in path.iterdir() if (p / "user.json").exists()) if path.is_dir() else []
    if not folders:
        raise MTAError(f"{path} is neither a user folder (with user.json) nor a folder of them")
    return folders


def cmd_generate(a) -> None:
    from mta.bank import Bank
    from mta.data.lamp import load_users
    from mta.generation import generate
    from mta.models import load_base
    from mta.stacking import UserRecord, load_personalized, load_profile
    from mta.tasks import get_task, query_prompt

    bank = Bank.load(a.bank) if a.bank else None
    folders = _user_folders(Path(a.user))
    first = UserRecord.load(folders[0])
    task = get_task(first.task)
    model, tok = load_base(bank.manifest["base_model"] if bank else first.base_model, a.device, a.dtype)
    if a.input is not None:
        if len(folders) != 1:
            raise MTAError("--input answers for one user: pass a single user folder")
        model, record = load_personalized(bank, folders[0], model)
        prompt = query_prompt(task, a.input, load_profile(folders[0]), a.retrieve)
        print(generate(model, tok, [prompt], a.max_new_tokens or task.max_new_tokens)[0])
        return
    if not (a.data and a.out):
        raise MTAError("pass --input TEXT, or --data FILE and --out FILE for batch mode")
    users = {u.user_id: u for u in load_users(a.data, task)}
    golds = []
    for folder in folders:
        model, record = load_personalized(bank, folder, model)
        if record.user_id not in users:
            raise MTAError(f"user {record.user_id!r} ({folder}) is not in {a.data}")
        queries = users[record.user_id].queries
        prompts = [query_prompt(task, q.input, load_profile(folder), a.retrieve) for q in queries]
        outs = generate(model, tok, prompts, a.max_new_tokens or task.max_new_tokens)
        golds += [{"id": q.id, "output": o} for q, o in zip(queries, outs)]
    from mta.io import atomic_write_json

    atomic_write_json(a.out, {"task": task.id, "golds": golds})
    print(f"wrote {len(golds)} predictions to {a.out}")


def cmd_eval(a) -> None:
    from mta.data.lamp import load_users
    from mta.io import read_json
    from mta.tasks import get_task

    task = get_task(a.task)
    preds = read_json(a.predictions, "predictions file")
    if not isinstance(preds, dict) or not isinstance(preds.get("golds"), list):
        raise MTAError(f"{a.predictions}: expected LaMP predictions {{'task', 'golds': [{{'id', 'output'}}]}}")
    by_id = {}
    for i, g in enumerate(preds["golds"]):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise MTAError(f"{a.predictions}: prediction #{i} needs 'id' and 'output'")
        by_id[str(g["id"])] = str(g["output"])
    gold = {q.id: q.gold for u in load_users(a.data, task) for q in u.queries if q.gold is not None}
    missing = sorted(set(by_id) - set(gold))
    if missing:
        raise MTAError(f"{len(missing)} prediction id(s) have no gold in {a.data}, e.g. {missing[:3]}")
    ids = sorted(by_id)
    scores = task.evaluate([by_id[i] for i in ids], [gold[i] for i in ids])
    print(json.dumps({"task": task.id, "n": len(ids), **{k: round(v, 4) for k, v in scores.items()}}, indent=2))


def cmd_demo(a) -> None:
    from mta.demo import run_demo

    run_demo(out=Path(a.out), model_name=a.model, num_eval_users=a.users, device=a.device, dtype=a.dtype)


def build_parser() -> argparse.ArgumentParser:
    from mta.models import DEFAULT_EMBEDDER, DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="mta", description="Merge-then-Adapt personalized LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    bank = sub.add_parser("bank", help="build or inspect a Meta-LoRA bank").add_subparsers(dest="bank_command", required=True)
    b = bank.add_parser("build", help="stage 1: cluster users, train one meta-LoRA per anchor")
    b.add_argument("--task", required=True)
    b.add_argument("--data", required=True, help="LaMP data: per-user JSON or official *_questions.json")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"HF id, local folder or {DEFAULT_MODEL} (embedded)")
    b.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers id or folder")
    b.add_argument("--num-clusters", type=int, default=8)
    b.add_argument("--min-history", type=int, default=5)
    b.add_argument("--anchor-mode", choices=["user", "cluster"], default="user",
                   help="user: the paper's anchor user; cluster: pooled cluster histories (our extension)")
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--retrieve", type=int, default=1, help="BM25 history items in each prompt")
    _train_args(b, epochs=2.0, lr=3e-4)
    _model_args(b)
    b.set_defaults(fn=cmd_bank_build)
    i = bank.add_parser("info", help="print a bank's manifest")
    i.add_argument("bank")
    i.set_defaults(fn=cmd_bank_info)

    s = sub.add_parser("personalize", help="stages 2+3: fuse anchors for a user, train and save their stacked LoRA")
    s.add_argument("--bank", required=True)
    s.add_argument("--user-data", required=True)
    s.add_argument("--user-id", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--k", type=int, default=2)
    s.add_argument("--merge", default="exact", choices=["exact", "linear", "svd", "recipe"])
    s.add_argument("--weighting", default="normalized", choices=["normalized", "softmax"])
    s.add_argument("--temperature", type=float, default=0.1)
    s.add_argument("--svd-rank", type=int, default=None)
    s.add_argument("--stack-rank", type=int, default=2, choices=[1, 2, 3, 4])
    s.add_argument("--no-stack", action="store_true", help="fusion only: store just the fusion record")
    s.add_argument("--retrieve", type=int, default=1)
    _train_args(s, epochs=2.0, lr=1e-3)
    _model_args(s)
    s.set_defaults(fn=cmd_personalize)

    g = sub.add_parser("generate", help="personalized outputs for one input, or LaMP predictions for a data file")
    g.add_argument("--bank")
    g.add_argument("--user", required=True, help="a user folder, or a folder of user folders (batch mode)")
    g.add_argument("--input")
    g.add_argument("--data")
    g.add_argument("--out")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--retrieve", type=int, default=1)
    _model_args(g)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="score a LaMP predictions file")
    e.add_argument("--task", required=True)
    e.add_argument("--predictions", required=True)
    e.add_argument("--data", required=True)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="build a small bank and personalize a few held-out users on the embedded model")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--users", type=int, default=4, help="held-out users to personalize")
    _model_args(d)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_hf()
    try:
        args.fn(args)
    except MTAError as e:
        print(f"mta: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
