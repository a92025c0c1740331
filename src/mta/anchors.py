"""Stage 1a: choose the anchors of the Meta-LoRA bank by clustering users.

Paper: k-means over user embeddings; per cluster the user with the longest history (at least
`min_history` items) becomes the anchor. Extension (`mode="cluster"`): the anchor's LoRA is trained on
the pooled histories of the whole cluster, which helps when every user has only ~10 items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from mta.config import AnchorConfig
from mta.io import MTAError


@dataclass
class Anchor:
    id: str
    cluster: int
    user_ids: list[str]  # whose histories train it: the anchor user, or the whole cluster
    embedding: np.ndarray  # what target users are compared with


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def select_anchors(user_ids: list[str], history_lengths: list[int], embeddings: np.ndarray, cfg: AnchorConfig) -> list[Anchor]:
    eligible = [i for i, n in enumerate(history_lengths) if n >= cfg.min_history]
    if not eligible:
        raise MTAError(f"no user has at least {cfg.min_history} history items (min_history); lower it or add users")
    x = _unit(embeddings[eligible])
    # users with identical embeddings (duplicated profiles) would leave k-means clusters empty
    k = min(cfg.num_clusters, len(np.unique(x, axis=0)))
    km = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit(x)
    anchors = []
    for c in range(k):
        members = [eligible[j] for j in np.flatnonzero(km.labels_ == c)]
        centroid = _unit(km.cluster_centers_[c])
        # longest history wins; among equals the user closest to the centroid (most typical)
        best = max(members, key=lambda i: (history_lengths[i], float(_unit(embeddings[i]) @ centroid), -i))
        if cfg.mode == "user":
            anchors.append(Anchor(f"anchor_{c:03d}", c, [user_ids[best]], _unit(embeddings[best])))
        else:
            members.sort(key=lambda i: i != best)
            anchors.append(Anchor(f"anchor_{c:03d}", c, [user_ids[i] for i in members], _unit(embeddings[members].mean(0))))
    return anchors
