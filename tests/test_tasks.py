"""LaMP tasks: names, prompt wording, leave-one-out training pairs."""

import json
import re

import pytest
from conftest import SHARED_LAMP

from mta.data.synthetic import LAMP2_PROMPT, make_movie_tagging
from mta.io import MTAError
from mta.metrics import MAIN_METRIC
from mta.retrieval import bm25_top_k
from mta.tasks import TASKS, Example, clip, get_task, loo_examples, query_prompt, retrieve

LAMP2 = get_task("LaMP-2")


@pytest.mark.parametrize("name", ["LaMP-2", "lamp2", "2", "movie_tagging", "LAMP_2", " lamp-2 ", "movie-tagging", 2])
def test_get_task_aliases(name):
    assert get_task(name) is TASKS["LaMP-2"]


@pytest.mark.parametrize("task_id", list(TASKS))
def test_every_task_by_id_number_and_name(task_id):
    t = TASKS[task_id]
    assert get_task(task_id) is get_task(task_id[-1]) is get_task(t.name) is t
    assert t.main_metric == MAIN_METRIC[task_id]


@pytest.mark.parametrize("name", ["LaMP-6", "6", "movies", "", "lamp22"])
def test_unknown_task(name):
    with pytest.raises(MTAError, match=rf"unknown task {name!r}; known tasks: LaMP-1 \(citation\), LaMP-2 \(movie_tagging\)"):
        get_task(name)


# -- prompt wording --------------------------------------------------------------------------------------------------

def test_lamp2_pair_uses_the_query_wording_of_the_synthetic_set():
    user = make_movie_tagging(num_users=1, items_per_user=1)[0]
    q = user["query"][0]
    description = q["input"].removeprefix(LAMP2_PROMPT)
    assert LAMP2.item_pair({"description": description, "tag": q["gold"]}) == (q["input"], q["gold"])


@pytest.mark.parametrize("file, task_id, field, target, separator", [
    ("movie_tagging.json", "LaMP-2", "description", "tag", "description: "),
    ("news_headline.json", "LaMP-4", "text", "title", "article: "),
])
def test_pair_wording_equals_the_official_queries(file, task_id, field, target, separator):
    """A profile item becomes exactly the question the task asks at test time (up to whitespace)."""
    path = SHARED_LAMP / file
    if not path.exists():
        pytest.skip(f"{path} not present")
    task = get_task(task_id)
    question = task.item_pair({field: "", target: "x"})[0]
    compared = 0
    for user in json.loads(path.read_text()):
        for q in user["query"]:
            assert q["input"].startswith(question), q["input"][:120]
            body = q["input"].split(separator, 1)[1]
            if len(body.split()) <= 80:  # longer fields are clipped on purpose
                prompt = task.item_pair({field: body, target: "x"})[0]
                assert prompt.split() == q["input"].split()
                compared += 1
    assert compared > 10


def test_item_text_and_prompt():
    item = {"description": "A starship crew picks up a signal.", "tag": "sci-fi"}
    assert LAMP2.item_text(item) == 'the tag for the movie: "A starship crew picks up a signal." is "sci-fi"'
    assert LAMP2.prompt("Q?", []) == "Q?"
    assert LAMP2.prompt("Q?", [item, item]) == f"{LAMP2.item_text(item)}\n{LAMP2.item_text(item)}\nQ?"


def test_clip():
    assert clip("a b c", 3) == "a b c"
    assert clip("a  b\nc d", 2) == "a b ..."
    long = {"description": " ".join(["w"] * 200), "tag": "comedy"}
    assert LAMP2.item_pair(long)[0].endswith(" ".join(["w"] * 80) + " ...")


@pytest.mark.parametrize("task_id, item", [
    ("LaMP-1", {"title": "T", "abstract": "x"}),
    ("LaMP-3", {"text": "fine", "score": 4}),
    ("LaMP-4", {"text": "body", "title": "Head"}),
    ("LaMP-5", {"title": "T", "abstract": "abs"}),
    ("LaMP-7", {"text": "one two three four"}),
])
def test_every_task_makes_pairs(task_id, item):
    task = get_task(task_id)
    task.check_item(item, "here")
    prompt, target = task.item_pair(item)
    assert prompt and target and target not in ("", "None")


def test_tweet_pair_splits_the_tweet():
    assert get_task("LaMP-7").item_pair({"text": "one two three four"}) == (
        "Complete this tweet in its author's style: one two", "three four")
    assert get_task("LaMP-7").item_pair({"text": "single"})[1] == "single"


@pytest.mark.parametrize("item, message", [
    ({"description": "x"}, r"here: profile item lacks field\(s\) \['tag'\] required by LaMP-2 \(movie_tagging\)"),
    ({"description": "x", "tag": None}, r"lacks field\(s\) \['tag'\]"),
    ("a string", "here: a profile item must be an object, got str"),
])
def test_check_item(item, message):
    with pytest.raises(MTAError, match=message):
        LAMP2.check_item(item, "here")


# -- leave-one-out ---------------------------------------------------------------------------------------------------

PROFILE = [
    {"description": "A zebra astronaut explores the rings of Saturn.", "tag": "sci-fi"},
    {"description": "A clumsy wedding planner ruins the big day.", "tag": "comedy"},
    {"description": "The zebra astronaut returns from Saturn to Earth.", "tag": "action"},
    {"description": "A grieving detective uncovers a shocking truth.", "tag": "twist ending"},
]


def test_loo_never_puts_the_target_in_its_own_prompt():
    examples = loo_examples(LAMP2, PROFILE, num_retrieved=3)
    assert [e.target for e in examples] == [p["tag"] for p in PROFILE]
    for item, ex in zip(PROFILE, examples):
        assert LAMP2.item_text(item) not in ex.prompt
        history = ex.prompt.split("\n")[:-1]
        assert len(history) == 3 and all(LAMP2.item_text(o) in history for o in PROFILE if o is not item)
        assert ex.prompt.endswith(LAMP2.item_pair(item)[0])


def test_loo_retrieves_the_bm25_closest_other_item():
    examples = loo_examples(LAMP2, PROFILE, num_retrieved=1)
    # items 0 and 2 share "zebra astronaut ... Saturn": each retrieves the other
    assert examples[0] == Example(f"{LAMP2.item_text(PROFILE[2])}\n{LAMP2.item_pair(PROFILE[0])[0]}", "sci-fi")
    assert examples[2].prompt.startswith(LAMP2.item_text(PROFILE[0]) + "\n")
    for i, ex in enumerate(examples):
        others = PROFILE[:i] + PROFILE[i + 1:]
        best = others[bm25_top_k(LAMP2.item_pair(PROFILE[i])[0], [LAMP2.item_text(o) for o in others], 1)[0]]
        assert ex.prompt.split("\n")[0] == LAMP2.item_text(best)


def test_loo_of_a_single_item_has_no_history():
    (ex,) = loo_examples(LAMP2, PROFILE[:1])
    assert ex.prompt == LAMP2.item_pair(PROFILE[0])[0]


def test_query_prompt_retrieves_from_the_profile():
    prompt = query_prompt(LAMP2, LAMP2_PROMPT + "A detective finds a shocking truth.", PROFILE, 1)
    assert prompt.split("\n")[0] == LAMP2.item_text(PROFILE[3])
    assert retrieve(LAMP2, "wedding", PROFILE, 2)[0] is PROFILE[1]
    assert query_prompt(LAMP2, "Q", PROFILE, 0) == "Q"


@pytest.mark.parametrize("task_id, item, message", [
    ("LaMP-2", {"description": "d", "tag": {"nested": "object"}}, "field 'tag' must be a string, got dict"),
    ("LaMP-2", {"description": ["a", "list"], "tag": "comedy"}, "field 'description' must be a string, got list"),
    ("LaMP-2", {"description": "d", "tag": 3}, "field 'tag' must be a string, got int"),
    ("LaMP-3", {"text": "t", "score": True}, "field 'score' must be a string or a number, got bool"),
    ("LaMP-3", {"text": "t", "score": [5]}, "field 'score' must be a string or a number, got list"),
    ("LaMP-4", {"text": "t", "title": "h", "extra": {"big": "object"}}, "field 'extra' must be a string, a number or null"),
])
def test_profile_fields_are_strings(task_id, item, message):
    """What files and the API take alike: no objects or lists, which would only be stored, never read."""
    with pytest.raises(MTAError, match=re.escape(message)):
        get_task(task_id).check_item(item, "here")


@pytest.mark.parametrize("item", [{"text": "t", "score": 5}, {"text": "t", "score": "4.0"}, {"text": "t", "score": 2.5, "id": 7}])
def test_a_lamp3_score_may_be_a_number(item):
    get_task("LaMP-3").check_item(item, "here")
