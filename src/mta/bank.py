"""Stage 1: the Meta-LoRA bank — one LoRA per anchor, trained offline, stored as PEFT adapters.

Layout of a bank folder::

    plan.json                 settings, data digest and the chosen anchors (written first; enables resume)
    anchors.safetensors       "embeddings": [num_anchors, dim], rows in manifest order
    anchors/<id>/             a PEFT adapter (PeftModel.from_pretrained loads it) + mta_anchor.json
    manifest.json             written last: its presence means the bank is complete

Each anchor folder appears atomically, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from mta import __version__
from mta.adapters import LoraWeights, save_adapter
from mta.anchors import Anchor, select_anchors
from mta.config import BankConfig
from mta.data.lamp import User
from mta.embedding import profile_embeddings
from mta.io import MTAError, atomic_dir, atomic_save_tensors, atomic_write_json, load_tensors, read_json, sha256_file
from mta.models import load_base, load_embedder, model_signature
from mta.tasks import Example, get_task, loo_examples
from mta.training import train

FORMAT_VERSION = 1


def _digest(users: list[User]) -> str:
    h = hashlib.sha256()
    for u in users:
        h.update(json.dumps([u.user_id, u.profile], sort_keys=True).encode())
    return h.hexdigest()


def plan_bank(users: list[User], out: str | Path, cfg: BankConfig, embedder=None, progress: bool = True) -> list[Anchor]:
    """Embed, cluster and pick anchors — or reload that choice from an interrupted build."""
    out = Path(out)
    task = get_task(cfg.task)
    for u in users:
        for j, item in enumerate(u.profile):
            task.check_item(item, f"user {u.user_id!r}, profile item {j}")
    plan_path, digest = out / "plan.json", _digest(users)
    if plan_path.exists():
        plan = read_json(plan_path, "bank plan")
        if plan.get("config") == cfg.to_dict() and plan.get("data_digest") == digest:
            emb = load_tensors(out / "anchors.safetensors")["embeddings"].numpy()
            return [Anchor(a["id"], a["cluster"], a["user_ids"], emb[i]) for i, a in enumerate(plan["anchors"])]
        # a plan whose build saved no anchor (it failed or was stopped first) holds no work: it is planned afresh
        if any((out / "anchors").glob("*/adapter_model.safetensors")):
            raise MTAError(f"{out} holds a bank started with other settings or data; use another --out or delete it")
    candidates = [u for u in users if u.profile]
    if not candidates:
        raise MTAError("no user with a non-empty profile to build a bank from")
    embedder = embedder or load_embedder(cfg.embedding_model)
    emb = profile_embeddings(embedder, task, [u.profile for u in candidates], progress=progress)
    anchors = select_anchors([u.user_id for u in candidates], [len(u.profile) for u in candidates], emb, cfg.anchors)
    atomic_save_tensors(out / "anchors.safetensors", {"embeddings": torch.from_numpy(np.stack([a.embedding for a in anchors]))})
    atomic_write_json(plan_path, {"config": cfg.to_dict(), "data_digest": digest,
                                  "anchors": [{"id": a.id, "cluster": a.cluster, "user_ids": a.user_ids} for a in anchors]})
    return anchors


def anchor_examples(anchor: Anchor, users_by_id: dict[str, User], cfg: BankConfig) -> list[Example]:
    task = get_task(cfg.task)
    return [ex for uid in anchor.user_ids for ex in loo_examples(task, users_by_id[uid].profile, cfg.num_retrieved)]


def train_anchor(model, tokenizer, anchor: Anchor, index: int, examples: list[Example], cfg: BankConfig, out: str | Path,
                 progress: bool = True):
    """Train one meta-LoRA on `model` and write its folder atomically; returns the unwrapped model."""
    torch.manual_seed(cfg.train.seed + index)  # the same anchor gets the same init whatever ran before it
    pm = get_peft_model(model, cfg.lora.peft_config())
    stats = train(pm, tokenizer, examples, dataclasses.replace(cfg.train, seed=cfg.train.seed + index),
                  desc=f"{anchor.id} ({len(examples)} examples)", progress=progress)
    with atomic_dir(Path(out) / "anchors" / anchor.id) as tmp:
        save_adapter(pm, tmp)
        atomic_write_json(tmp / "mta_anchor.json", {"id": anchor.id, "user_ids": anchor.user_ids, "num_examples": len(examples),
                                                    "train_seconds": round(stats["seconds"], 2), "steps": stats["steps"],
                                                    "final_loss": stats["losses"][-1], "tokens": stats["tokens"]})
    return pm.unload()


def is_trained(out: str | Path, anchor: Anchor) -> bool:
    return (Path(out) / "anchors" / anchor.id / "adapter_model.safetensors").exists()


def pending_anchors(out: str | Path, anchors: list[Anchor]) -> list[tuple[int, Anchor]]:
    """(index, anchor) still to train; the index seeds the anchor, so every executor must pass this one."""
    return [(i, a) for i, a in enumerate(anchors) if not is_trained(out, a)]


def finalize_bank(out: str | Path, anchors: list[Anchor], cfg: BankConfig, signature: dict, embedding_dim: int) -> "Bank":
    out = Path(out)
    records = []
    for a in anchors:
        folder = out / "anchors" / a.id
        info = read_json(folder / "mta_anchor.json", "anchor record")
        records.append({**info, "cluster": a.cluster, "sha256": sha256_file(folder / "adapter_model.safetensors")})
    atomic_write_json(out / "manifest.json", {
        "format_version": FORMAT_VERSION, "mta_version": __version__, "task": get_task(cfg.task).id,
        "base_model": cfg.base_model, "base_signature": signature, "embedding_model": cfg.embedding_model,
        "embedding_dim": embedding_dim, "config": cfg.to_dict(), "anchors": records,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return Bank.load(out)


def build_bank(users: list[User], out: str | Path, cfg: BankConfig, model=None, tokenizer=None, embedder=None,
               progress: bool = True) -> "Bank":
    """Plan, train every anchor not yet on disk, then write the manifest; a finished bank of these settings and data
    is loaded as it is (a rewritten manifest would change its fingerprint)."""
    anchors = plan_bank(users, out, cfg, embedder, progress)
    if (Path(out) / "manifest.json").exists():
        return Bank.load(out)
    if model is None:
        model, tokenizer = load_base(cfg.base_model)
    users_by_id = {u.user_id: u for u in users}
    for i, a in tqdm(pending_anchors(out, anchors), desc="meta-LoRAs", disable=not progress):
        model = train_anchor(model, tokenizer, a, i, anchor_examples(a, users_by_id, cfg), cfg, out, progress)
    return finalize_bank(out, anchors, cfg, model_signature(model), int(anchors[0].embedding.shape[0]))


class Bank:
    """A finished bank on disk; anchor adapters are read lazily and kept in memory."""

    def __init__(self, path: Path, manifest: dict, embeddings: torch.Tensor):
        self.path, self.manifest, self.embeddings = path, manifest, embeddings
        self.anchor_ids: list[str] = [a["id"] for a in manifest["anchors"]]
        self.fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        self._cache: dict[str, LoraWeights] = {}

    @classmethod
    def load(cls, path: str | Path) -> "Bank":
        path = Path(path)
        if not (path / "manifest.json").exists():
            if (path / "plan.json").exists():
                raise MTAError(f"the bank build in {path} did not finish; rerun `mta bank build` with the same arguments to resume it")
            raise MTAError(f"{path} is not a Meta-LoRA bank (no manifest.json)")
        manifest = read_json(path / "manifest.json", "bank manifest")
        missing = [k for k in ("format_version", "task", "base_model", "base_signature", "embedding_model", "anchors", "config") if k not in manifest]
        if missing:
            raise MTAError(f"bank manifest {path / 'manifest.json'} lacks field(s) {missing}")
        if manifest["format_version"] > FORMAT_VERSION:
            raise MTAError(f"bank {path} has format {manifest['format_version']}; this mta reads up to {FORMAT_VERSION}: upgrade mta")
        emb = load_tensors(path / "anchors.safetensors").get("embeddings")
        if emb is None or emb.ndim != 2 or emb.shape[0] != len(manifest["anchors"]):
            raise MTAError(f"{path / 'anchors.safetensors'} does not hold one embedding per anchor")
        return cls(path, manifest, emb.float())

    @property
    def config(self) -> BankConfig:
        return BankConfig.from_dict(self.manifest["config"])

    @property
    def task(self):
        return get_task(self.manifest["task"])

    def __len__(self) -> int:
        return len(self.anchor_ids)

    def anchor(self, anchor_id: str) -> LoraWeights:
        if anchor_id not in self._cache:
            if anchor_id not in self.anchor_ids:
                raise MTAError(f"bank {self.path} has no anchor {anchor_id!r}")
            folder = self.path / "anchors" / anchor_id
            record = self.manifest["anchors"][self.anchor_ids.index(anchor_id)]
            if not (folder / "adapter_model.safetensors").is_file():
                raise MTAError(f"bank {self.path} is missing the adapter of anchor {anchor_id!r}")
            if sha256_file(folder / "adapter_model.safetensors") != record["sha256"]:
                raise MTAError(f"{folder / 'adapter_model.safetensors'} does not match the bank manifest (changed or corrupt)")
            self._cache[anchor_id] = LoraWeights.from_peft_dir(folder)
        return self._cache[anchor_id]

    @property
    def train_seconds(self) -> float:
        """The anchors' training time as each recorded it: the bank's build cost, the same whether it was built in one
        go, resumed or reused (a resumed run's wall clock would count only its own part)."""
        return sum(a.get("train_seconds", 0.0) for a in self.manifest["anchors"])

    def serving_bytes(self) -> int:
        """What serving reads: the manifest, the anchor embeddings and each anchor's adapter (config and weights)."""
        files = [self.path / "manifest.json", self.path / "anchors.safetensors"]
        files += [self.path / "anchors" / a / f for a in self.anchor_ids for f in ("adapter_config.json", "adapter_model.safetensors")]
        return sum(f.stat().st_size for f in files)

    def check_model(self, model) -> None:
        sig, want = model_signature(model), self.manifest["base_signature"]
        if sig != want:
            raise MTAError(f"bank {self.path} was built for base model {self.manifest['base_model']!r} {want}; "
                           f"the model given is {sig}")
