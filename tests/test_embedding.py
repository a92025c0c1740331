"""User embeddings: the mean of the user's profile-item embeddings."""

import numpy as np
import pytest

from mta.embedding import profile_embedding, profile_embeddings
from mta.io import MTAError
from mta.tasks import get_task

LAMP2 = get_task("LaMP-2")
A = [{"description": "A starship crew picks up a signal.", "tag": "sci-fi"}, {"description": "A clumsy planner.", "tag": "comedy"}]
B = [{"description": "A grieving detective uncovers a truth.", "tag": "twist ending"}]


def test_mean_of_item_embeddings(embedder):
    items = embedder.encode([LAMP2.item_text(i) for i in A + B], normalize_embeddings=True)
    got = profile_embeddings(embedder, LAMP2, [A, B])
    assert got.shape == (2, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], items[:2].mean(0), atol=1e-5)
    np.testing.assert_allclose(got[1], items[2], atol=1e-5)
    np.testing.assert_allclose(profile_embedding(embedder, LAMP2, B), got[1], atol=1e-5)


def test_empty_profile(embedder):
    with pytest.raises(MTAError, match="profile #1 is empty"):
        profile_embeddings(embedder, LAMP2, [A, []])
