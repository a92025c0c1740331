"""Stage 3: LoRA stacking — a frozen fused adapter with an ultra-low-rank LoRA trained on top.

The fused adapter is rebuilt from the bank whenever it is needed; the stacked LoRA (rank 1–4) plus a
small record is all that is stored per user::

    <user>/user.json      user id, task, base model, bank fingerprint, fusion record, stack settings
    <user>/adapter/       the stacked LoRA as a PEFT adapter (absent with --no-stack)
    <user>/profile.json   the user's history, for retrieval into prompts
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from mta import __version__, fusion_weights
from mta.adapters import LoraWeights, attach, delete_adapter, folded, fresh_adapter, save_adapter
from mta.bank import Bank
from mta.config import ADAPTER_DTYPES, PersonalizeConfig, StackConfig, TrainConfig
from mta.data.lamp import User, require_profile
from mta.embedding import profile_embedding
from mta.fusion import FusionRecord, merge, plan_fusion
from mta.io import MTAError, atomic_dir, atomic_save_tensors, atomic_write_json, load_tensors, read_json
from mta.tasks import loo_examples
from mta.training import train

FUSED, STACK = "fused", "default"  # the stacked adapter is PEFT's "default", so it saves at the folder root
USER_FILE = "user.json"  # a user folder's record; it marks the folder as mta's


@dataclass
class UserRecord:
    user_id: str
    task: str
    base_model: str
    bank_fingerprint: str | None
    fusion: FusionRecord | None
    stack: dict | None  # rank, alpha and training figures, or None
    mta_version: str = __version__

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fusion"] = self.fusion.to_dict() if self.fusion else None
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "user record") -> "UserRecord":
        try:
            return cls(str(d["user_id"]), d["task"], d["base_model"], d["bank_fingerprint"],
                       FusionRecord.from_dict(d["fusion"]) if d["fusion"] else None, d["stack"], d.get("mta_version", "?"))
        except (KeyError, TypeError) as e:
            raise MTAError(f"{where} is malformed: missing {e}") from None

    @classmethod
    def load(cls, folder: str | Path) -> "UserRecord":
        path = Path(folder) / USER_FILE
        return cls.from_dict(read_json(path, "user record"), f"user record {path}")


def base_of(model) -> torch.nn.Module:
    """The plain base model, every adapter removed (unmerged, so weights are exactly the originals)."""
    return model.unload() if isinstance(model, PeftModel) else model


def with_adapters(model, fused: LoraWeights | None, stacked: LoraWeights | StackConfig | None) -> torch.nn.Module:
    """The model with a frozen fused adapter and a stacked adapter (fresh and trainable when given a StackConfig).

    A model that served another user keeps its PEFT layers: the adapters are replaced in place (`mta.adapters.attach`,
    `fresh_adapter`), so one model personalizes or serves user after user without PEFT's injection each time. An
    unused fused adapter stays, switched off, for the next user who has one.
    """
    if isinstance(model, PeftModel):
        for name in [n for n in model.peft_config if n != FUSED and (n != STACK or stacked is None)]:
            delete_adapter(model, name)  # the stack of a user without one, or another tool's adapter
    active = []
    if fused is not None:
        model = attach(model, fused, FUSED)
        active.append(FUSED)
    if isinstance(stacked, StackConfig):
        _check_modules(model, stacked)
        model = fresh_adapter(model, stacked.peft_config(model.config.num_hidden_layers), STACK, stacked.train.seed)
        active.append(STACK)
    elif stacked is not None:
        model = attach(model, stacked, STACK)
        active.append(STACK)
    return _activate(model, active, trainable=isinstance(stacked, StackConfig)) if active else base_of(model)


def _check_modules(model, cfg: StackConfig) -> None:
    """Named modules must exist: a task preset names the default model's (LaMP-4: q_proj, v_proj), which other
    architectures may call otherwise."""
    if not isinstance(cfg.target_modules, list):
        return
    have = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Conv1D") and "lora_" not in n and not n.endswith("base_layer")}
    missing = [m for m in cfg.target_modules if m not in have]
    if missing:
        raise MTAError(f"the stacked LoRA's modules {missing} are not linear layers of this model (it has {sorted(have)}); "
                       "name some of those with --stack-modules (a task preset may name the default model's)")


def _activate(model: PeftModel, active: list[str], trainable: bool) -> PeftModel:
    """Run `active` adapters, in that order; only a trainable stack requires grad."""
    model.base_model.set_adapter(active)
    for name, p in model.named_parameters():
        p.requires_grad = trainable and f".{STACK}." in name
    return model


def personalize(bank: Bank | None, user: User, cfg: PersonalizeConfig, model, tokenizer, embedder=None, task=None,
                progress: bool = True) -> tuple[torch.nn.Module, UserRecord]:
    """Fuse (in memory) and train the stacked LoRA for one user; nothing is written.

    With `cfg.fusion.adapt` the user's own leave-one-out examples pick the fusion or train its weights along with
    the stack (mta.fusion_weights); the record then holds the weights the user answers with.
    """
    profile = require_profile(user)
    task = task or bank.task
    examples = loo_examples(task, profile, cfg.num_retrieved)
    adapt = cfg.fusion.adapt if cfg.fusion is not None else "fixed"
    if adapt.startswith("learn") and cfg.stack is None:
        raise MTAError("learned fusion weights train with the stacked LoRA: without a stack use adapt 'fixed' or 'pick'")
    fused, record = None, None
    if cfg.fusion is not None:
        if bank is None:
            raise MTAError("fusion needs a bank")
        bank.check_model(model)
        embedding = profile_embedding(embedder, task, profile)
        if adapt == "pick":
            with model.disable_adapter() if isinstance(model, PeftModel) else nullcontext():  # the base model's loss
                record = fusion_weights.pick(bank, embedding, cfg.fusion, model, tokenizer, examples,
                                             cfg.stack.train if cfg.stack else TrainConfig())
        else:
            record = plan_fusion(bank, embedding, cfg.fusion)
        fused = merge(bank, record)
    if cfg.stack is None:
        model, stack = with_adapters(model, fused, None), None
    else:
        model = with_adapters(model, None, cfg.stack)
        deltas, groups = None, None
        if adapt.startswith("learn"):
            deltas = fusion_weights.add_gates(model, bank, record, cfg.stack.layers(model.config.num_hidden_layers),
                                              per_layer=adapt == "learn-layer")
            model = _activate(model, [fusion_weights.GATES, STACK], trainable=True)
            learned = list({id(d): d for d in deltas.values()}.values())
            for d in learned:
                d.requires_grad_(True)
            groups = [{"params": [p for p in model.parameters() if p.requires_grad and all(p is not d for d in learned)]},
                      {"params": learned, "lr": cfg.fusion.learn_lr, "weight_decay": cfg.fusion.learn_decay}]
        with folded(model, fused):  # the frozen fused adapter trains as part of W: the same function, cheaper steps
            stats = train(model, tokenizer, examples, cfg.stack.train, desc=f"stacking user {user.user_id}",
                          progress=progress, groups=groups)
        if deltas is not None:  # the planned weights plus what was learned, per stacked layer
            record = fusion_weights.learned(record, deltas)
            delete_adapter(model, fusion_weights.GATES)
            fused = merge(bank, record)
        if fused is not None:  # to answer, the fused adapter runs as LoRA layers again, in load_personalized's order
            model = _activate(attach(model, fused, FUSED), [FUSED, STACK], trainable=False)
        stack = {"rank": cfg.stack.rank, "alpha": cfg.stack.alpha or cfg.stack.rank, "train_seconds": round(stats["seconds"], 3),
                 "steps": stats["steps"], "final_loss": stats["losses"][-1]}
    base_name = bank.manifest["base_model"] if bank else getattr(model.config, "_name_or_path", "?")
    return model, UserRecord(user.user_id, task.id, base_name, bank.fingerprint if bank else None, record, stack)


def save_user(folder: str | Path, model, record: UserRecord, profile: list[dict], adapter_dtype: str = "fp32") -> int:
    """Write the user's folder atomically; returns the bytes that serving this user needs (adapter + record).

    `adapter_dtype` "bf16" keeps the stacked LoRA in half the bytes; it loads in the model's dtype either way.
    """
    with atomic_dir(folder) as tmp:
        if record.stack is not None:
            save_adapter(model, tmp / "adapter", selected_adapters=[STACK])
            if adapter_dtype != "fp32":
                f = tmp / "adapter" / "adapter_model.safetensors"
                dtype = getattr(torch, ADAPTER_DTYPES[adapter_dtype])
                atomic_save_tensors(f, {k: v.to(dtype) for k, v in load_tensors(f).items()}, metadata={"format": "pt"})
        atomic_write_json(tmp / USER_FILE, record.to_dict())
        atomic_write_json(tmp / "profile.json", profile)
    return user_bytes(folder)


def user_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    files = [folder / USER_FILE, *((folder / "adapter").glob("*") if (folder / "adapter").exists() else [])]
    return sum(f.stat().st_size for f in files)


def fused_adapter(bank: Bank | None, record: UserRecord) -> LoraWeights | None:
    """The user's fused adapter, rebuilt from the bank it was fused against; None when not fused."""
    if record.fusion is None:
        return None
    if bank is None:
        raise MTAError(f"user {record.user_id!r} was fused from a bank: pass --bank")
    if record.bank_fingerprint != bank.fingerprint:
        raise MTAError(f"user {record.user_id!r} was personalized against bank {record.bank_fingerprint}, "
                       f"not {bank.fingerprint} ({bank.path})")
    return merge(bank, record.fusion)


def user_adapters(bank: Bank | None, folder: str | Path) -> tuple[UserRecord, LoraWeights | None, LoraWeights | None]:
    """A user folder's record, fused adapter and stacked LoRA, as plain factors."""
    folder = Path(folder)
    record = UserRecord.load(folder)
    stacked = LoraWeights.from_peft_dir(folder / "adapter").to(torch.float32) if record.stack is not None else None
    return record, fused_adapter(bank, record), stacked


def load_personalized(bank: Bank | None, folder: str | Path, model) -> tuple[torch.nn.Module, UserRecord]:
    """Base model → the user's fused adapter (rebuilt from the bank) + their stacked LoRA."""
    record, fused, stacked = user_adapters(bank, folder)
    if fused is not None:
        bank.check_model(model)
    return with_adapters(model, fused, stacked), record


def load_profile(folder: str | Path) -> list[dict]:
    profile = read_json(Path(folder) / "profile.json", "user profile")
    if not isinstance(profile, list):
        raise MTAError(f"{Path(folder) / 'profile.json'} must hold a list of profile items")
    return profile
