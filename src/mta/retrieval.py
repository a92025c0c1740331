"""BM25 retrieval over one user's profile (rank-bm25), as in LaMP's retrieval-augmented prompts."""

from __future__ import annotations

import re

from rank_bm25 import BM25Okapi

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_top_k(query: str, docs: list[str], k: int) -> list[int]:
    """Indices of the k best docs for `query`, best first; ties keep profile order."""
    if k <= 0 or not docs:
        return []
    tokenized = [tokenize(d) or ["<empty>"] for d in docs]
    scores = BM25Okapi(tokenized).get_scores(tokenize(query))
    order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
    return order[:k]
