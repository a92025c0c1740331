"""LaMP tasks: how a profile item reads, what it teaches, how a query is prompted and scored.

Prompts follow the retrieval-augmented format of LaMP/OPPU: the retrieved history items, then the query.
A profile item becomes a leave-one-out training pair whose input has the same wording as the task's
queries, so anchors and stacked adapters learn exactly the mapping they are asked for at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mta import metrics
from mta.io import MTAError
from mta.retrieval import bm25_top_k


def clip(text: str, max_words: int) -> str:
    words = str(text).split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str


@dataclass(frozen=True)
class Task:
    id: str
    name: str
    item_fields: tuple[str, ...]
    item_text: Callable[[dict], str]
    item_pair: Callable[[dict], tuple[str, str]]
    max_new_tokens: int
    number_fields: tuple[str, ...] = ()  # item fields that may be numbers as well as strings (LaMP-3's score)

    def prompt(self, input: str, history: list[dict]) -> str:
        if not history:
            return input
        return "\n".join(self.item_text(h) for h in history) + "\n" + input

    def evaluate(self, predictions: list[str], golds: list[str]) -> dict[str, float]:
        return metrics.evaluate(self.id, predictions, golds)

    @property
    def main_metric(self) -> str:
        return metrics.MAIN_METRIC[self.id]

    def check_item(self, item: dict, where: str) -> None:
        """The task's fields present and strings (a number too where `number_fields` allows); any other field a string,
        a number or null. Files and the server check alike: an object or list would only be stored, never read."""
        if not isinstance(item, dict):
            raise MTAError(f"{where}: a profile item must be an object, got {type(item).__name__}")
        missing = [f for f in self.item_fields if f not in item or item[f] is None]
        if missing:
            raise MTAError(f"{where}: profile item lacks field(s) {missing} required by {self.id} ({self.name})")
        for name, value in item.items():
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if name in self.item_fields and not (isinstance(value, str) or number and name in self.number_fields):
                kind = "a string or a number" if name in self.number_fields else "a string"
                raise MTAError(f"{where}: field {name!r} must be {kind}, got {type(value).__name__}")
            if not (isinstance(value, str) or number or value is None):
                raise MTAError(f"{where}: field {name!r} must be a string, a number or null, got {type(value).__name__}")


_W = 80  # words kept of a long field: keeps prompts within a few hundred tokens on a CPU budget

_LAMP2_Q = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag name without "
    "further explanation. tags: [" + ", ".join(metrics.LAMP2_LABELS) + "] description: "
)
_LAMP3_Q = (
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. review: "
)


def _tweet_pair(item: dict) -> tuple[str, str]:
    words = str(item["text"]).split()
    head, tail = words[: max(1, len(words) // 2)], words[max(1, len(words) // 2) :]
    return f"Complete this tweet in its author's style: {' '.join(head)}", " ".join(tail) or " ".join(head)


TASKS: dict[str, Task] = {
    t.id: t
    for t in [
        Task(
            "LaMP-1", "citation", ("title",),
            item_text=lambda it: f'"{it["title"]}"',
            item_pair=lambda it: (f"Write the title of a paper with this abstract: {clip(it.get('abstract', ''), _W)}", it["title"]),
            max_new_tokens=4,
        ),
        Task(
            "LaMP-2", "movie_tagging", ("description", "tag"),
            item_text=lambda it: f'the tag for the movie: "{clip(it["description"], _W)}" is "{it["tag"]}"',
            item_pair=lambda it: (_LAMP2_Q + clip(it["description"], _W), it["tag"]),
            max_new_tokens=8,
        ),
        Task(
            "LaMP-3", "product_rating", ("text", "score"),
            item_text=lambda it: f'{it["score"]} is the score for "{clip(it["text"], _W)}"',
            item_pair=lambda it: (_LAMP3_Q + clip(it["text"], _W), str(it["score"]).strip()),
            max_new_tokens=3, number_fields=("score",),
        ),
        Task(
            "LaMP-4", "news_headline", ("text", "title"),
            item_text=lambda it: f'"{it["title"]}" is the title for "{clip(it["text"], _W)}"',
            item_pair=lambda it: (f"Generate a headline for the following article: {clip(it['text'], _W)}", it["title"]),
            max_new_tokens=32,
        ),
        Task(
            "LaMP-5", "scholarly_title", ("title", "abstract"),
            item_text=lambda it: f'"{it["title"]}" is the title for "{clip(it["abstract"], _W)}"',
            item_pair=lambda it: (f"Generate a title for the following abstract of a paper: {clip(it['abstract'], _W)}", it["title"]),
            max_new_tokens=32,
        ),
        Task(
            "LaMP-7", "tweet_paraphrase", ("text",),
            item_text=lambda it: f'"{clip(it["text"], _W)}"',
            item_pair=_tweet_pair,
            max_new_tokens=64,
        ),
    ]
}


def get_task(name: str) -> Task:
    """Accepts 'LaMP-2', 'lamp2', '2' or 'movie_tagging'."""
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    for t in TASKS.values():
        if key in {t.id.lower().replace("-", ""), t.id[-1], t.name.replace("_", "")}:
            return t
    known = ", ".join(f"{t.id} ({t.name})" for t in TASKS.values())
    raise MTAError(f"unknown task {name!r}; known tasks: {known}")


def retrieve(task: Task, query: str, profile: list[dict], k: int) -> list[dict]:
    return [profile[i] for i in bm25_top_k(query, [task.item_text(p) for p in profile], k)]


def query_prompt(task: Task, input: str, profile: list[dict], num_retrieved: int = 1) -> str:
    return task.prompt(input, retrieve(task, input, profile, num_retrieved))


def loo_examples(task: Task, profile: list[dict], num_retrieved: int = 1) -> list[Example]:
    """Leave-one-out: each item is a target once, the BM25-closest *other* items go in its prompt."""
    out = []
    for i, item in enumerate(profile):
        input, target = task.item_pair(item)
        others = profile[:i] + profile[i + 1 :]
        out.append(Example(query_prompt(task, input, others, num_retrieved), str(target)))
    return out
