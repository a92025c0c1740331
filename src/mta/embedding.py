"""User embeddings: the mean of a user's profile-item embeddings (as in the paper)."""

from __future__ import annotations

import numpy as np

from mta.io import MTAError
from mta.tasks import Task


def profile_embeddings(embedder, task: Task, profiles: list[list[dict]], batch_size: int = 64,
                       progress: bool = False) -> np.ndarray:
    """One row per profile; all items are encoded in one batched pass."""
    for i, p in enumerate(profiles):
        if not p:
            raise MTAError(f"profile #{i} is empty: a user needs at least one history item to be embedded")
    texts = [task.item_text(item) for p in profiles for item in p]
    vecs = embedder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=progress)
    out, start = [], 0
    for p in profiles:
        out.append(vecs[start : start + len(p)].mean(0))
        start += len(p)
    return np.stack(out).astype(np.float32)


def profile_embedding(embedder, task: Task, profile: list[dict]) -> np.ndarray:
    return profile_embeddings(embedder, task, [profile])[0]
