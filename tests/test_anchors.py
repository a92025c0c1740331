"""Stage 1a: k-means over user embeddings picks one anchor per cluster."""

import numpy as np
import pytest

from mta.anchors import select_anchors
from mta.config import AnchorConfig
from mta.io import MTAError

# three tight, well separated groups of users in 4-d: the clusters k-means must find
CENTRES = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=np.float32)


@pytest.fixture
def population():
    rng = np.random.default_rng(0)
    groups = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    emb = CENTRES[groups] + rng.normal(scale=0.05, size=(len(groups), 4)).astype(np.float32)
    ids = [f"u{i}" for i in range(len(groups))]
    lengths = [5, 9, 5, 6, 6, 3, 12, 7, 7, 7]
    return ids, lengths, emb, groups


def _group_of(anchor, ids, groups):
    return {groups[ids.index(u)] for u in anchor.user_ids}


def test_user_mode_picks_the_longest_history_per_cluster(population):
    ids, lengths, emb, groups = population
    anchors = select_anchors(ids, lengths, emb, AnchorConfig(num_clusters=3, min_history=5, mode="user"))
    assert [a.id for a in anchors] == ["anchor_000", "anchor_001", "anchor_002"]
    assert sorted(a.cluster for a in anchors) == [0, 1, 2]
    chosen = sorted(a.user_ids[0] for a in anchors)
    # group 0 → u1 (9 items), group 1 → u6 (12), group 2: a three-way tie at 7 broken by closeness to the centroid
    assert chosen[:2] == ["u1", "u6"] and chosen[2] in {"u7", "u8", "u9"}
    for a in anchors:
        assert len(a.user_ids) == 1
        i = ids.index(a.user_ids[0])
        np.testing.assert_allclose(a.embedding, emb[i] / np.linalg.norm(emb[i]), rtol=1e-5)


def test_tie_goes_to_the_most_typical_user():
    emb = np.array([[1.0, 0.0], [1.0, 0.3], [1.0, -0.05]], dtype=np.float32)  # centroid ≈ (1, 0.08)
    (anchor,) = select_anchors(["a", "b", "c"], [5, 5, 5], emb, AnchorConfig(num_clusters=1, min_history=1, mode="user"))
    assert anchor.user_ids == ["a"]


def test_cluster_mode_pools_each_cluster(population):
    ids, lengths, emb, groups = population
    anchors = select_anchors(ids, lengths, emb, AnchorConfig(num_clusters=3, min_history=5, mode="cluster"))
    eligible = {u for u, n in zip(ids, lengths) if n >= 5}
    pooled = [u for a in anchors for u in a.user_ids]
    assert sorted(pooled) == sorted(eligible)  # a partition of the eligible users
    assert "u5" not in pooled  # 3 items < min_history
    for a in anchors:
        assert len(_group_of(a, ids, groups)) == 1  # each cluster is one taste group
        first = a.user_ids[0]
        assert lengths[ids.index(first)] == max(lengths[ids.index(u)] for u in a.user_ids)  # anchor user first
        members = [ids.index(u) for u in a.user_ids]
        mean = emb[members].mean(0)  # what target users are compared with: the members' mean direction
        np.testing.assert_allclose(a.embedding, mean / np.linalg.norm(mean), rtol=1e-5)


def test_fewer_eligible_users_than_clusters(population):
    ids, lengths, emb, _ = population
    anchors = select_anchors(ids, lengths, emb, AnchorConfig(num_clusters=8, min_history=9))
    assert sorted(a.user_ids[0] for a in anchors) == ["u1", "u6"]  # only they have 9+ items: k drops to 2


def test_same_seed_same_anchors(population):
    ids, lengths, emb, _ = population
    cfg = AnchorConfig(num_clusters=3, min_history=5, seed=7)
    a, b = select_anchors(ids, lengths, emb, cfg), select_anchors(ids, lengths, emb, cfg)
    assert [(x.id, x.cluster, x.user_ids) for x in a] == [(x.id, x.cluster, x.user_ids) for x in b]


def test_nobody_with_enough_history(population):
    ids, lengths, emb, _ = population
    with pytest.raises(MTAError, match=r"no user has at least 20 history items \(min_history\); lower it or add users"):
        select_anchors(ids, lengths, emb, AnchorConfig(min_history=20))


def test_unknown_mode(population):
    ids, lengths, emb, _ = population
    with pytest.raises(MTAError, match="unknown anchor mode 'pooled'; use 'user' or 'cluster'"):
        select_anchors(ids, lengths, emb, AnchorConfig(mode="pooled"))


@pytest.mark.parametrize("mode", ["user", "cluster"])
def test_duplicate_users_do_not_leave_empty_clusters(mode):
    """Two users with the same profile embed identically: 3 distinct points can make only 3 clusters, not 4."""
    emb = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    anchors = select_anchors(["a", "b", "c", "d"], [5, 6, 5, 5], emb, AnchorConfig(num_clusters=4, min_history=1, mode=mode))
    assert len(anchors) == 3
    assert sorted(a.user_ids[0] for a in anchors) == ["b", "c", "d"]  # of the twins, the longer history
    if mode == "cluster":
        assert sorted(u for a in anchors for u in a.user_ids) == ["a", "b", "c", "d"]
