import json
from collections import Counter
from pathlib import Path

import pytest

from mta.data.synthetic import LAMP2_PROMPT, TAG_PHRASES, TASTE_GROUPS, make_movie_tagging
from mta.metrics import LAMP2_LABELS

REAL_LAMP2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "lamp" / "movie_tagging.json"


@pytest.fixture(scope="module")
def users():
    return make_movie_tagging()


def _items(users):
    for user in users:
        yield from user["profile"]


def test_same_seed_same_data_other_seed_differs():
    assert make_movie_tagging(seed=3) == make_movie_tagging(seed=3)
    assert make_movie_tagging(seed=3) != make_movie_tagging(seed=4)


def test_layout(users):
    assert len(users) == 24
    for user in users:
        assert set(user) == {"user_id", "profile", "query"}
        assert isinstance(user["user_id"], int)
        assert len(user["profile"]) == 10
        assert all(set(item) == {"id", "description", "tag"} for item in user["profile"])
        (query,) = user["query"]
        assert set(query) == {"id", "input", "gold"}
    ids = [item["id"] for item in _items(users)] + [u["query"][0]["id"] for u in users]
    assert all(isinstance(i, str) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({u["user_id"] for u in users}) == len(users)


@pytest.mark.parametrize("num_users, items_per_user", [(1, 1), (5, 3), (9, 20)])
def test_sizes_follow_arguments(num_users, items_per_user):
    users = make_movie_tagging(num_users, items_per_user)
    assert len(users) == num_users
    assert {len(u["profile"]) for u in users} == {items_per_user}


@pytest.mark.parametrize("num_users, items_per_user", [(0, 10), (4, 0)])
def test_rejects_empty_sizes(num_users, items_per_user):
    with pytest.raises(ValueError, match="at least one user"):
        make_movie_tagging(num_users, items_per_user)


def test_labels_are_lamp2_tags_and_golds_follow_taste(users):
    assert all(item["tag"] in LAMP2_LABELS for item in _items(users))
    for user in users:
        assert user["query"][0]["gold"] in TASTE_GROUPS[user["user_id"] % len(TASTE_GROUPS)]


def test_query_uses_official_lamp2_prompt(users):
    assert LAMP2_PROMPT == (
        "Which tag does this movie relate to among the following tags? Just answer with the tag "
        "name without further explanation. tags: [sci-fi, based on a book, comedy, action, twist "
        "ending, dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, "
        "social commentary, violence, true story] description: "
    )
    assert all(u["query"][0]["input"].startswith(LAMP2_PROMPT) for u in users)


@pytest.mark.skipif(not REAL_LAMP2.exists(), reason="real LaMP-2 data not available")
def test_prompt_matches_real_lamp2_queries():
    real = json.loads(REAL_LAMP2.read_text())
    assert all(u["query"][0]["input"].startswith(LAMP2_PROMPT) for u in real)


def test_descriptions_carry_a_cue_for_their_tag(users):
    descriptions = [(item["description"], item["tag"]) for item in _items(users)]
    descriptions += [(u["query"][0]["input"][len(LAMP2_PROMPT):], u["query"][0]["gold"]) for u in users]
    for description, tag in descriptions:
        assert 20 <= len(description.split()) <= 40
        assert any(f"{who} " in description for who in TAG_PHRASES[tag]["who"])
        assert any(what in description for what in TAG_PHRASES[tag]["what"])


def test_tag_distributions_differ_across_groups(users):
    counts = [Counter() for _ in TASTE_GROUPS]
    for user in users:
        counts[user["user_id"] % len(TASTE_GROUPS)].update(item["tag"] for item in user["profile"])
    for group, count in zip(TASTE_GROUPS, counts):
        assert {tag for tag, _ in count.most_common(len(group))} == set(group)
    share = [{tag: c[tag] / sum(c.values()) for tag in LAMP2_LABELS} for c in counts]
    for i in range(len(share)):
        for j in range(i + 1, len(share)):
            total_variation = sum(abs(share[i][t] - share[j][t]) for t in LAMP2_LABELS) / 2
            assert total_variation > 0.5
