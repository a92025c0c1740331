"""A personalized user as one standard PEFT LoRA adapter, for servers that know nothing of MTA (vLLM, LoRAX, TGI).

The fused adapter (rebuilt from the bank) and the stacked LoRA add up exactly when their ranks are
concatenated, so one adapter of rank k·r + r' computes our model. Zero-padding its rank (to a value
vLLM's --max-lora-rank accepts, or that a kernel prefers) changes nothing numerically.
"""

from __future__ import annotations

from pathlib import Path

from mta import __version__
from mta.adapters import LoraWeights
from mta.bank import Bank
from mta.io import MTAError
from mta.stacking import UserRecord, fused_adapter, user_adapters

# written into every export beside PEFT's files: it marks the folder as mta's, which `mta export --overwrite` may replace
EXPORT_FILE = "mta_export.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank value vLLM accepts that holds `rank`."""
    for r in VLLM_MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise MTAError(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def write_adapter(parts: list[LoraWeights | None], out: str | Path, record: UserRecord, pad_rank: int | None = None) -> LoraWeights:
    """One PEFT adapter folder holding the sum of `parts` (the user of `record`), its rank padded to `pad_rank` if given."""
    present = [p for p in parts if p is not None]
    if not present:
        raise MTAError("nothing to export: the user has neither a fused nor a stacked adapter")
    weights = LoraWeights.concat(present)
    if pad_rank is not None:
        if pad_rank < weights.rank:
            raise MTAError(f"--pad-rank {pad_rank} is below the adapter's rank {weights.rank}; use at least {vllm_rank(weights.rank)}")
        weights = weights.padded(pad_rank)
    weights.save_peft_dir(out, base_model=record.base_model, extra={EXPORT_FILE: {
        "user_id": record.user_id, "task": record.task, "bank_fingerprint": record.bank_fingerprint, "rank": weights.rank,
        "mta_version": __version__}})
    return weights


def export_user(bank: Bank | None, user_dir: str | Path, out: str | Path, pad_rank: int | None = None) -> LoraWeights:
    """A user folder (from `mta personalize`) → one PEFT adapter folder; returns the written factors."""
    record, fused, stacked = user_adapters(bank, user_dir)
    return write_adapter([fused, stacked], out, record, pad_rank)


def export_stored_user(bank: Bank, store, user_id: str, out: str | Path, pad_rank: int | None = None) -> LoraWeights:
    """The same for a user of the server's store (`mta serve`)."""
    stored = store.get(user_id)
    if stored is None:
        raise MTAError(f"user {user_id!r} is not in the store {store.location}")
    return write_adapter([fused_adapter(bank, stored.record), store.stacked(stored)], out, stored.record, pad_rank)
