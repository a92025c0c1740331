"""Where the expensive steps run: in this process ("local") or as Ray tasks ("ray").

Both executors run the same per-item code (`bank.train_anchor`, `stacking.personalize` + `save_user`)
and write the same files, so they are interchangeable and a build started with one resumes with the
other. With Ray, each anchor and each user is one task that loads the base model itself and writes
its own folder atomically as it finishes; the driver only plans, submits and waits. Every path a task
touches must therefore be on storage that all nodes share (see docs/scaling.md).

Ray is imported only when the "ray" executor is used: the core never needs it.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from mta.bank import Bank, anchor_examples, build_bank, finalize_bank, pending_anchors, plan_bank, train_anchor
from mta.config import BankConfig, PersonalizeConfig
from mta.data.lamp import User, check_user_id, require_profile
from mta.io import MTAError
from mta.models import load_base, load_embedder, load_error, model_signature, resolve_model_path
from mta.stacking import UserRecord, personalize, save_user

EXECUTORS = ("local", "ray")


def store_folders(users: list[User], store: str | Path) -> list[tuple[User, Path]]:
    """One folder per user, named by user id: the layout `mta generate --user STORE` reads."""
    for u in users:
        check_user_id(u.user_id, f" (it names the user's folder in {store}; personalize this user with --user-id and --out)")
    return [(u, Path(store) / u.user_id) for u in users]


def run_bank(users: list[User], out: str | Path, cfg: BankConfig, executor: str = "local", ray_address: str | None = None,
             device: str | None = None, dtype: str = "auto", progress: bool = True) -> Bank:
    """`build_bank` with the anchors trained by `executor`; finished anchors are skipped on a rerun."""
    if executor == "local":
        model, tok = load_base(cfg.base_model, device, dtype)
        return build_bank(users, out, cfg, model, tok, progress=progress)
    signature = model_signature(_base_config(cfg.base_model))  # a bad --model fails here, not in every task
    ray, started = ray_connect(executor, ray_address)
    try:
        out = Path(out).resolve()  # tasks may run in another working directory, or on another node
        anchors = plan_bank(users, out, cfg, progress=progress)
        users_by_id = {u.user_id: u for u in users}
        task = ray.remote(_anchor_task).options(**_resources(ray, device))
        refs = {task.remote(str(out), cfg, a, i, anchor_examples(a, users_by_id, cfg), device, dtype): a.id
                for i, a in pending_anchors(out, anchors)}
        _wait_all(ray, refs, "meta-LoRAs", progress,
                  "anchor(s) failed; the finished ones are saved: rerun the same command to train the rest")
        return finalize_bank(out, anchors, cfg, signature, int(anchors[0].embedding.shape[0]))
    finally:
        if started:
            ray.shutdown()


def run_personalize(bank_dir: str | Path, jobs: list[tuple[User, Path]], cfg: PersonalizeConfig, executor: str = "local",
                    ray_address: str | None = None, device: str | None = None, dtype: str = "auto",
                    progress: bool = True) -> list[tuple[UserRecord, int]]:
    """Personalize each (user, folder) job and save it there; returns (record, bytes per user) in job order."""
    for user, _ in jobs:
        require_profile(user)  # refuse before any training, not after hours of it
    if executor == "local":
        bank = Bank.load(bank_dir)
        model, tok = load_base(bank.manifest["base_model"], device, dtype)
        embedder = load_embedder(bank.manifest["embedding_model"])
        results = []
        for user, folder in tqdm(jobs, desc="users", disable=not progress or len(jobs) < 2):
            model, record, size = _personalize_into(bank, user, folder, cfg, model, tok, embedder, progress)
            results.append((record, size))
        return results
    bank_dir = Path(bank_dir).resolve()
    Bank.load(bank_dir)  # a missing or unfinished bank is reported here, not by every task
    ray, started = ray_connect(executor, ray_address)
    try:
        task = ray.remote(_user_task).options(**_resources(ray, device))
        refs = {task.remote(str(bank_dir), user, str(Path(folder).resolve()), cfg, device, dtype): user.user_id
                for user, folder in jobs}
        done = _wait_all(ray, refs, "users", progress, "user(s) failed; the others are saved")
        return [done[user.user_id] for user, _ in jobs]
    finally:
        if started:
            ray.shutdown()


def _personalize_into(bank: Bank, user: User, folder: Path, cfg: PersonalizeConfig, model, tok, embedder, progress: bool):
    """One user, the same for both executors; returns the model, whose adapter layers the next user reuses."""
    model, record = personalize(bank, user, cfg, model, tok, embedder, progress=progress)
    size = save_user(folder, model, record, user.profile, cfg.adapter_dtype)
    return model, record, size


def _anchor_task(out: str, cfg: BankConfig, anchor, index: int, examples, device, dtype) -> None:
    model, tok = load_base(cfg.base_model, device, dtype)
    train_anchor(model, tok, anchor, index, examples, cfg, out, progress=False)


def _user_task(bank_dir: str, user: User, folder: str, cfg: PersonalizeConfig, device, dtype) -> tuple[UserRecord, int]:
    bank = Bank.load(bank_dir)
    model, tok = load_base(bank.manifest["base_model"], device, dtype)
    embedder = load_embedder(bank.manifest["embedding_model"])
    _, record, size = _personalize_into(bank, user, Path(folder), cfg, model, tok, embedder, progress=False)
    return record, size


def _base_config(name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except OSError as e:
        raise load_error("the config of model", name, e) from None


def ray_connect(executor: str, address: str | None):
    """Ray, connected; `started` says whether this call connected it (and so must disconnect)."""
    if executor not in EXECUTORS:
        raise MTAError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    try:
        import ray
    except ImportError:
        raise MTAError("the ray executor needs Ray, an optional extra: pip install -e '.[ray]'") from None
    if ray.is_initialized():
        return ray, False
    # address None: RAY_ADDRESS or a running local cluster, else a new local one. Workers' logs stay in Ray's
    # log folder (/tmp/ray/session_latest/logs): N tasks' model-loading output would bury the progress bar,
    # and a task's error reaches the driver anyway.
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        raise MTAError(f"cannot connect to the Ray cluster ({e}); check --ray-address, and where the cluster uses token "
                       "authentication set RAY_AUTH_MODE=token and its token here (docs/scaling.md)") from None
    return ray, True


def _resources(ray, device: str | None) -> dict:
    """One GPU per task where the cluster has GPUs (and no --device says otherwise), else one CPU."""
    if (device in (None, "auto") or device.startswith("cuda")) and ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def _wait_all(ray, refs: dict, desc: str, progress: bool, failed: str) -> dict:
    """Results by the value each ref maps to, taken as tasks finish; every task runs even if some fail."""
    results, errors, pending = {}, {}, list(refs)
    with tqdm(total=len(pending), desc=desc, disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            key = refs[ready[0]]
            try:
                results[key] = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                errors[key] = getattr(e, "cause", None) or e
            bar.update()
    if errors:
        key, err = next(iter(errors.items()))
        raise MTAError(f"{len(errors)} of {len(refs)} {failed}. First ({key}): {type(err).__name__}: {err}")
    return results
