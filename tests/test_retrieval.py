"""BM25 retrieval over one user's profile (rank-bm25's BM25Okapi, as LaMP uses)."""

import pytest

from mta.retrieval import bm25_top_k, tokenize

DOCS = [
    "a romantic comedy in paris",
    "space marines fight aliens on mars",
    "aliens invade paris in a comedy",
    "a quiet drama about grief",
    "a heist goes wrong in london",
    "twin sisters swap lives",
]


def test_tokenize_lowercases_words():
    assert tokenize("Sci-Fi: A Zebra's  Tale!") == ["sci", "fi", "a", "zebra", "s", "tale"]


@pytest.mark.parametrize("query, want", [
    ("aliens on mars", [1, 2]),  # both mention aliens; only 1 also has mars
    ("Comedy in PARIS", [0, 2]),  # the shorter document wins at equal matches
    ("grief", [3]),
])
def test_best_first(query, want):
    assert bm25_top_k(query, DOCS, len(want)) == want


def test_ties_keep_profile_order():
    docs = ["same words here", "other text", "same words here", "same words here", "x", "y", "z", "w"]
    assert bm25_top_k("same words", docs, 3) == [0, 2, 3]
    assert bm25_top_k("unrelated query", DOCS, 3) == [0, 1, 2]  # no match at all: profile order


def test_a_term_in_half_the_profile_weighs_nothing():
    """BM25Okapi's idf is log((N-n+.5)/(n+.5)): 0 for a term in half the items; retrieval falls back to profile order."""
    assert bm25_top_k("aliens", DOCS[:4], 2) == [0, 1]
    assert bm25_top_k("aliens", DOCS, 2) == [1, 2]


@pytest.mark.parametrize("k, docs, want", [
    (0, DOCS, []),
    (-1, DOCS, []),
    (3, [], []),
    (10, DOCS, [1, 2, 0, 3, 4, 5]),  # more than there are: all of them, best first
])
def test_edge_cases(k, docs, want):
    assert bm25_top_k("aliens", docs, k) == want


def test_empty_documents_do_not_crash():
    assert bm25_top_k("aliens", ["", "!!!", "aliens here", "x", "y"], 1) == [2]
