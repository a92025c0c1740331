"""`mta` command line: a thin shell over the library; every subcommand maps onto one library call."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from mta.config import (
    ADAPTER_DTYPES,
    BENCH_METHODS,
    DEFAULT_EMBEDDER,
    DEFAULT_MODEL,
    MIN_MAX_LENGTH,
    AnchorConfig,
    BankConfig,
    BenchConfig,
    Decoding,
    FusionConfig,
    LoraSpec,
    PersonalizeConfig,
    ServeConfig,
    StackConfig,
    anchor_training,
    at_least,
    positive,
    require,
)
from mta.io import MTAError, check_replaceable
from mta.presets import preset


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (not its usage block) and exits 2, like every mta error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(convert, check, expected: str):
    """An argparse type: `convert` the text, then `check` the value with mta.config's own rules (one source of limits)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            check(value)
        except MTAError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def _int_at_least(low: int):
    return _checked(int, lambda v: at_least("value", v, low), "an integer")


COUNT, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)  # e.g. --rank / --retrieve
MAX_LENGTH = _int_at_least(MIN_MAX_LENGTH)
RATE = _checked(float, lambda v: positive("value", v), "a number")  # finite and > 0: --lr, --epochs, --temperature
WAIT_MS = _checked(float, lambda v: ServeConfig(max_wait_ms=v), "a number")
AMOUNT = _checked(float, lambda v: require(math.isfinite(v) and v >= 0, f"value must be 0 or more, got {v!r}"), "a number")
FRACTION = _checked(float, lambda v: require(0 < v < 1, f"value must lie strictly between 0 and 1, got {v!r}"), "a number")
PORT = _checked(int, lambda v: require(1 <= v <= 65535, f"a port must lie in 1-65535, got {v}"), "a port number")
TEXT = _checked(str, lambda v: require(bool(v.strip()), "the text is empty"), "text")
IN_FILE = _checked(Path, lambda v: require(v.is_file(), f"no such file: {v}"), "a file")
OUT_FILE = _checked(Path, lambda v: require(not v.is_dir(), f"{v} is a folder; name a file to write"), "a file")


def _split(convert):
    return lambda text: [convert(x) for x in text.split(",") if x.strip()]


COUNTS = _checked(_split(int), lambda v: [at_least("value", x, 1) for x in v], "comma-separated integers, e.g. 2,4,8")
RATES = _checked(_split(float), lambda v: [positive("value", x) for x in v], "comma-separated numbers, e.g. 0.25,0.5,1")


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from transformers/PEFT internals
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")


def _precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mixed-precision", choices=["auto", "bf16", "no"],
                   help="training: bf16 matmuls over fp32 weights; auto (the default) where the hardware is fast at them "
                   "(AVX512-BF16/AMX CPUs, GPUs)")


def _executor_args(p: argparse.ArgumentParser, unit: str) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help=f"local: this process; ray: one Ray task per {unit} (needs pip install -e '.[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. auto or HOST:6379 (default: RAY_ADDRESS, else a local Ray)")


def _given(config, **flags):
    """`config` with the flags that were given; an unset flag (None) keeps the default, perhaps the task's tuned one."""
    from dataclasses import replace

    return replace(config, **{k: v for k, v in flags.items() if v is not None})


TUNED = "or the task's tuned value (mta.presets)"


def _train_args(p: argparse.ArgumentParser, d, tuned: bool = False) -> None:
    """Training flags; unset ones keep `d`'s values (and, with `tuned`, the task's preset)."""
    more = f", {TUNED}" if tuned else ""
    p.add_argument("--epochs", type=RATE, help=f"default {d.epochs}{more}")
    p.add_argument("--lr", type=RATE, help=f"default {d.learning_rate}{more}")
    p.add_argument("--batch-size", type=COUNT, help=f"default {d.batch_size}")
    p.add_argument("--max-length", type=MAX_LENGTH, help=f"default {d.max_length} (at least {MIN_MAX_LENGTH})")
    p.add_argument("--seed", type=NON_NEGATIVE, help=f"default {d.seed}")
    _precision_args(p)


def _train_config(a, d):
    return _given(d, epochs=a.epochs, learning_rate=a.lr, batch_size=a.batch_size, max_length=a.max_length, seed=a.seed,
                  mixed_precision=a.mixed_precision)


def _fusion_args(p: argparse.ArgumentParser, svd: bool = False) -> None:
    """Fusion flags; unset ones keep FusionConfig's defaults or the task's tuned ones."""
    d = FusionConfig()
    p.add_argument("--k", type=COUNT, help=f"anchors fused per user (default {d.k}, {TUNED})")
    p.add_argument("--weighting", choices=["normalized", "softmax"], help=f"default {d.weighting}, {TUNED}")
    p.add_argument("--temperature", type=RATE, help=f"softmax weighting (default {d.temperature}, {TUNED})")
    p.add_argument("--merge", choices=["exact", "linear", "svd", "recipe"], help=f"default {d.merge}, {TUNED}")
    p.add_argument("--fusion-scale", type=RATE, help=f"the fused weights' sum (default {d.scale}, {TUNED})")
    p.add_argument("--fusion-adapt", choices=["fixed", "pick", "learn", "learn-layer"], help="per user: fixed weights; pick k "
                   "and scale by the loss on the user's examples; learn the weights with the stack (per anchor, or per anchor "
                   f"and layer) (default {d.adapt}, {TUNED})")
    p.add_argument("--pick-k", type=COUNTS, metavar="K,K,...", help="--fusion-adapt pick: the k to try (default: --k alone)")
    p.add_argument("--pick-scale", type=RATES, metavar="S,S,...",
                   help=f"--fusion-adapt pick: the scales to try (default {','.join(f'{x:g}' for x in d.pick_scale)})")
    p.add_argument("--learn-lr", type=RATE, help=f"--fusion-adapt learn*: the weights' learning rate (default {d.learn_lr:g}, {TUNED})")
    if svd:
        p.add_argument("--svd-rank", type=COUNT, default=None)


def _fusion_config(a, task_id: str, anchors: int, field: str = "fusion", per_user: bool = True):
    """`field`: "merge_only" for fusion without stacking, whose tuned settings may differ from MTA's. `per_user=False`
    leaves the per-user fusion flags out (bench's merge-only: the planned fusion, MTA's first part). `anchors`: the
    bank's size; the task's tuned k fuses at most that many (LaMP-4's 4 on a bank of 2: both), a given --k stays exact."""
    from dataclasses import replace

    adaptive = dict(adapt=a.fusion_adapt, pick_k=a.pick_k, pick_scale=a.pick_scale, learn_lr=a.learn_lr) if per_user else {}
    cfg = _given(preset(FusionConfig(), task_id, field), k=a.k, weighting=a.weighting, temperature=a.temperature,
                 merge=a.merge, rank=getattr(a, "svd_rank", None), scale=a.fusion_scale, **adaptive)
    return cfg if a.k is not None else replace(cfg, k=min(cfg.k, anchors))


def _decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-repeat-ngram", type=NON_NEGATIVE, metavar="N",
                   help=f"no N tokens in a row twice in an output; 0: off (default 0, {TUNED})")


def _decoding(a, task_id: str):
    return _given(preset(Decoding(), task_id, "decoding"), no_repeat_ngram=a.no_repeat_ngram)


def _stack_args(p: argparse.ArgumentParser) -> None:
    """Stacked-LoRA flags; unset ones keep StackConfig's defaults or the task's tuned ones."""
    d = StackConfig()
    p.add_argument("--stack-rank", type=int, choices=[1, 2, 3, 4], help=f"default {d.rank}, {TUNED}")
    p.add_argument("--stack-top-layers", type=COUNT, help=f"stacked LoRA on the top N decoder layers only (default "
                   f"{d.top_layers or 'every layer'}, {TUNED}; more than the model has: every layer)")
    p.add_argument("--stack-modules", nargs="+", metavar="NAME", help=f"the linear layers the stacked LoRA adapts, e.g. "
                   f"q_proj v_proj (default: PEFT's for the architecture, {TUNED})")
    _train_args(p, d.train, tuned=True)


def _bench_stack_args(p: argparse.ArgumentParser, field: str, d, who: str) -> None:
    """`mta bench` tunes three stacked LoRAs apart: --stack-* (mta), --stack-only-* and --recipe-stack-*."""
    flag = "--" + field.replace("_", "-")
    p.add_argument(f"{flag}-rank", type=COUNT, help=f"{who} (default {d.rank}, {TUNED})")
    p.add_argument(f"{flag}-top-layers", type=COUNT,
                   help=f"{who} (default {d.top_layers or 'every layer'}, {TUNED}); more than the model has: every layer")
    p.add_argument(f"{flag}-modules", nargs="+", metavar="NAME", help=f"{who} (default: PEFT's for the architecture, {TUNED})")
    p.add_argument(f"{flag}-epochs", type=RATE, help=f"{who} (default {d.train.epochs}, {TUNED})")
    p.add_argument(f"{flag}-lr", type=RATE, help=f"{who} (default {d.train.learning_rate}, {TUNED})")


def _bench_stack(a, field: str, d):
    v = {name: getattr(a, f"{field}_{name}") for name in ("rank", "top_layers", "modules", "epochs", "lr")}
    train = _given(d.train, epochs=v["epochs"], learning_rate=v["lr"], mixed_precision=a.mixed_precision)
    return _given(d, rank=v["rank"], top_layers=v["top_layers"], target_modules=v["modules"], train=train)


def _stack_config(a, task_id: str):
    d = preset(StackConfig(), task_id, "stack")
    return _given(d, rank=a.stack_rank, top_layers=a.stack_top_layers, target_modules=a.stack_modules,
                  train=_train_config(a, d.train))


def _bank_config(a, task_id: str):
    d = preset(BankConfig(task_id), task_id)
    return _given(d, base_model=a.model, embedding_model=a.embedder, lora=LoraSpec(rank=a.rank), num_retrieved=a.retrieve,
                  anchors=_given(d.anchors, num_clusters=a.num_clusters, min_history=a.min_history, mode=a.anchor_mode, seed=a.seed),
                  train=_train_config(a, d.train))


def cmd_bank_build(a) -> None:
    from mta.data.lamp import load_users
    from mta.executors import run_bank
    from mta.tasks import get_task

    task = get_task(a.task)
    users = load_users(a.data, task)
    bank = run_bank(users, a.out, _bank_config(a, task.id), a.executor, a.ray_address, a.device, a.dtype)
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
    from mta.executors import run_personalize, store_folders
    from mta.stacking import USER_FILE

    bank = Bank.load(a.bank)
    users = load_users(a.user_data, bank.task)
    out = Path(a.out)
    if a.user_id is not None:
        jobs = [(find_user(users, a.user_id), out)]
    elif out.is_file() or (out / USER_FILE).exists():
        raise MTAError(f"{out} is {'a file' if out.is_file() else 'a user folder'}: without --user-id every user is "
                       f"written to --out/<user_id>/; pass --user-id, or a folder for all the users")
    else:
        jobs = store_folders(users, out)
    for _, folder in jobs:  # before any training: nothing mta did not write is ever replaced
        check_replaceable(folder, USER_FILE, "user folder", a.overwrite)
    stack = None if a.no_stack else _stack_config(a, bank.task.id)
    fusion = _fusion_config(a, bank.task.id, len(bank), "merge_only" if a.no_stack else "fusion")
    results = run_personalize(a.bank, jobs, PersonalizeConfig(fusion, stack, a.retrieve, a.adapter_dtype), a.executor, a.ray_address,
                              a.device, a.dtype)
    for (user, folder), (record, size) in zip(jobs, results):
        f = record.fusion
        print(f"user {user.user_id}: anchors {f.anchor_ids} weights {[round(w, 3) for w in f.weights]} merge {f.merge}")
        print(f"saved {folder}: {size} bytes per user" + ("" if stack else " (fusion record only, no stacked adapter)"))


def _user_folders(path: Path) -> list[Path]:
    from mta.stacking import USER_FILE

    if (path / USER_FILE).exists():
        return [path]
    folders = sorted(p for p in path.iterdir() if (p / USER_FILE).exists()) if path.is_dir() else []
    if not folders:
        raise MTAError(f"{path} is neither a user folder (with user.json) nor a folder of them")
    return folders


def cmd_generate(a) -> None:
    from mta.bank import Bank
    from mta.data.lamp import load_users, predictions_file
    from mta.generation import generate
    from mta.io import atomic_write_json
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
        print(generate(model, tok, [prompt], a.max_new_tokens or task.max_new_tokens, _decoding(a, task.id))[0])
        return
    if not (a.data and a.out):
        raise MTAError("pass --input TEXT, or --data FILE and --out FILE for batch mode")
    users = {u.user_id: u for u in load_users(a.data, task)}
    golds = []
    for folder in folders:
        model, record = load_personalized(bank, folder, model)
        if record.user_id not in users:
            raise MTAError(f"user {record.user_id!r} ({folder}) is not in {a.data}")
        queries, profile = users[record.user_id].queries, load_profile(folder)
        prompts = [query_prompt(task, q.input, profile, a.retrieve) for q in queries]
        outs = generate(model, tok, prompts, a.max_new_tokens or task.max_new_tokens, _decoding(a, task.id))
        golds += [{"id": q.id, "output": o} for q, o in zip(queries, outs)]
    atomic_write_json(a.out, predictions_file(task.id, golds))
    print(f"wrote {len(golds)} predictions to {a.out}")


def cmd_eval(a) -> None:
    from mta.data.lamp import load_users, pair_with_golds, read_predictions
    from mta.tasks import get_task

    task = get_task(a.task)
    gold = {q.id: q.gold for u in load_users(a.data, task) for q in u.queries if q.gold is not None}
    preds, golds = pair_with_golds(read_predictions(a.predictions, task.id), gold, str(a.data), a.partial)
    scores = task.evaluate(preds, golds)
    print(json.dumps({"task": task.id, "n": len(preds), **{k: round(v, 4) for k, v in scores.items()}}, indent=2))


def cmd_demo(a) -> None:
    from mta.demo import run_demo

    run_demo(out=Path(a.out), model_name=a.model, num_eval_users=a.users, device=a.device, dtype=a.dtype)


def _bench_config(a, task_id: str):
    from mta.bank import Bank

    d = preset(BenchConfig(task_id), task_id)
    mp = a.mixed_precision
    anchors = _given(d.anchors, num_clusters=a.num_clusters, mode=a.anchor_mode)
    size = len(Bank.load(a.reuse_bank)) if a.reuse_bank else anchors.num_clusters  # a bank's anchors: one per cluster
    return _given(d, base_model=a.model, embedding_model=a.embedder, methods=a.methods, limit_users=a.limit_users,
                  history_sizes=a.history_sizes, bank_fractions=a.bank_fractions, full_profile=False if a.no_full_profile else None,
                  bank_without_shared=a.bank_without_shared or None, decoding=_decoding(a, task_id),
                  anchors=anchors,
                  bank_train=_given(d.bank_train, epochs=a.bank_epochs, learning_rate=a.bank_lr, mixed_precision=mp),
                  user_lora_train=_given(d.user_lora_train, epochs=a.lora_epochs, learning_rate=a.lora_lr, mixed_precision=mp),
                  fusion=_fusion_config(a, task_id, size), merge_only=_fusion_config(a, task_id, size, "merge_only", per_user=False),
                  stack=_bench_stack(a, "stack", d.stack), stack_only=_bench_stack(a, "stack_only", d.stack_only),
                  recipe_stack=_bench_stack(a, "recipe_stack", d.recipe_stack))


def cmd_bench(a) -> None:
    from mta.bench import load_split, run_bench
    from mta.tasks import get_task

    task = get_task(a.task)
    bank_users, eval_users, split = load_split(task, a.bank_users, a.eval_users, a.data, a.eval_fraction, a.seed, Path(a.out))
    run_bench(_bench_config(a, task.id), bank_users, eval_users, a.out, a.reuse_bank, split, a.device, a.dtype)
    print((Path(a.out) / "results.md").read_text())


def serve_spec(a):
    """`mta serve`'s flags as the settings that every server process (or replica) loads, with the task's presets."""
    from mta.bank import Bank
    from mta.serve.app import ServerSpec

    bank = Bank.load(a.bank)
    task_id = bank.task.id
    cfg = ServeConfig(fusion=_fusion_config(a, task_id, len(bank)), stack=_stack_config(a, task_id), decoding=_decoding(a, task_id),
                      max_batch=a.max_batch, max_queue=a.max_queue, max_wait_ms=a.max_wait_ms, max_new_tokens=a.max_new_tokens)
    return ServerSpec(a.bank, a.store, cfg, a.device, a.dtype, a.threads, a.adapter_dtype)


def cmd_serve(a) -> None:
    try:
        import uvicorn

        from mta.serve.app import load_app
    except ImportError as e:
        raise MTAError(f"serving needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    if a.replicas is not None:
        if not a.store.startswith(("postgresql://", "postgres://")):
            raise MTAError("--replicas needs a store they can share: --store postgresql://USER:PASSWORD@HOST/DB "
                           "(a SQLite store folder belongs to one process)")
        if a.replicas < 1 or (a.max_replicas is not None and a.max_replicas < a.replicas):
            raise MTAError(f"--replicas must be at least 1 and --max-replicas at least --replicas, got {a.replicas} and {a.max_replicas}")
        try:
            from mta.serve.replicas import build_app, run
        except ImportError as e:
            raise MTAError(f"--replicas needs Ray Serve ({e.name} is missing): pip install -e '.[serve,ray]'") from None
        run(build_app(serve_spec(a), a.replicas, a.max_replicas, a.replica_cpus, a.replica_gpus), a.host, a.port, a.ray_address)
        return
    app = load_app(serve_spec(a))
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    finally:
        app.state.server.store.close()


def cmd_export(a) -> None:
    from mta.bank import Bank
    from mta.export import EXPORT_FILE, export_stored_user, export_user, vllm_rank
    from mta.serve.store import open_store

    if (a.user is None) == (a.store is None) or (a.store is not None and a.user_id is None):
        raise MTAError("pass --user FOLDER (from mta personalize), or --store DIR and --user-id ID (from mta serve)")
    check_replaceable(a.out, EXPORT_FILE, "export", a.overwrite)
    bank = Bank.load(a.bank)
    if a.store is not None:
        with open_store(a.store, readonly=True) as store:
            w = export_stored_user(bank, store, a.user_id, a.out, a.pad_rank)
    else:
        w = export_user(bank, a.user, a.out, a.pad_rank)
    print(f"wrote {a.out}: one PEFT LoRA adapter, rank {w.rank}, {len(w.modules)} modules")
    print(f"vLLM: vllm serve BASE_MODEL --enable-lora --max-lora-rank {vllm_rank(w.rank)} --lora-modules user={a.out}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mta", description="Merge-then-Adapt personalized LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    bank = sub.add_parser("bank", help="build or inspect a Meta-LoRA bank").add_subparsers(dest="bank_command", required=True)
    b = bank.add_parser("build", help="stage 1: cluster users, train one meta-LoRA per anchor")
    b.add_argument("--task", required=True)
    b.add_argument("--data", required=True, type=IN_FILE, help="LaMP data: per-user JSON or official *_questions.json")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"HF id, local folder or {DEFAULT_MODEL} (embedded)")
    b.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers id or folder")
    d = AnchorConfig()
    b.add_argument("--num-clusters", type=COUNT, help=f"default {d.num_clusters}, {TUNED}")
    b.add_argument("--min-history", type=COUNT, help=f"default {d.min_history}, {TUNED}")
    b.add_argument("--anchor-mode", choices=["user", "cluster"], help=f"user: the paper's anchor user; cluster: pooled "
                   f"cluster histories (our extension); default {d.mode}, {TUNED}")
    b.add_argument("--rank", type=COUNT, default=LoraSpec().rank)
    b.add_argument("--retrieve", type=NON_NEGATIVE, default=1, help="BM25 history items in each prompt")
    _train_args(b, anchor_training(), tuned=True)
    _model_args(b)
    _executor_args(b, "anchor")
    b.set_defaults(fn=cmd_bank_build)
    i = bank.add_parser("info", help="print a bank's manifest")
    i.add_argument("bank")
    i.set_defaults(fn=cmd_bank_info)

    s = sub.add_parser("personalize", help="stages 2+3: fuse anchors for a user, train and save their stacked LoRA")
    s.add_argument("--bank", required=True)
    s.add_argument("--user-data", required=True, type=IN_FILE)
    s.add_argument("--user-id", help="personalize this user into --out; without it: every user of --user-data, "
                   "each into --out/<user_id>/ (ids of 1-128 letters, digits, '_', '.', '@', '-', as mta serve takes)")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace user folders that mta personalize wrote before "
                   "(a folder mta did not write is never replaced)")
    _fusion_args(s, svd=True)
    _stack_args(s)
    s.add_argument("--no-stack", action="store_true", help="fusion only: store just the fusion record "
                   "(with the fusion settings tuned for merge-only, where a task's differ from MTA's)")
    s.add_argument("--retrieve", type=NON_NEGATIVE, default=1)
    s.add_argument("--adapter-dtype", choices=list(ADAPTER_DTYPES), default="fp32",
                   help="how the stacked LoRA is saved: bf16 halves its bytes (it loads in the model's dtype either way)")
    _model_args(s)
    _executor_args(s, "user")
    s.set_defaults(fn=cmd_personalize)

    g = sub.add_parser("generate", help="personalized outputs for one input, or LaMP predictions for a data file")
    g.add_argument("--bank")
    g.add_argument("--user", required=True, help="a user folder, or a folder of user folders (batch mode)")
    g.add_argument("--input", type=TEXT)
    g.add_argument("--data", type=IN_FILE)
    g.add_argument("--out", type=OUT_FILE, help="with --data: the predictions file to write")
    g.add_argument("--max-new-tokens", type=COUNT, default=None, help="default: the task's")
    _decoding_args(g)
    g.add_argument("--retrieve", type=NON_NEGATIVE, default=1)
    _model_args(g)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="score a LaMP predictions file")
    e.add_argument("--task", required=True)
    e.add_argument("--predictions", required=True, type=IN_FILE)
    e.add_argument("--data", required=True, type=IN_FILE)
    e.add_argument("--partial", action="store_true", help="score only the queries the predictions answer (n says how "
                   "many); by default every query with a gold needs a prediction")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="build a small bank and personalize a few held-out users on the embedded model")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--users", type=COUNT, default=4, help="held-out users to personalize")
    _model_args(d)
    d.set_defaults(fn=cmd_demo)

    c = BenchConfig("LaMP-2")  # the library's defaults, shown in the help; unset flags take the task's preset
    r = sub.add_parser("bench", help="LaMP benchmark: MTA against six baselines, quality and cost side by side")
    r.add_argument("--task", required=True)
    r.add_argument("--bank-users", type=IN_FILE, help="LaMP data file of the users the bank is built from")
    r.add_argument("--eval-users", type=IN_FILE, help="LaMP data file of the users personalized and scored (never seen by the bank)")
    r.add_argument("--data", type=IN_FILE, help="instead of the two files: one LaMP data file, split here (written into --out)")
    r.add_argument("--eval-fraction", type=FRACTION, default=1 / 3, help="with --data: share of users held out for eval")
    r.add_argument("--seed", type=NON_NEGATIVE, default=0, help="with --data: seed of the split")
    r.add_argument("--out", required=True)
    r.add_argument("--methods", nargs="+", choices=BENCH_METHODS, default=list(BENCH_METHODS))
    r.add_argument("--limit-users", type=COUNT, default=None, help="quick check: at most N bank users and N eval users")
    r.add_argument("--bank-without-shared", action="store_true", help="leave out of the bank every bank user whose "
                   "history holds an item of an eval user (LaMP's users share movies and articles)")
    r.add_argument("--history-sizes", type=COUNTS, metavar="N,N,...", help="history-size curves: per size n, every eval "
                   "user personalized from n of their profile items (seeded; the same for every method) and scored on "
                   "their query and every other profile item, e.g. 2,4,8")
    r.add_argument("--bank-fractions", type=RATES, metavar="F,F,...", help="bank-size curve: banks from nested "
                   "seeded shares of the bank users, e.g. 0.25,0.5,1; the methods with a bank run on each at the smallest "
                   "history size (or the full profile), the others once")
    r.add_argument("--no-full-profile", action="store_true", help="skip LaMP's own protocol (whole profile, query alone) "
                   "and run the history sizes only")
    r.add_argument("--reuse-bank", default=None, help="a finished bank folder (e.g. an earlier run's OUT/bank) instead of building one")
    r.add_argument("--model", default=c.base_model)
    r.add_argument("--embedder", default=c.embedding_model)
    r.add_argument("--num-clusters", type=COUNT, help=f"default {c.anchors.num_clusters}, {TUNED}")
    r.add_argument("--anchor-mode", choices=["user", "cluster"], help=f"default {c.anchors.mode}, {TUNED}")
    r.add_argument("--bank-epochs", type=RATE, help=f"default {c.bank_train.epochs}, {TUNED}")
    r.add_argument("--bank-lr", type=RATE, help=f"default {c.bank_train.learning_rate}, {TUNED}")
    r.add_argument("--lora-epochs", type=RATE, help=f"per-user-lora baseline (default {c.user_lora_train.epochs}, {TUNED})")
    r.add_argument("--lora-lr", type=RATE, help=f"per-user-lora baseline (default {c.user_lora_train.learning_rate}, {TUNED})")
    _fusion_args(r)  # mta and merge-only alike, but the per-user ones (--fusion-adapt ...) mta alone
    _bench_stack_args(r, "stack", c.stack, "mta")
    _bench_stack_args(r, "stack_only", c.stack_only, "stack-only baseline")
    _bench_stack_args(r, "recipe_stack", c.recipe_stack, "recipe baseline")
    _decoding_args(r)  # every method alike
    _model_args(r)
    _precision_args(r)
    r.set_defaults(fn=cmd_bench)
    v = sub.add_parser("serve", help="HTTP server: many users on one base model, batched per-row adapters (needs the serve extra)")
    v.add_argument("--bank", required=True)
    v.add_argument("--store", required=True, help="user store: a folder (SQLite, created if missing; one server owns it) or "
                   "a postgresql://USER:PASSWORD@HOST/DB URL (shared by every server and replica that names it)")
    v.add_argument("--adapter-dtype", choices=list(ADAPTER_DTYPES), default="fp32",
                   help="how new stacked LoRAs are stored: bf16 halves their bytes (they load in the model's dtype either way)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=PORT, default=8000)
    _fusion_args(v)
    _stack_args(v)  # the LoRA trained by /adapt
    sc = ServeConfig()
    v.add_argument("--max-batch", type=COUNT, default=sc.max_batch, help="requests sharing one forward pass")
    v.add_argument("--max-queue", type=COUNT, default=sc.max_queue, help="waiting requests beyond this get 503")
    v.add_argument("--max-wait-ms", type=WAIT_MS, default=sc.max_wait_ms, help="how long a request waits for others to batch with")
    v.add_argument("--max-new-tokens", type=COUNT, default=sc.max_new_tokens, help="ceiling on a request's max_new_tokens")
    _decoding_args(v)
    v.add_argument("--threads", type=COUNT, default=None, help="torch CPU threads (default: torch's choice)")
    v.add_argument("--log-level", default="info")
    v.add_argument("--replicas", type=COUNT, help="run N replicas of the server on Ray Serve, sharing a PostgreSQL --store; "
                   "each user's requests go to one replica (needs pip install -e '.[serve,ray]'; docs/serving.md)")
    v.add_argument("--max-replicas", type=COUNT, help="with --replicas: let Ray Serve autoscale from --replicas up to this many")
    v.add_argument("--replica-cpus", type=RATE, default=1.0, help="CPUs Ray reserves per replica")
    v.add_argument("--replica-gpus", type=AMOUNT, default=0.0, help="GPUs Ray reserves per replica")
    v.add_argument("--ray-address", default=None, help="with --replicas: the Ray cluster to join, e.g. auto or HOST:6379 "
                   "(default: RAY_ADDRESS, else a local Ray)")
    _model_args(v)
    v.set_defaults(fn=cmd_serve)

    x = sub.add_parser("export", help="one PEFT LoRA adapter (fused + stacked) for vLLM, LoRAX or TGI")
    x.add_argument("--bank", required=True)
    x.add_argument("--user", help="a user folder from mta personalize")
    x.add_argument("--store", help="instead of --user: the store of mta serve, a folder or a postgresql:// URL "
                   "(read-only, may be live) ...")
    x.add_argument("--user-id", help="... and the user's id in it")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true", help="replace an export that mta wrote before "
                   "(a folder mta did not write is never replaced)")
    x.add_argument("--pad-rank", type=COUNT, default=None,
                   help="zero-pad the rank to this (e.g. 8/16/32/64, what vLLM's --max-lora-rank takes); same outputs")
    x.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, its one line already printed)
        return e.code
    _quiet_hf()
    try:
        args.fn(args)
    except MTAError as e:
        print(f"mta: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
